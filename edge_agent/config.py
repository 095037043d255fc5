"""``site.yaml``: what one edge agent runs, grouped by concern (docs/configuration.md).

* top level: ``site_id``, ``job_id``, ``device``, ``export_onnx``;
* ``data``: where this hospital's training data comes from (DICOM, CSV, or a built-in share);
* ``broker``: the shared broker group of ``medsplit.config``;
* ``waits``: how patient the agent is with the aggregator, and how often it says so;
* ``state``: the directory that holds this site's layers, its final model and ``model.onnx``;
* ``models``: the factories (code) a job spec may make this site import;
* ``http``: the health endpoints a probe asks (``/healthz``, ``/readyz``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    field_validator,
)

from edge_agent.data.settings import (
    BuiltinData,
    CsvData,
    DicomData,
    DicomWebData,
    PictureData,
    VerticalBuiltinData,
    VolumeData,
)
from medsplit.config import BrokerConfig, DeviceChoice, FileSettings, WaitSettings
from medsplit.health import HttpSettings
from medsplit.ids import ID_PATTERN, RESERVED_IDS

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]


def _data_source(value: Any) -> str:
    """Which data section this is; ``source`` may be left out for a built-in share."""
    if isinstance(value, dict):
        return str(value.get("source", "builtin"))
    return str(getattr(value, "source", "builtin"))


SiteDataConfig = Annotated[
    Annotated[BuiltinData, Tag("builtin")]
    | Annotated[DicomData, Tag("dicom")]
    | Annotated[DicomWebData, Tag("dicomweb")]
    | Annotated[PictureData, Tag("images")]
    | Annotated[VolumeData, Tag("volumes")]
    | Annotated[CsvData, Tag("csv")]
    | Annotated[VerticalBuiltinData, Tag("builtin-vertical")],
    Discriminator(_data_source),
]


class SiteWaits(WaitSettings):
    """How patient the agent is with the aggregator."""

    reply_timeout_s: float = Field(
        300.0, gt=0, description="give up on a training step the aggregator has not answered"
    )
    hello_interval_s: float = Field(
        5.0, gt=0, description="repeat hello at most this far apart until the aggregator answers"
    )


class SiteState(BaseModel):
    """What the agent keeps on disk."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dir: Path = Field(
        Path("state"), description="this site's layers, its final model and model.onnx live here"
    )


class SiteSealingSettings(BaseModel):
    """The site's keys for sealed segments (docs/security.md), apart from its TLS key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_file: Path | None = Field(
        None,
        description="seal.key of `medsplit provision`: this site's X25519 and Ed25519 private "
        "keys; without it the site cannot join a job that seals segments",
    )
    ca_file: Path | None = Field(
        None,
        description="the CA whose signature the job's roster of sealing keys must carry; "
        "default: broker.tls.ca_file",
    )


class SiteModels(BaseModel):
    """Which code a job may make this site run (docs/bring-your-own-model.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow: list[str] = Field(
        default_factory=list,
        description='factories a job may name, as shell patterns over "package.module:function" '
        '(e.g. "mypkg.nets:*"); the built-in and catalogue architectures are always allowed',
    )


class SiteConfig(FileSettings):
    """What one edge agent runs: its identity, its data, and one group per concern."""

    moved_fields: ClassVar[dict[str, str]] = {
        "state_dir": "state.dir",
        "reply_timeout_s": "waits.reply_timeout_s",
        "hello_interval_s": "waits.hello_interval_s",
    }

    site_id: Id = Field(
        description="this hospital's id: listed in the job, the CN of its certificate"
    )
    job_id: Id = Field(description="the job to take part in; the aggregator's job_id")
    broker: BrokerConfig = BrokerConfig()
    data: SiteDataConfig = Field(
        BuiltinData(), description="where this site's training data comes from"
    )
    device: DeviceChoice = Field(
        "auto",
        description="where the site's layers run: auto, cpu, cuda or cuda:N; a CUDA device "
        "that is not there fails at start",
    )
    export_onnx: bool = Field(
        True, description="at the end of a job, export the site's model to state.dir/model.onnx"
    )
    joint_export: bool = Field(
        False,
        description="vertical jobs: this party agrees that its head may join the label party's "
        "joint model (medsplit export-joint); said in its head.onnx (docs/vertical.md)",
    )
    waits: SiteWaits = SiteWaits()
    state: SiteState = SiteState()
    models: SiteModels = Field(
        SiteModels(), description="the code a job spec may make this site import"
    )
    sealing: SiteSealingSettings = Field(
        SiteSealingSettings(), description="keys for sealed segments (docs/security.md)"
    )
    http: HttpSettings = Field(
        HttpSettings(), description="/healthz and /readyz for probes (docs/deployment.md)"
    )

    file_fields: ClassVar[tuple[str, ...]] = (
        *FileSettings.file_fields,
        "sealing.key_file",
        "sealing.ca_file",
    )

    @property
    def sealing_ca(self) -> Path | None:
        """The roster's trust anchor: ``sealing.ca_file``, else the broker's CA."""
        if self.sealing.ca_file is not None:
            return self.sealing.ca_file
        return self.broker.tls.ca_file if self.broker.tls is not None else None

    @field_validator("site_id")
    @classmethod
    def _not_reserved(cls, site_id: str) -> str:
        if site_id in RESERVED_IDS:
            raise ValueError(f"{site_id!r} is reserved and cannot be a site id")
        return site_id
