"""What a site keeps in its state directory: its layers as they train, and its final model.

* ``edge.safetensors`` holds the site's layers after every round (atomically written), naming
  the job they belong to, so a restarted agent takes its FLOP private layers back only into
  the same job.
* At ``finish`` the site assembles its own whole model (``edge_agent.site_model``), keeps it
  with its model card and, if asked, exports it to ONNX with parity checked on its own
  held-out samples.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from edge_agent.data.site_data import SiteData
from edge_agent.local_model import LocalModel
from edge_agent.segments import EdgeSegments
from edge_agent.site_model import (
    ONNX_FILE,
    SiteModelError,
    assemble,
    export_site_model,
    save_site_model,
    site_card,
)
from medsplit.modes import Mode
from medsplit.protocol import JobSpec
from medsplit.storage import atomic_write
from models.onnx_export import ExportError, export_section

log = logging.getLogger(__name__)

STATE_FILE = "edge.safetensors"


class SiteStore:
    def __init__(
        self, site_id: str, state_dir: Path | None, *, export_onnx: bool, joint_export: bool = False
    ) -> None:
        self.site_id = site_id
        self.state_dir = state_dir
        self.export_onnx = export_onnx
        self.joint_export = joint_export  # a vertical party agrees to a joint model
        self.site_model: Path | None = None  # written at finish
        self.onnx_model: Path | None = None

    def save(
        self, spec: JobSpec, segments: EdgeSegments | LocalModel, *, releases: int = 0
    ) -> None:
        """Keep this site's layers in its state directory (atomically), e.g. for export, with
        how often its records were released (its privacy ledger)."""
        if self.state_dir is None:
            return
        metadata = {
            "job_id": spec.job_id,
            "mode": spec.mode,
            "site_id": self.site_id,
            "releases": str(releases),
        }
        data = save(segments.full_state(), metadata=metadata)
        atomic_write(self.state_dir / STATE_FILE, data)

    def releases(self, spec: JobSpec) -> int:
        """How often this site's records were released in this job before a restart: a
        restarted agent goes on counting, it does not start its epsilon again from zero."""
        path = None if self.state_dir is None else self.state_dir / STATE_FILE
        if path is None or not path.is_file():
            return 0
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError):
            return 0
        if metadata.get("job_id") != spec.job_id:
            return 0
        try:
            return max(0, int(metadata.get("releases", "0")))
        except ValueError:
            return 0

    def restore_private(self, spec: JobSpec, model: LocalModel) -> None:
        """After a restart, take back the private layers this site trained in this job."""
        path = None if self.state_dir is None else self.state_dir / STATE_FILE
        if path is None or not path.is_file() or not model.private_keys:
            return
        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("job_id") != spec.job_id:
                    return  # another job's layers: start from the job's initial weights
                state = {k: handle.get_tensor(k) for k in model.private_keys}
            model.load_private(state)
            log.info("%s: private layers restored from %s", self.site_id, path)
        except (SafetensorError, OSError, KeyError, RuntimeError) as exc:
            log.warning("%s: cannot restore private layers from %s: %s", self.site_id, path, exc)

    def finish(
        self,
        spec: JobSpec,
        segments: EdgeSegments | LocalModel,
        final: Mapping[str, torch.Tensor],
        data: SiteData,
    ) -> None:
        """Assemble this site's own model from the final weights; keep it, and export it
        (one site at a time in a process: ``export_section``)."""
        if self.state_dir is None:
            return
        with export_section():
            if spec.mode == Mode.VERTICAL:  # its own layers, kept as trained (``save``)
                if self.export_onnx and isinstance(segments, EdgeSegments):
                    self._export_party(spec, segments, final, data)
                return
            state = assemble(segments, final, spec)
            card = site_card(spec, self.site_id, data.card)
            if state is None or card is None:
                why = "the job keeps the trunk (release_trunk: false)" if card else "no data card"
                log.info("%s: no site model assembled: %s", self.site_id, why)
                return
            try:
                self.site_model = save_site_model(self.state_dir, state, card)
            except OSError as exc:  # a full disk: the job is over, the agent still exits
                log.error("%s: cannot write the site model: %s", self.site_id, exc)
                return
            log.info("%s: site model written to %s", self.site_id, self.site_model)
            if self.export_onnx:
                self._export(data)

    def _export_party(
        self,
        spec: JobSpec,
        segments: EdgeSegments,
        final: Mapping[str, torch.Tensor],
        data: SiteData,
    ) -> None:
        """A vertical party's own head, and at the label party the top (docs/vertical.md)."""
        from edge_agent.vertical_export import export_party  # noqa: PLC0415

        assert self.state_dir is not None
        sample = data.x_test[:32] if len(data.y_test) else data.x_train[:32]
        try:
            files = export_party(
                spec,
                self.site_id,
                segments=segments,
                final=final,
                state_dir=self.state_dir,
                sample=sample,
                joint=self.joint_export,
            )
        except ExportError as exc:  # the layers stay in edge.safetensors; export can be redone
            log.error("%s: ONNX export failed: %s", self.site_id, exc)
            return
        log.info("%s: exported %s", self.site_id, ", ".join(str(f) for f in files))

    def _export(self, data: SiteData) -> None:
        """Export to ONNX with parity checked on this site's own held-out samples."""
        if self.state_dir is None or self.site_model is None:
            return
        target = self.state_dir / ONNX_FILE
        sample = data.x_test[:32] if len(data.y_test) else None
        try:
            result = export_site_model(self.site_model, target, sample=sample)
        except (ExportError, SiteModelError) as exc:  # the weights stay; export can be redone
            log.error("%s: ONNX export failed: %s", self.site_id, exc)
            return
        self.onnx_model = result.path
        log.info(
            "%s: exported %s (opset %d, parity %.2g)",
            self.site_id,
            result.path,
            result.opset,
            result.max_abs_diff,
        )
