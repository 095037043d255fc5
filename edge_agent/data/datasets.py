"""Built-in datasets and how they are divided among sites.

* ``breast-cancer``: scikit-learn's Wisconsin diagnostic set (569 real patients x 30 features,
  binary). Shipped inside scikit-learn, so nothing is downloaded.
* ``gbsg2-recurrence``, ``whas500-death``, ``flchain-death``: real cohorts that
  scikit-survival ships, as "event within a horizon" tasks (``edge_agent.data.clinical_tables``).
* ``synthetic-cxr``: chest-radiograph-like 1x64x64 images with or without a round lesion,
  generated from a seed, written as DICOM once and read back through the ``dicom`` source
  (``edge_agent.data.builtin_dicom``), as a hospital's images are.

``all_sites`` gives every site its share: a partition of the dataset (``edge_agent.data.partitions``),
then a stratified train/test split of each share, then standardisation (per feature, or per
image channel) with statistics combined from every site's count, sum and sum of squares --
never raw values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

from edge_agent.data.builtin_dicom import BUILTIN_PREPROCESSING, LABELS, synthetic_cxr_from_dicom
from edge_agent.data.clinical_tables import CLASSES, TABLES, load_table
from edge_agent.data.inputs import DataCard, FeatureInput, ImageInput
from edge_agent.data.names import DATASETS, check_name, parse_scheme
from edge_agent.data.partitions import Scanner, partition
from edge_agent.data.settings import Preprocessing
from edge_agent.data.site_data import SiteData
from edge_agent.data.synthetic import synthetic_cxr
from medsplit.statistics import FeatureSums

__all__ = [
    "DATASETS",
    "Dataset",
    "SiteData",
    "all_sites",
    "load",
    "partition",
    "pooled",
    "share",
    "synthetic_cxr",
]


@dataclass(frozen=True)
class Dataset:
    name: str
    x: torch.Tensor  # float32, (n, *input_shape)
    y: torch.Tensor  # int64, (n,)
    num_classes: int
    classes: tuple[str, ...] = ()
    feature_names: tuple[str, ...] = ()  # tabular data
    preprocessing: Preprocessing | None = None  # images: how they were read from DICOM

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


def load(name: str, *, seed: int = 0) -> Dataset:
    check_name(name)
    if name == "breast-cancer":
        bunch = load_breast_cancer()
        x = torch.tensor(bunch.data, dtype=torch.float32)
        y = torch.tensor(bunch.target, dtype=torch.int64)
        return Dataset(
            name,
            x,
            y,
            num_classes=2,
            classes=tuple(str(c) for c in bunch.target_names),
            feature_names=tuple(str(f) for f in bunch.feature_names),
        )
    if name in TABLES:
        table = load_table(name)
        return Dataset(
            name, table.x, table.y, num_classes=2, classes=CLASSES, feature_names=table.features
        )
    # synthetic-cxr: generated, written as DICOM once, read back through the dicom source.
    x, y = synthetic_cxr_from_dicom(1200, seed=seed)
    return Dataset(name, x, y, num_classes=2, classes=LABELS, preprocessing=BUILTIN_PREPROCESSING)


def site_data(
    dataset: Dataset,
    indices: np.ndarray,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> SiteData:
    """One site's train/test split (stratified when possible), not yet standardised."""
    y = dataset.y[indices].numpy()
    stratify = y if min(np.bincount(y, minlength=dataset.num_classes)) >= 2 else None
    train_idx, test_idx = train_test_split(
        indices, test_size=test_fraction, random_state=seed, stratify=stratify
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return SiteData(
        dataset.x[train_idx], dataset.y[train_idx], dataset.x[test_idx], dataset.y[test_idx]
    )


def _standardise(dataset: Dataset, shares: list[SiteData]) -> list[SiteData]:
    """Standardise every site with statistics combined from all sites' sums.

    Tabular data per feature; images per channel (one intensity scale for all pixels), which
    keeps every site's scanner differences while putting intensities on a scale a network
    trains well from.
    """
    mean, std = FeatureSums.combine([FeatureSums.of_inputs(s.x_train) for s in shares])
    card = _card(dataset, mean, std)
    if len(dataset.input_shape) == 3:
        mean, std = mean.view(-1, 1, 1), std.view(-1, 1, 1)
    return [
        SiteData((s.x_train - mean) / std, s.y_train, (s.x_test - mean) / std, s.y_test, card)
        for s in shares
    ]


def _card(dataset: Dataset, mean: torch.Tensor, std: torch.Tensor) -> DataCard:
    """The encoding of a built-in dataset: its standardisation folded into the record."""
    if dataset.preprocessing is not None:  # one channel: the scalar mean/std of Preprocessing
        preprocessing = dataset.preprocessing.model_copy(
            update={"mean": float(mean[0]), "std": float(std[0])}
        )
        return DataCard(
            input=ImageInput(preprocessing=preprocessing), classes=list(dataset.classes)
        )
    features = FeatureInput(
        numeric=list(dataset.feature_names), mean=mean.tolist(), std=std.tolist()
    )
    return DataCard(input=features, classes=list(dataset.classes))


def all_sites(
    dataset: Dataset, num_sites: int, scheme: str, *, seed: int = 0, test_fraction: float = 0.2
) -> list[SiteData]:
    """Every site's share: partitioned, split, passed through its scanner, standardised."""
    parts = partition(dataset.y, num_sites, scheme, seed=seed)
    shares = [
        _with_scanner(
            dataset,
            site_data(dataset, idx, test_fraction=test_fraction, seed=seed),
            scheme,
            index,
            seed,
        )
        for index, idx in enumerate(parts)
    ]
    return _standardise(dataset, shares)


def _with_scanner(dataset: Dataset, data: SiteData, scheme: str, index: int, seed: int) -> SiteData:
    """Under ``feature-shift``, pass a site's images through its own scanner."""
    if not parse_scheme(scheme).shifts_features:
        return data
    if len(dataset.input_shape) != 3:
        raise ValueError(f"partition feature-shift applies to image datasets, not {dataset.name!r}")
    scanner = Scanner.for_site(index, seed)
    return SiteData(
        scanner.apply(data.x_train, seed * 7919 + 2 * index),
        data.y_train,
        scanner.apply(data.x_test, seed * 7919 + 2 * index + 1),
        data.y_test,
    )


def pooled(sites: list[SiteData]) -> SiteData:
    """Everything in one place, for the centralized baseline (each site's test split kept apart)."""
    return SiteData(
        torch.cat([s.x_train for s in sites]),
        torch.cat([s.y_train for s in sites]),
        torch.cat([s.x_test for s in sites]),
        torch.cat([s.y_test for s in sites]),
        sites[0].card,
    )


def share(
    name: str,
    partition_scheme: str,
    num_sites: int,
    index: int,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> SiteData:
    """Site ``index``'s share of a built-in dataset: what one agent loads in the demo.

    The standardisation statistics are combined from every share's sums, as a federated
    statistics round would; for built-in data the agent can compute them itself.
    """
    dataset = load(name, seed=seed)
    shares = all_sites(dataset, num_sites, partition_scheme, seed=seed, test_fraction=test_fraction)
    return shares[index]
