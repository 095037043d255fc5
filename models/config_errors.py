"""One error type for every declarative file medsplit reads (plans, jobs, sites).

Why: pydantic's errors are precise but verbose; a hospital IT person editing YAML needs the
file, the dotted field and what was expected, one problem per line. Every loader in the project
raises ``ConfigError`` so that the command line can print it without a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # pydantic and yaml load when a file is read, not when errors are named
    from pydantic import BaseModel, ValidationError

ModelT = TypeVar("ModelT", bound="BaseModel")


class ConfigError(ValueError):
    """A configuration source was missing, unreadable or invalid.

    ``problems`` holds ``(field, message)`` pairs; ``field`` is dotted (``model.args.hidden``)
    or empty when the whole source is at fault.
    """

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = [
            f"{source}: {field}: {msg}" if field else f"{source}: {msg}" for field, msg in problems
        ]
        super().__init__("\n".join(lines))

    @classmethod
    def from_validation_error(cls, error: ValidationError, source: str) -> ConfigError:
        problems = []
        for item in error.errors(include_url=False):
            field = ".".join(str(part) for part in item["loc"])
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                message = "unknown field (check the spelling)"
            problems.append((field, message))
        return cls(source, problems)


class ModelError(ValueError):
    """A model that cannot be used as asked: a factory not allowed or not importable, weights
    that do not fit, a network that cannot be traced or cut, segments that do not recompose or
    export. The message names the field, file or module; the command line prints it as one
    line."""


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file whose top level must be a mapping; every failure is a ConfigError."""
    import yaml  # noqa: PLC0415

    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, [("", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [("", f"cannot read file: {exc}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [("", f"invalid YAML: {exc}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            source, [("", f"expected a mapping at the top level, got {type(data).__name__}")]
        )
    return dict(data)


def validate(model: type[ModelT], data: Mapping[str, Any], source: str) -> ModelT:
    """``model.model_validate(data)``, with any failure turned into a ConfigError for ``source``."""
    from pydantic import ValidationError  # noqa: PLC0415

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError.from_validation_error(exc, source) from None
