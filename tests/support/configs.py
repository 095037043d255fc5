"""Job configs for tests, written compactly: flat keys go to the group that holds them now.

Tests set a handful of fields (``rounds=2, batch_size=16``); this helper files each one under
its group (``rounds.count``, ``training.batch_size``) using the same table that makes
``JobConfig`` refuse the flat layout, so tests and the refusal never disagree.
"""

from __future__ import annotations

from typing import Any

from aggregator.config import JobConfig


def grouped(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    places = {old.partition(":")[0]: new for old, new in JobConfig.moved_fields.items()}
    for key, value in flat.items():
        if key in places and not (key == "rounds" and isinstance(value, dict)):
            group, field = places[key].split(".")
            out.setdefault(group, {})[field] = value
        else:
            out[key] = value
    return out


def job_config(flat: dict[str, Any], source: str = "<test>") -> JobConfig:
    config: JobConfig = JobConfig.from_mapping(grouped(flat), source)
    return config
