"""Real patient tables built in: cohorts that scikit-survival ships, made into sound tasks.

The cohorts are survival data (a follow-up time and whether the event happened), so each becomes
a binary task the way a prognostic model is judged: *did the event happen within a horizon?*
A patient with the event before the horizon is positive; one followed past the horizon
(event or not) is negative; one censored before the horizon -- lost to follow-up with the
outcome unknown -- is left out, never counted negative (that would teach the model that early
drop-outs are survivors). Features are the cohort's own baseline columns: numbers as they are,
a two-level category as one 0/1 column, more levels one-hot; a missing number becomes a fixed
clinical value plus a missing-indicator column (no statistic of the pooled data).

* ``gbsg2-recurrence``: German Breast Cancer Study Group 2 (Schumacher et al., 1994; 686
  women with node-positive breast cancer): recurrence or death within 3 years, from hormonal
  therapy, age, menopause, tumour size and grade, positive nodes, progesterone and oestrogen
  receptors. 10 features.
* ``whas500-death``: Worcester Heart Attack Study (Hosmer, Lemeshow & May, 2008; 500 patients
  after myocardial infarction): death within 1 year of admission, from age, sex, vital signs,
  BMI, length of stay and complications (heart failure, shock, AV block, atrial
  fibrillation...). 14 features.
* ``flchain-death``: serum free light chains in Olmsted County (Dispenzieri et al., 2012; 7,874
  residents): death within 5 years of the blood sample, from age, sex, the kappa and lambda
  light chains, their decile group, creatinine and MGUS. Its ``chapter`` column (the cause of
  death) is dropped: it is the outcome. 9 features.

Left out: ``aids`` (ACTG 320), whose follow-up ends at about a year for most patients, so a
fixed horizon censors nearly every negative; ``veterans`` (137 patients), too few to divide
among sites.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

CLASSES = ("no event", "event")


@dataclass(frozen=True)
class ClinicalTable:
    """One cohort as a task: where it comes from, what counts as the event, by when."""

    loader: str  # sksurv.datasets function (the encoded width: names.TABLE_FEATURES)
    event: str  # the structured outcome's fields
    time: str
    horizon_days: float
    dropped: tuple[str, ...] = ()  # columns that are (or reveal) the outcome
    missing_fill: tuple[tuple[str, float], ...] = ()  # column -> a fixed clinical value
    ordinal: tuple[str, ...] = ()  # categories that are ordered numbers (deciles, years)
    provenance: str = ""


TABLES: dict[str, ClinicalTable] = {
    "gbsg2-recurrence": ClinicalTable(
        "load_gbsg2",
        "cens",
        "time",
        3 * 365.25,
        provenance="GBSG2, Schumacher et al. 1994 (scikit-survival's load_gbsg2)",
    ),
    "whas500-death": ClinicalTable(
        "load_whas500",
        "fstat",
        "lenfol",
        365.25,
        provenance="WHAS500, Hosmer, Lemeshow & May 2008 (scikit-survival's load_whas500)",
    ),
    "flchain-death": ClinicalTable(
        "load_flchain",
        "death",
        "futime",
        5 * 365.25,
        dropped=("chapter",),
        missing_fill=(("creatinine", 1.0),),  # mg/dL: a normal adult value
        ordinal=("flc.grp", "sample.yr"),
        provenance="flchain, Dispenzieri et al. 2012 (scikit-survival's load_flchain)",
    ),
}


@dataclass(frozen=True)
class Table:
    x: torch.Tensor  # float32 [n, features]
    y: torch.Tensor  # int64 [n]: 1 = the event within the horizon
    features: tuple[str, ...]
    excluded: int  # censored before the horizon


def load_table(name: str) -> Table:
    """The cohort ``name`` as features and labels (``KeyError`` for an unknown name)."""
    spec = TABLES[name]
    from sksurv import datasets  # noqa: PLC0415 - only the built-in tables need it

    loader: Callable[[], tuple[Any, np.ndarray]] = getattr(datasets, spec.loader)
    frame, outcome = loader()
    event = outcome[spec.event].astype(bool)
    time = outcome[spec.time].astype(np.float64)
    positive = event & (time <= spec.horizon_days)
    known = positive | (time > spec.horizon_days)
    columns, names = _encode(frame.drop(columns=list(spec.dropped)), spec)
    x = np.stack(columns, axis=1)[known]
    return Table(
        torch.tensor(x, dtype=torch.float32),
        torch.tensor(positive[known].astype(np.int64)),
        tuple(names),
        int((~known).sum()),
    )


def _encode(frame: Any, spec: ClinicalTable) -> tuple[list[np.ndarray], list[str]]:
    """Numbers as they are; two-level categories as one 0/1 column; more levels one-hot."""
    fills = dict(spec.missing_fill)
    columns: list[np.ndarray] = []
    names: list[str] = []
    for name in sorted(frame.columns):
        series = frame[name]
        if name in spec.ordinal:
            columns.append(series.astype(str).astype(float).to_numpy())
            names.append(name)
        elif hasattr(series, "cat"):
            levels = list(series.cat.categories)
            kept = levels[1:] if len(levels) == 2 else levels
            for level in kept:
                columns.append((series == level).to_numpy(dtype=np.float64))
                names.append(f"{name}={level}")
        else:
            values = series.to_numpy(dtype=np.float64)
            missing = np.isnan(values)
            if missing.any():
                values = np.where(missing, fills[name], values)
                columns.append(missing.astype(np.float64))
                names.append(f"{name} missing")
            columns.append(values)
            names.append(name)
    return columns, names
