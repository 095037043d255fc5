"""An agent's part in a vertical job: its table, its alignment, and what it may train on.

The agent holds a ``PartyTable`` (its own columns of patients keyed by an identifier). Before
training, the aggregator relays the alignment's stages (``aggregator.alignment``); this module
answers them (``edge_agent.alignment``) and, once the common patients are known, gives the
agent its training and held-out rows. The rows are kept in the agent's state folder, so an
agent that restarts inside a job trains on the same rows without aligning again.

A party is checked before it answers anything: its table's columns must be what its head
reads, and exactly the plan's label party may hold labels -- a second party with labels, or a
label party without, is refused with one line, before any training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from edge_agent.alignment import AlignmentError, PartyAlignment, common_key
from edge_agent.data.site_data import SiteData
from edge_agent.data.vertical import PartyTable
from medsplit.protocol import JobSpec
from medsplit.protocol.meta import AlignMeta, read_meta
from medsplit.storage import atomic_write
from medsplit.wire import Envelope
from models.vertical import VerticalArgs, party_input_shape, vertical_args

log = logging.getLogger(__name__)


class VerticalParty:
    def __init__(self, site_id: str, table: PartyTable, state_dir: Path | None) -> None:
        self.site_id = site_id
        self.table = table
        self.state_dir = state_dir
        self._alignment: PartyAlignment | None = None
        self._job: str | None = None
        self.rows: list[int] | None = None  # its rows of the common patients, in their order
        self.data: SiteData | None = None  # what it trains on and holds out, from those rows

    @property
    def holds_labels(self) -> bool:
        return self.table.y is not None

    def provisional(self) -> SiteData:
        return self.table.provisional()

    def join(self, spec: JobSpec) -> SiteData | None:
        """The rows it kept, if it aligned for this job before. A party at odds with the
        plan is told so in answer to its first request, where the aggregator hears it."""
        try:
            self._check(vertical_args(spec.plan.model.args))
        except AlignmentError:
            return None
        rows = self._kept_rows(spec.job_id)
        if rows is not None:
            self.rows = rows
            self.data = self.table.aligned(rows, spec.seed, spec.holdout, spec.standardise_columns)
            log.info("%s: %d common patients, as aligned before", self.site_id, len(rows))
        return self.data

    def answer(self, spec: JobSpec, env: Envelope) -> tuple[dict[str, torch.Tensor], int | None]:
        """This party's answer to an alignment stage; the aligned rows once it has them."""
        args = vertical_args(spec.plan.model.args)
        self._check(args)
        meta = read_meta(AlignMeta, env)
        alignment = self._alignment_for(spec, args)
        tensors, size = alignment.answer(
            meta.stage, meta.partner, meta.asking or 0, dict(env.tensors)
        )
        if meta.stage in ("common", "adopt") and alignment.rows is not None:
            self._keep_rows(spec.job_id, alignment.rows)
            self.rows = alignment.rows
            self.data = self.table.aligned(
                alignment.rows, spec.seed, spec.holdout, spec.standardise_columns
            )
            log.info(
                "%s: aligned -- %d of its %d patients are common to every party "
                "(%d training, %d held out)",
                self.site_id,
                len(alignment.rows),
                len(self.table.keys),
                self.data.train_samples,
                len(self.data.y_test),
            )
        return tensors, size

    def _alignment_for(self, spec: JobSpec, args: VerticalArgs) -> PartyAlignment:
        if self._alignment is None or self._job != spec.job_id:
            others = [p for p in args.parties if p != args.label_party]
            keys = self.table.salted(spec.job_id)  # missing or repeated keys are refused here
            self._alignment = PartyAlignment(
                self.site_id,
                args.label_party,
                others,
                keys,
                self.table.keys,
                sealing=common_key(self.table.key_secret, spec.job_id),
            )
            self._job = spec.job_id
        return self._alignment

    def _check(self, args: VerticalArgs) -> None:
        if self.site_id not in args.parties:
            raise AlignmentError(f"{self.site_id} is not a party of this job's plan")
        if self.holds_labels and self.site_id != args.label_party:
            raise AlignmentError(
                f"{self.site_id} holds labels, but the job's label party is {args.label_party}: "
                "a vertical job has exactly one label party (remove this site's labels)"
            )
        if not self.holds_labels and self.site_id == args.label_party:
            raise AlignmentError(
                f"{self.site_id} is the job's label party but its data holds no labels"
            )
        expected = party_input_shape(args.parties[self.site_id])
        got = tuple(self.table.x.shape[1:])
        if got != expected:
            raise AlignmentError(
                f"{self.site_id}'s records are {list(got)} per patient ({self.table.source}), "
                f"but its head in the plan reads {list(expected)}"
            )

    def _rows_file(self, job_id: str) -> Path | None:
        return None if self.state_dir is None else self.state_dir / f"{job_id}.aligned.json"

    def _keep_rows(self, job_id: str, rows: list[int]) -> None:
        path = self._rows_file(job_id)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps({"rows": rows}).encode())

    def _kept_rows(self, job_id: str) -> list[int] | None:
        path = self._rows_file(job_id)
        if path is None or not path.is_file():
            return None
        try:
            rows = json.loads(path.read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s: %s is unreadable; the job aligns again", self.site_id, path)
            return None
        if not all(isinstance(r, int) and 0 <= r < len(self.table.keys) for r in rows):
            return None
        return list(rows)
