"""Write docs/configuration.md from the config models themselves: every field, grouped, with its
type, default and description. ``tests/unit/test_config_reference.py`` fails when the page and
the models disagree, so the reference cannot drift from the code.

    python scripts/config_reference.py            # rewrite docs/configuration.md
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"

INTRO = """# Configuration reference

Two files configure a deployment: `job.yaml` for the aggregator (`medsplit aggregator --config`)
and `site.yaml` for each hospital's agent (`medsplit agent --config`). Settings are grouped by
concern; every field below can also be set by an environment variable, `MEDSPLIT_` and the
field's path in capitals joined by `__` (`MEDSPLIT_ROUNDS__COUNT=30`,
`MEDSPLIT_BROKER__URL=mqtts://broker:8883`, `MEDSPLIT_WAITS__STATUS_INTERVAL_S=30`); the
environment wins over the file.

Files are validated before anything else runs, and before any model code loads, so a typo is
reported at once, naming the file and the field. A field of medsplit 0.1's flat layout
(`rounds: 5`, `round_deadline_s`, `batch_size`, `state_dir`, ...) is refused with the name of its
new place (`rounds: moved: this setting is now rounds.count`).

This page is generated from the models (`python scripts/config_reference.py`).
"""


def _data_sources() -> list[str]:
    """The tags of the site's data union, in its order."""
    from edge_agent.config import SiteDataConfig  # noqa: PLC0415

    union = get_args(SiteDataConfig)[0]
    return [get_args(member)[1].tag for member in get_args(union)]


def _type_name(annotation: Any) -> str:  # noqa: PLR0911 - one return per kind of type
    """A reader's name for a type: ``int or null``, ``list of str``, ``'sgd' or 'adam'``."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is None:
        if isinstance(annotation, type) and issubclass(annotation, Enum):
            return " or ".join(repr(m.value) for m in annotation)
        name = getattr(annotation, "__name__", str(annotation))
        return {"NoneType": "null", "Path": "path", "SecretStr": "secret"}.get(name, name)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (Union, UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return "mapping"
    return str(origin)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "(group)"
    shown = value.value if isinstance(value, Enum) else value
    return "`null`" if shown is None else f"`{shown}`"


def _rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = field.annotation
        if name == "plan":
            rows.append(
                f"| `{path}` | plan | required | {field.description} ([models and plans](models-and-plans.md)) |"
            )
            continue
        if name == "data":
            rows.append(
                f"| `{path}` | data source | builtin share | {field.description} ([data](data.md)) |"
            )
            continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            doc = (annotation.__doc__ or "").strip().splitlines()[0]
            rows.append(f"| **`{path}`** | group | | {doc} |")
            rows += _rows(annotation, f"{path}.")
            continue
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{path}` | {_type_name(annotation)} | {_default(field)} | {description} |")
    return rows


def render() -> str:
    from aggregator.config import JobConfig  # noqa: PLC0415
    from edge_agent.config import SiteConfig  # noqa: PLC0415

    parts = [INTRO]
    for title, model in (("job.yaml", JobConfig), ("site.yaml", SiteConfig)):
        parts.append(f"## `{title}`\n\n{(model.__doc__ or '').strip()}\n")
        parts.append("| field | type | default | meaning |\n|---|---|---|---|")
        parts.append("\n".join(_rows(model)) + "\n")
        moved = getattr(model, "moved_fields", {})
        if moved:
            parts.append("Moved from the flat layout of medsplit 0.1:\n")
            parts.append(
                "\n".join(f"- `{old.partition(':')[0]}` -> `{new}`" for old, new in moved.items())
                + "\n"
            )
    sources = ", ".join(f"`{tag}`" for tag in _data_sources())
    parts.append(
        f"The `data` section of a site takes one of these sources: {sources}; "
        "each is documented field by field in [data](data.md).\n"
    )
    return "\n".join(parts)


if __name__ == "__main__":
    PAGE.write_text(render())
    print(PAGE, file=sys.stderr)
