"""Loading the two processes' YAML files, and the settings groups both of them use.

Both files are YAML whose every field can be overridden by an environment variable, which is
how containers are configured: ``MEDSPLIT_ROUNDS__COUNT=10``, ``MEDSPLIT_BROKER__URL=mqtts://…``,
``MEDSPLIT_TRAINING__OPTIMIZER__LR=0.01`` (nested fields joined by ``__``). Environment wins.

Settings are grouped by concern, as kopf groups its settings: ``broker`` (how to reach and
treat the broker), ``waits`` (how patient a process is and how often it says what it waits
for), and, per process, ``rounds``/``training``/``state`` (aggregator, ``aggregator.config``) or
``data``/``state`` (site, ``edge_agent.config``). Every field is documented where it is
declared; docs/configuration.md is the reference. A field from the flat layout of medsplit 0.1
is refused with the name of its new place.

Nothing here imports torch: a typo in a file is reported before the heavy libraries load.
Any problem is a ``ConfigError`` naming the file and the field.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from medsplit.transport.settings import MqttSettings, TlsSettings
from models.config_errors import ConfigError, load_yaml_mapping, validate

# training.micro_batches at most: a pipelined step cut finer buys no overlap, only messages.
MAX_MICRO_BATCHES = 64

# Where a party's layers run (medsplit.devices.pick_device), and in which precision
# (medsplit.precision): named here so that reading a config does not load torch.
DeviceChoice = Annotated[str, StringConstraints(pattern=r"^(auto|cpu|cuda|cuda:\d+)$")]
Precision = Literal["fp32", "bf16", "fp16"]


def _as_in_transport(name: str) -> Any:
    """The transport's own field (default, bounds, description), so the two never drift."""
    return MqttSettings.model_fields[name]


class BrokerConfig(BaseModel):
    """Where the broker is, how to authenticate to it, and how patient to be with it.

    The timing and buffering fields are the transport's own (``MqttSettings``), exposed here so
    that a site.yaml or job.yaml can reach every one of them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field("mqtt://127.0.0.1:1883", description="mqtt://host:port or mqtts://host:port")
    tls: TlsSettings | None = Field(
        None, description="ca_file, cert_file, key_file: mutual TLS (docs/transport.md)"
    )
    insecure: bool = Field(
        False,
        description="allow a plaintext mqtt:// broker (no TLS: anyone on the path reads and "
        "forges every message); only for a broker on this machine's loopback",
    )
    username: str | None = Field(None, description="for brokers with password authentication")
    password: SecretStr | None = Field(None, description="never logged")
    client_id: str | None = Field(None, description="default: derived from the job and site ids")
    protocol: Literal["5", "3.1.1"] = Field(
        "5", description="3.1.1 only for brokers without MQTT 5"
    )
    keepalive_s: int = _as_in_transport("keepalive_s")
    connect_timeout_s: float = _as_in_transport("connect_timeout_s")
    retry_for_s: float | None = _as_in_transport("retry_for_s")
    publish_timeout_s: float = _as_in_transport("publish_timeout_s")
    reconnect_min_s: int = _as_in_transport("reconnect_min_s")
    reconnect_max_s: int = _as_in_transport("reconnect_max_s")
    session_expiry_s: int = _as_in_transport("session_expiry_s")
    max_inflight: int = _as_in_transport("max_inflight")
    inbox_max_bytes: int = _as_in_transport("inbox_max_bytes")

    @field_validator("url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        if not url.startswith(("mqtt://", "mqtts://")):
            raise ValueError(f"{url!r} must start with mqtt:// or mqtts://")
        return url

    @model_validator(mode="after")
    def _one_of_tls_or_insecure(self) -> BrokerConfig:
        if self.insecure and (self.tls is not None or self.url.startswith("mqtts://")):
            raise ValueError("insecure: true contradicts TLS (mqtts:// or tls): drop one")
        return self

    def settings(self, default_client_id: str, **overrides: Any) -> MqttSettings:
        """The transport's settings for one connection of this process.

        Raises ``ConfigError`` for a plaintext broker unless ``insecure: true`` says so: a
        process never falls back to plaintext silently."""
        if self.tls is None and not self.insecure:
            raise ConfigError(
                "broker",
                [
                    (
                        "broker.tls",
                        f"{self.url} would be plaintext: give broker.tls (mqtts://, see "
                        "`medsplit provision`), or set broker.insecure: true for a loopback "
                        "broker",
                    )
                ],
            )
        fields: dict[str, Any] = self.model_dump(
            exclude={"url", "username", "password", "client_id", "tls", "insecure"}
        )
        fields |= {"client_id": self.client_id or default_client_id, "tls": self.tls}
        if self.username is not None:
            fields["username"] = self.username
            fields["password"] = self.password
        return MqttSettings.from_url(self.url, **(fields | overrides))


class OptimizerConfig(BaseModel):
    """The optimizer every segment uses (each segment gets its own instance, on both sides)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["sgd", "adam"] = Field("adam", description="the optimizer algorithm")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd only")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty")


class AggregationSettings(BaseModel):
    """How replies are combined: updates clipped to the round's median norm, then combined.

    By default they are combined by their geometric median; the sample-weighted mean (FedAvg's),
    the coordinate-wise median or the trimmed mean can replace it. They bound what one poisoned
    site can do in parallel rounds (a cyclic turn has one reply, so they change nothing there).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["mean", "median", "trimmed-mean", "geometric-median"] = Field(
        "geometric-median",
        description="geometric-median: the point nearest to all updates (RFA), unweighted; "
        "mean: sample-weighted (FedAvg); median: coordinate-wise median; trimmed-mean: "
        "coordinate-wise mean without the trim_fraction highest and lowest",
    )
    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="trimmed-mean: share cut at each end (at least one site)"
    )
    clip_norm: float | None = Field(
        None,
        gt=0,
        description="scale each site's update (its weights minus the round's) down to at most "
        "this L2 norm before combining; default: no clipping",
    )
    median_norm_clip: float | None = Field(
        1.0,
        gt=0,
        description="scale each site's update down to at most this multiple of the round's "
        "median update norm before combining, so that one site cannot pull harder than a "
        "typical one (docs/security.md); null: off, the plain FedAvg mean",
    )


# split-u: noise on the returned gradients, as a multiple of the batch's mean gradient norm,
# unless the job says otherwise (docs/privacy.md has the measurements behind the choice).
DEFAULT_LABEL_NOISE = 0.5


class DefenseSettings(BaseModel):
    """What every site does to the cut-layer tensors it sends, against a curious aggregator.

    In ``split-u`` the gradients a site returns carry noise by default (``gradient_noise``:
    ``DEFAULT_LABEL_NOISE``), which blurs the labels they reveal; everything else is off by
    default. docs/privacy.md measures what each setting buys and costs. They apply to split
    and split-u only: federated modes send weights, not activations.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    nopeek_alpha: float = Field(
        0.0,
        ge=0,
        le=100,
        description="NoPeek: weight of the distance correlation between a batch's inputs and "
        "its activations, added to the site's loss (arXiv 2008.09161)",
    )
    activation_noise: float = Field(
        0.0,
        ge=0,
        le=100,
        description="Gaussian mechanism on every activation a site sends: each sample's "
        "activation is clipped to L2 norm activation_clip and noised with this multiple of "
        "it (sigma); the site's (epsilon, delta) is accounted (Opacus RDP)",
    )
    activation_clip: float | None = Field(
        None,
        gt=0,
        le=1e6,
        description="the L2 norm each sample's activation is clipped to (the mechanism's "
        "sensitivity); required with activation_noise",
    )
    gradient_noise: float | None = Field(
        None,
        ge=0,
        le=100,
        description="split-u: Gaussian noise added to the gradients a site returns, as a "
        "multiple of the batch's mean gradient norm; hides labels from the norm and cosine "
        "attacks (vertical, top at the aggregator: added by the aggregator to the gradients "
        f"it returns to the parties without labels); default {DEFAULT_LABEL_NOISE} in split-u "
        "and vertical, 0 elsewhere",
    )
    label_epsilon: float | None = Field(
        None,
        gt=0,
        le=50,
        description="split (labels travel): randomised response, each training label sent "
        "replaced once per job with this epsilon of label differential privacy",
    )
    delta: float = Field(
        1e-5, gt=0, lt=1, description="the delta of the (epsilon, delta) a site reports"
    )
    epsilon_budget: float | None = Field(
        None,
        gt=0,
        description="a site trains no round that would take its epsilon past this budget",
    )

    @model_validator(mode="after")
    def _mechanism_complete(self) -> DefenseSettings:
        if self.activation_noise and self.activation_clip is None:
            raise ValueError(
                "activation_clip: required with activation_noise (the Gaussian mechanism "
                "clips each sample's activation to this norm, then adds noise of "
                "activation_noise x this norm)"
            )
        if self.epsilon_budget is not None and not self.accounted:
            raise ValueError(
                "epsilon_budget: nothing is accounted; it needs activation_noise (with "
                "activation_clip) or label_epsilon"
            )
        return self

    @property
    def accounted(self) -> bool:
        """Whether the site has an epsilon to report (a clipped Gaussian mechanism or
        randomised response)."""
        return bool(self.activation_noise) or self.label_epsilon is not None

    @property
    def label_noise(self) -> float:
        return self.gradient_noise or 0.0

    @property
    def active(self) -> bool:
        return bool(
            self.nopeek_alpha
            or self.activation_noise
            or self.label_noise
            or self.label_epsilon is not None
        )

    def for_mode(self, gradients_tell_labels: bool) -> DefenseSettings:
        """These settings with the mode's default filled in: noise on returned gradients where
        they tell of labels someone does not hold (``medsplit.modes.gradients_tell_labels``:
        ``split-u``, vertical jobs), none elsewhere."""
        if self.gradient_noise is not None:
            return self
        default = DEFAULT_LABEL_NOISE if gradients_tell_labels else 0.0
        return self.model_copy(update={"gradient_noise": default})

    def label(self) -> str:
        """A short name for tables: ``none``, ``nopeek 0.5``, ``noise 0.3 + grad-noise 1``."""
        parts = [
            f"{name} {value:g}"
            for name, value in (
                ("nopeek", self.nopeek_alpha),
                ("noise", self.activation_noise),
                ("clip", self.activation_clip or 0.0),
                ("grad-noise", self.label_noise),
                ("label-eps", self.label_epsilon or 0.0),
            )
            if value
        ]
        if self.gradient_noise is None:  # the mode's default protection, on top
            parts.insert(0, "default")
        return " + ".join(parts) or "none"


class WaitSettings(BaseModel):
    """How often a waiting process says what it is waiting for (never silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status_interval_s: float = Field(
        10.0, gt=0, description="while waiting, log what for (whom, which round) this often"
    )
    retry_interval_s: float = Field(
        5.0,
        gt=0,
        description="a request not answered this long is sent again (same message id, so it is "
        "never applied twice), then at doubling intervals: what recovers a message lost in a "
        "broker restart",
    )
    reassembly_timeout_s: float = Field(
        60.0,
        gt=0,
        description="a chunked message whose next chunk does not come within this is dropped, "
        "and the memory its chunks held is given back",
    )


class FileSettings(BaseSettings):
    """A process's settings: YAML values as init arguments; environment variables override."""

    model_config = SettingsConfigDict(
        env_prefix="MEDSPLIT_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    # Fields of medsplit 0.1's flat layout, and where each one lives now.
    moved_fields: ClassVar[Mapping[str, str]] = {}

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
        return cls.from_mapping(data, str(path), base=Path(path).parent)

    @classmethod
    def from_mapping(
        cls, data: dict[str, Any], source: str = "<config>", *, base: Path | None = None
    ) -> Any:
        """Validate ``data``; relative file references are resolved against ``base``."""
        cls._refuse_moved_fields(data, source)
        return cls.validated(cls.resolve_paths(dict(data), base), source)

    @classmethod
    def validated(cls, data: dict[str, Any], source: str) -> Any:
        """Hook for subclasses that validate in more than one pass."""
        return validate(cls, data, source)

    # Dotted fields naming files: a relative one means "next to the config file", so a kit
    # folder from `medsplit provision` works wherever it is copied.
    file_fields: ClassVar[tuple[str, ...]] = (
        "broker.tls.ca_file",
        "broker.tls.cert_file",
        "broker.tls.key_file",
    )

    @classmethod
    def resolve_paths(cls, data: dict[str, Any], base: Path | None) -> dict[str, Any]:
        """Relative paths of ``file_fields`` are taken relative to the config file's folder."""
        if base is None:
            return data
        data = copy.deepcopy(data)  # the caller's nested mappings stay as they were
        for dotted in cls.file_fields:
            *parents, name = dotted.split(".")
            holder: Any = data
            for part in parents:
                holder = holder.get(part) if isinstance(holder, dict) else None
            if isinstance(holder, dict) and isinstance(holder.get(name), str):
                path = Path(holder[name])
                if not path.is_absolute():
                    holder[name] = str(base / path)
        return data

    @classmethod
    def _refuse_moved_fields(cls, data: Mapping[str, Any], source: str) -> None:
        problems = []
        for old, new in cls.moved_fields.items():
            head, _, rest = old.partition(":")  # "rounds:int": only when it is not a mapping
            if head in data and not (rest == "scalar" and isinstance(data[head], Mapping)):
                problems.append((head, f"moved: this setting is now {new} (docs/configuration.md)"))
        if problems:
            raise ConfigError(source, problems)
