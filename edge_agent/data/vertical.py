"""A vertical party's records: its own columns of patients it shares with other parties.

A party of a vertical job holds a table keyed by a patient identifier: its columns only (a
table's, or an image per patient), and the labels if it is the label party. Nothing is split
into training and held-out rows until the parties have aligned (``edge_agent.alignment``):
then every party keeps its rows of the common patients, in the one order they agree on, holds
out the same patients (drawn from the job seed), and standardises its own columns over its
training rows -- statistics no other party needs, so none leaves the site.

``builtin-vertical`` divides a built-in dataset's columns between parties, each party holding
a seeded share of the patients, so that alignment has patients to leave out: a table's columns
in contiguous blocks, or, for ``synthetic-cxr``, a clinic's table of the patients (party 0) and
their radiographs (party 1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_agent.alignment import job_salt, salted_keys
from edge_agent.data.site_data import DataError, SiteData
from edge_agent.data.synthetic import CXR_FINDINGS, cxr_findings
from medsplit.statistics import FeatureSums

DEMO_KEY_SECRET = b"medsplit built-in vertical data"  # built-in data only: not a secret
IMAGE_PARTIES = 2  # a built-in image dataset: a clinic's table (party 0), the images (party 1)


@dataclass(frozen=True)
class PartyTable:
    """Rows of one party, one per patient: the key, its columns, and (label party) labels."""

    keys: tuple[str, ...]
    x: torch.Tensor  # (N, *the party's input shape)
    y: torch.Tensor | None  # the label party's; None elsewhere
    key_column: str
    source: str  # the file or dataset, for messages
    key_secret: bytes  # shared by the parties, never by the aggregator (alignment.job_salt)
    columns: tuple[str, ...] = ()
    standardised: int | None = None  # leading columns standardised (tables: the numeric); None: all

    def salted(self, job_id: str) -> list[str]:
        """Each row's key, salted for ``job_id`` and hashed; missing or repeated keys refused."""
        return salted_keys(
            list(self.keys),
            job_salt(self.key_secret, job_id),
            column=self.key_column,
            source=self.source,
        )

    def provisional(self) -> SiteData:
        """What the party declares before alignment: every row, none held out yet."""
        y = self.y if self.y is not None else torch.zeros(len(self.keys), dtype=torch.int64)
        return SiteData(self.x, y, self.x[:0], y[:0])

    def aligned(self, rows: list[int], seed: int, holdout: float, standardise: bool) -> SiteData:
        """The party's rows of the common patients, in the common order: the same patients
        held out at every party (from the job seed), and its own columns standardised over its
        training rows when the job asks for it."""
        test = held_out(len(rows), seed, holdout)
        index = torch.tensor(rows, dtype=torch.int64)
        train_rows, test_rows = index[~test], index[test]
        y = self.y if self.y is not None else torch.zeros(len(self.keys), dtype=torch.int64)
        data = SiteData(self.x[train_rows], y[train_rows], self.x[test_rows], y[test_rows])
        if not standardise:
            return data
        width = self.standardised
        mean, std = FeatureSums.combine([FeatureSums.of_inputs(data.x_train[:, :width])])
        return dataclasses.replace(
            data,
            x_train=_standardised(data.x_train, mean, std, width),
            x_test=_standardised(data.x_test, mean, std, width),
        )


def held_out(count: int, seed: int, fraction: float) -> torch.Tensor:
    """Which of ``count`` common patients are held out: the same at every party."""
    if count < 2:
        raise DataError(f"{count} patient(s) in common: too few to train and evaluate on")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 7)
    chosen = torch.randperm(count, generator=generator)[: max(1, round(count * fraction))]
    mask = torch.zeros(count, dtype=torch.bool)
    mask[chosen] = True
    return mask


def _standardised(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, width: int | None
) -> torch.Tensor:
    """Per column (tables: the first ``width``, the numeric ones) or per channel (images)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scaled = (x[:, :width] - mean.reshape(shape)) / std.reshape(shape)
    return scaled if width is None else torch.cat([scaled, x[:, width:]], dim=1)


def read_key_secret(path: Path) -> bytes:
    """The parties' shared secret (``key_secret_file``): at least 16 bytes, so that no one
    without it can hash guesses of identifiers and compare them with the keys that travel."""
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise DataError(f"key_secret_file: cannot read {path} ({exc.strerror})") from None
    if len(secret) < 16:
        raise DataError(
            f"key_secret_file: {path} holds {len(secret)} bytes; the parties' shared secret "
            "needs at least 16 (e.g. openssl rand -hex 32)"
        )
    return secret


def builtin_party(
    dataset: str, parties: int, index: int, *, labels: bool, coverage: float, seed: int
) -> PartyTable:
    """Party ``index`` of ``parties`` over a built-in dataset, for a seeded ``coverage`` share
    of its patients (keys ``<dataset>-0001``...): a contiguous block of a table's columns, or
    synthetic-cxr's clinical table (index 0) or radiographs (index 1)."""
    x, y, names = _party_columns(dataset, parties, index)
    rng = np.random.default_rng(seed * 7_919 + index)
    count = len(y)
    held = np.sort(rng.choice(count, size=max(2, round(coverage * count)), replace=False))
    rows = torch.from_numpy(held)
    return PartyTable(
        keys=tuple(f"{dataset}-{row + 1:04d}" for row in held),
        x=x[rows].contiguous(),
        y=y[rows] if labels else None,
        key_column="patient_id",
        source=f"built-in {dataset}",
        key_secret=DEMO_KEY_SECRET,
        columns=names,
    )


def _party_columns(
    dataset: str, parties: int, index: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Every patient's records held by party ``index``, the labels, and the column names."""
    from edge_agent.data.datasets import load  # noqa: PLC0415 -- scikit-learn

    table = load(dataset)
    if len(table.input_shape) == 1:
        columns = np.array_split(np.arange(table.input_shape[0]), parties)[index]
        names = tuple(table.feature_names[c] for c in columns) if table.feature_names else ()
        return table.x[:, torch.from_numpy(columns)], table.y, names
    if parties != IMAGE_PARTIES:
        raise DataError(
            f"{dataset}: builtin-vertical gives its images to one party and a clinical table "
            f"of the same patients to another, so parties must be {IMAGE_PARTIES}, not {parties}"
        )
    if index == 1:
        return table.x, table.y, ()
    return cxr_findings(table.y), table.y, tuple(name for name, *_ in CXR_FINDINGS)
