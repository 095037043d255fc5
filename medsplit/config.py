"""Validated configuration of the two processes: the job (aggregator) and a site (edge agent).

Both are YAML files whose every field can be overridden by an environment variable, which is
how containers are configured: ``MEDSPLIT_ROUNDS=10``, ``MEDSPLIT_BROKER__URL=mqtts://…``,
``MEDSPLIT_OPTIMIZER__LR=0.01`` (nested fields joined by ``__``). Environment wins over the file.
Any problem is a ``ConfigError`` naming the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    StringConstraints,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from medsplit.csv_source import CsvData
from medsplit.datasets import check_name
from medsplit.dicom_source import DicomData
from medsplit.ids import ID_PATTERN
from medsplit.partitions import SCHEMES, parse_scheme
from medsplit.training import OptimizerConfig
from medsplit.transport import MqttSettings, TlsSettings
from medsplit.wire import WireDtype
from models import ConfigError, SplitPlan, load_plan
from models.config_errors import load_yaml_mapping, validate

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Mode = Literal["split", "split-u", "fedavg", "flop"]
Orchestration = Literal["sequential", "parallel"]


class BrokerConfig(BaseModel):
    """Where the broker is and how to authenticate to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field("mqtt://127.0.0.1:1883", description="mqtt://host:port or mqtts://host:port")
    tls: TlsSettings | None = None
    username: str | None = None
    password: SecretStr | None = None
    client_id: str | None = Field(None, description="default: derived from the job and site ids")
    protocol: Literal["5", "3.1.1"] = Field(
        "5", description="3.1.1 only for brokers without MQTT 5"
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        if not url.startswith(("mqtt://", "mqtts://")):
            raise ValueError(f"{url!r} must start with mqtt:// or mqtts://")
        return url

    def settings(self, default_client_id: str, **overrides: Any) -> MqttSettings:
        fields: dict[str, Any] = {
            "client_id": self.client_id or default_client_id,
            "tls": self.tls,
            "protocol": self.protocol,
        }
        if self.username is not None:
            fields["username"] = self.username
            fields["password"] = self.password
        return MqttSettings.from_url(self.url, **fields, **overrides)


class _EnvFirst(BaseSettings):
    """YAML values come in as init arguments; environment variables override them."""

    model_config = SettingsConfigDict(
        env_prefix="MEDSPLIT_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> Any:
        data = load_yaml_mapping(path)
        data.update(overrides)
        # A relative plan path means "next to this config file", wherever we run from.
        plan = data.get("plan")
        if isinstance(plan, str) and (Path(path).parent / plan).is_file():
            data["plan"] = str(Path(path).parent / plan)
        return cls.from_mapping(data, str(path))

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "<config>") -> Any:
        return validate(cls, data, source)


class JobConfig(_EnvFirst):
    """What the aggregator runs. See docs/split-learning.md and docs/federated.md."""

    job_id: Id
    plan: SplitPlan = Field(description="a built-in plan name, a YAML path, or the plan inline")
    mode: Mode = "split-u"
    orchestration: Orchestration = Field(
        "sequential", description="default: sequential for split modes, parallel for fedavg/flop"
    )
    sample_fraction: float = Field(
        1.0, gt=0, le=1, description="parallel rounds: share of sites asked to train each round"
    )
    rounds: int = Field(5, ge=1, le=100_000, description="epochs of the whole federation")
    local_epochs: int = Field(1, ge=1, le=1000, description="passes over local data per round")
    batch_size: int = Field(32, ge=1, le=65_536)
    optimizer: OptimizerConfig = OptimizerConfig()
    seed: int = 0
    sites: list[Id] = Field(min_length=1, description="site ids expected to take part")
    min_sites: int | None = Field(None, ge=1, description="default: all sites")
    round_deadline_s: float = Field(600.0, gt=0, description="a round closes at this deadline")
    join_deadline_s: float = Field(
        600.0, gt=0, description="how long to wait for sites to say hello"
    )
    wire_dtype: WireDtype = "float32"
    release_trunk: bool = Field(
        True,
        description="split modes: send each site the final trunk, so it can export its model",
    )
    dataset: str = Field("unknown", description="recorded in the report")
    broker: BrokerConfig = BrokerConfig()
    run_dir: Path | None = Field(
        None, description="where report.json and plots go; default runs/JOB_ID"
    )

    @field_validator("plan", mode="before")
    @classmethod
    def _load_plan(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return load_plan(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_orchestration(cls, data: Any) -> Any:
        # Federated rounds are naturally parallel; split learning's classic form is sequential.
        federated = isinstance(data, dict) and data.get("mode") in ("fedavg", "flop")
        if federated and "orchestration" not in data:
            data = {**data, "orchestration": "parallel"}
        return data

    @field_validator("sites")
    @classmethod
    def _unique(cls, sites: list[str]) -> list[str]:
        duplicates = sorted({s for s in sites if sites.count(s) > 1})
        if duplicates:
            raise ValueError(f"site ids must be unique; repeated: {', '.join(duplicates)}")
        return sites

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        if self.mode == "split-u" and not self.plan.u_shaped:
            raise ValueError("mode: split-u needs a plan with a tail (set tail_cut in the plan)")
        if self.mode == "split" and self.plan.u_shaped:
            raise ValueError(
                "mode: split needs a plan without a tail (remove tail_cut, or use split-u)"
            )
        if self.mode == "flop" and not (self.plan.private_keys and self.plan.shared_keys):
            raise ValueError(
                "mode: flop needs a plan with both shared and private layers "
                "(e.g. private: [classifier]); with nothing private use mode: fedavg"
            )
        if self.sample_fraction < 1 and self.orchestration == "sequential":
            raise ValueError(
                "sample_fraction: applies to parallel rounds; sequential rounds visit every site"
            )
        if self.min_sites is not None and self.min_sites > len(self.sites):
            raise ValueError(
                f"min_sites: {self.min_sites} is more than the {len(self.sites)} sites listed"
            )
        return self

    @property
    def quorum(self) -> int:
        return self.min_sites or len(self.sites)

    @property
    def output_dir(self) -> Path:
        return self.run_dir or Path("runs") / self.job_id


class BuiltinData(BaseModel):
    """A share of a built-in dataset: what the demo and the experiments give each site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["builtin"] = "builtin"
    dataset: str = "breast-cancer"
    partition: str = Field("iid", description=SCHEMES)
    num_sites: int = Field(1, ge=1)
    index: int = Field(0, ge=0, description="which share, 0-based")
    seed: int = 0
    test_fraction: float = Field(0.2, gt=0, lt=1)

    _known_dataset = field_validator("dataset")(lambda cls, name: check_name(name))

    @field_validator("partition")
    @classmethod
    def _scheme(cls, scheme: str) -> str:
        parse_scheme(scheme)
        return scheme

    @model_validator(mode="after")
    def _index_in_range(self) -> BuiltinData:
        if self.index >= self.num_sites:
            raise ValueError(f"index: {self.index} is out of range for num_sites={self.num_sites}")
        return self


def _data_source(value: Any) -> str:
    """Which data section this is; ``source`` may be left out for a built-in share."""
    if isinstance(value, dict):
        return str(value.get("source", "builtin"))
    return str(getattr(value, "source", "builtin"))


SiteDataConfig = Annotated[
    Annotated[BuiltinData, Tag("builtin")]
    | Annotated[DicomData, Tag("dicom")]
    | Annotated[CsvData, Tag("csv")],
    Discriminator(_data_source),
]


class SiteConfig(_EnvFirst):
    """What one edge agent runs."""

    site_id: Id
    job_id: Id
    broker: BrokerConfig = BrokerConfig()
    data: SiteDataConfig = BuiltinData()
    device: Literal["cpu", "cuda", "auto"] = "auto"
    state_dir: Path = Field(
        Path("state"), description="this site's layers, its final model and model.onnx live here"
    )
    reply_timeout_s: float = Field(300.0, gt=0, description="give up on a training step after this")
    export_onnx: bool = Field(
        True, description="at the end of a job, export the site's model to state_dir/model.onnx"
    )
    hello_interval_s: float = Field(
        5.0, gt=0, description="repeat hello until the aggregator answers"
    )
