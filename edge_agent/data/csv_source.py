"""An export of EHR features (a CSV table) as one site's training data.

The job fixes the encoding so that every site turns the same record into the same vector:
numeric columns in the listed order, then each categorical column one-hot over its listed
categories (an unseen category is an error, not a new column), then the label mapped through
``classes``. Missing values follow ``missing``: ``fail`` names the row and column, ``drop`` leaves
the row out, ``impute`` uses the feature's mean (numeric, from the job's ``normalization`` when
given) or an all-zero one-hot (categorical). ``normalization`` holds per-feature means and
standard deviations combined from every site's count, sum and sum of squares
(``medsplit data-stats``), never from pooled raw values. Problems name the file, the row and the
column; with ``on_bad_input: skip`` bad rows are counted by reason and left out.
"""

from __future__ import annotations

import csv

import torch

from edge_agent.data.inputs import DataCard, FeatureInput, InputError
from edge_agent.data.settings import CsvData
from edge_agent.data.site_data import (
    Collector,
    DataError,
    LoadSummary,
    SiteData,
    Target,
    absent_classes,
    parse_target,
    split_by_patient,
    targets_tensor,
)
from edge_agent.data.vertical import PartyTable, read_key_secret
from medsplit.statistics import FeatureSums


class _RowError(ValueError):
    def __init__(self, reason: str, detail: str, *, dropped: bool = False) -> None:
        super().__init__(detail)
        self.reason = reason
        self.dropped = dropped  # left out by the missing-value policy, not bad input


def read_rows(config: CsvData) -> tuple[list[dict[str, str]], list[int]]:
    """The table's rows and their line numbers, after checking the header."""
    try:
        handle = config.path.open(newline="")
    except OSError as exc:
        raise DataError(f"{config.path}: cannot read the table ({exc.strerror})") from None
    with handle:
        reader = csv.DictReader(handle)
        found = reader.fieldnames or []
        extra = (config.label_column, config.patient_column, config.key_column)
        wanted = [*config.numeric, *config.categorical, *(c for c in extra if c)]
        missing = [c for c in wanted if c not in found]
        if missing:
            raise DataError(f"{config.path}: missing column(s) {missing}; found {found}")
        rows = list(reader)
    if not rows:
        raise DataError(f"{config.path}: no rows")
    return rows, list(range(2, len(rows) + 2))


def load_csv_site(config: CsvData) -> tuple[SiteData, LoadSummary]:
    rows, lines = read_rows(config)
    summary = LoadSummary(unit="records")
    collect = Collector(config.on_bad_input, summary)
    vectors, labels, patients = [], [], []
    for row, line in zip(rows, lines, strict=True):
        try:
            vector, label = _encode(row, line, config), _label(row, line, config)
        except _RowError as exc:
            if exc.dropped:
                collect.note(exc.reason, str(exc))
            else:
                collect.problem(exc.reason, str(exc))
            continue
        vectors.append(vector)
        labels.append(label)
        patients.append(row[config.patient_column] if config.patient_column else f"row-{line}")
    if not vectors:
        raise DataError(f"{config.path}: no usable rows ({summary.describe()})")
    x, encoding = _impute_and_normalise(torch.tensor(vectors, dtype=torch.float32), config)
    y = targets_tensor(labels)
    absent = absent_classes(y, config.classes)
    if absent:
        collect.problem(
            "class absent at this site", f"{config.path}: no row of class(es) {absent} at this site"
        )
    summary.loaded, summary.patients = len(y), len(set(patients))
    train, test = split_by_patient(patients, config.test_fraction, config.seed)
    card = DataCard(input=encoding, classes=config.classes, multilabel=config.multilabel)
    return SiteData(x[train], y[train], x[test], y[test], card), summary


def _label(row: dict[str, str], line: int, config: CsvData) -> Target:
    if config.label_column is None:
        raise DataError(f"{config.path}: no label_column; a site of a horizontal job needs one")
    label = (row[config.label_column] or "").strip()
    separator = config.label_separator if config.multilabel else None
    try:
        return parse_target(label, config.classes, separator)
    except ValueError as exc:
        raise _RowError(
            "unknown label value", f"{config.path}, row {line}: {config.label_column} {exc}"
        ) from None


def _encode(row: dict[str, str], line: int, config: CsvData) -> list[float]:
    """One record as numbers; NaN marks a missing numeric value to impute."""
    try:
        return feature_input(config).encode_record(row, allow_missing=config.missing == "impute")
    except InputError as exc:
        dropped = exc.reason == "missing value" and config.missing == "drop"
        reason = "missing value (dropped)" if dropped else exc.reason
        raise _RowError(reason, f"{config.path}, row {line}: {exc}", dropped=dropped) from None


def feature_input(config: CsvData, fill: list[float] | None = None) -> FeatureInput:
    """The table's encoding; without ``normalization`` numeric values are not rescaled."""
    norm, width = config.normalization, len(config.numeric)
    return FeatureInput(
        numeric=config.numeric,
        categorical=config.categorical,
        mean=norm.mean if norm else [0.0] * width,
        std=norm.std if norm else [1.0] * width,
        fill=fill,
    )


def _impute_and_normalise(x: torch.Tensor, config: CsvData) -> tuple[torch.Tensor, FeatureInput]:
    """Missing values take the job's mean (or this site's, without ``normalization``)."""
    numeric = x[:, : len(config.numeric)]
    if config.normalization is not None:
        fill = list(config.normalization.mean)
    else:
        present = torch.nan_to_num(numeric, nan=0.0)
        counts = (~numeric.isnan()).sum(0).clamp_min(1)
        fill = (present.sum(0) / counts).tolist()
    encoding = feature_input(config, fill if config.missing == "impute" else None)
    return encoding.standardise(x), encoding


def site_sums(config: CsvData) -> FeatureSums:
    """This site's count and per-feature sums of its numeric columns: safe to share."""
    data, _ = load_csv_site(config.model_copy(update={"normalization": None}))
    x = torch.cat([data.x_train, data.x_test])[:, : len(config.numeric)]
    return FeatureSums.of(x)


def load_csv_party(config: CsvData) -> tuple[PartyTable, LoadSummary]:
    """A vertical party's table: its columns and (label party) labels by patient key. Rows
    are not split here: the parties hold out the same patients once they have aligned."""
    assert config.key_column is not None
    assert config.key_secret_file is not None
    rows, lines = read_rows(config)
    summary = LoadSummary(unit="records")
    collect = Collector(config.on_bad_input, summary)
    vectors, labels, keys = [], [], []
    for row, line in zip(rows, lines, strict=True):
        try:
            vector = _encode(row, line, config)
            label = _label(row, line, config) if config.label_column else None
        except _RowError as exc:
            (collect.note if exc.dropped else collect.problem)(exc.reason, str(exc))
            continue
        vectors.append(vector)
        labels.append(label)
        keys.append(row[config.key_column] or "")
    if not vectors:
        raise DataError(f"{config.path}: no usable rows ({summary.describe()})")
    x, encoding = _impute_and_normalise(torch.tensor(vectors, dtype=torch.float32), config)
    summary.loaded = summary.patients = len(keys)
    table = PartyTable(
        keys=tuple(keys),
        x=x,
        y=targets_tensor(labels) if config.label_column else None,  # type: ignore[arg-type]
        key_column=config.key_column,
        source=str(config.path),
        key_secret=read_key_secret(config.key_secret_file),
        columns=tuple(encoding.features),
        standardised=len(config.numeric),
    )
    return table, summary
