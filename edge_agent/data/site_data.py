"""What every data source hands the agent, and what they share: errors, summary, patient split."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from edge_agent.data.inputs import DataCard
from edge_agent.data.settings import DicomData, PictureData, VolumeData


@dataclass(frozen=True)
class SiteData:
    """A site's tensors, and (``card``) how its source made them, for export and serving."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    card: DataCard | None = None
    # The job's loss weight per class (training.class_weights), from the statistics round.
    class_weights: torch.Tensor | None = None

    @property
    def train_samples(self) -> int:
        return len(self.y_train)


class DataError(ValueError):
    """Site data that cannot be used; the message names the file or row and what was expected."""


@dataclass(frozen=True)
class Intensity:
    """Decoded image intensities of one site (0..1 scale): what to compare between scanners.

    A site whose images all decode dark, or flat, stands out here before it trains a whole job
    at chance level.
    """

    mean: float
    std: float
    low: float  # the 1st percentile of pixel values
    high: float  # the 99th

    @classmethod
    def of(cls, images: torch.Tensor) -> Intensity:
        sample = images.flatten()[:: max(1, images.numel() // 1_000_000)].double()
        low, high = torch.quantile(sample, torch.tensor([0.01, 0.99], dtype=torch.float64))
        return cls(float(sample.mean()), float(sample.std()), float(low), float(high))

    def describe(self) -> str:
        return (
            f"decoded intensity mean {self.mean:.3f}, std {self.std:.3f}, "
            f"1-99% {self.low:.3f}..{self.high:.3f}"
        )


@dataclass
class LoadSummary:
    """What was loaded and what was left out, by reason (no file names: safe to log anywhere)."""

    loaded: int = 0
    patients: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)  # with file names: for the local log only
    intensity: Intensity | None = None  # images only
    retrieval: str | None = None  # from a PACS: what was retrieved, what was on disk already
    unit: str = "images"  # what ``loaded`` counts: images, volumes, records

    def describe(self) -> str:
        parts = [f"{self.loaded} {self.unit} of {self.patients} patients loaded"]
        if self.retrieval is not None:
            parts.append(self.retrieval)
        if self.intensity is not None:
            parts.append(self.intensity.describe())
        parts += [f"{count} skipped: {reason}" for reason, count in sorted(self.skipped.items())]
        return "; ".join(parts)


def split_by_patient(
    patients: list[str], test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test indices such that all images of a patient fall on the same side.

    The same split as scikit-learn's ``GroupShuffleSplit(test_size=test_fraction,
    random_state=seed)`` (a test compares them), written out so that a site reading its own
    records does not import scikit-learn: shuffle the distinct patients with numpy's
    ``RandomState(seed)``, the first ``ceil(test_fraction * patients)`` are the test patients."""
    distinct, patient_of = np.unique(np.asarray(patients), return_inverse=True)
    n_test = math.ceil(test_fraction * len(distinct))
    if n_test >= len(distinct):
        raise DataError(
            f"{len(distinct)} patient(s) with test_fraction {test_fraction}: "
            "no patient would be left for training"
        )
    order = np.random.RandomState(seed).permutation(len(distinct))
    test = np.flatnonzero(np.isin(patient_of, order[:n_test]))
    train = np.flatnonzero(np.isin(patient_of, order[n_test:]))
    return torch.from_numpy(train), torch.from_numpy(test)


@dataclass
class Collector:
    """Where a data source reports bad input: fatal under ``fail``, counted under ``skip``."""

    policy: str
    summary: LoadSummary

    def problem(self, reason: str, detail: str) -> None:
        if self.policy == "fail":
            raise DataError(detail)
        self.note(reason, detail)

    def note(self, reason: str, detail: str) -> None:
        """Count an input left out on purpose (never fatal), e.g. a row dropped for a gap."""
        self.summary.skipped[reason] += 1
        self.summary.problems.append(detail)


Target = int | list[float]  # a class index, or multi-hot over the classes


def parse_target(value: str, classes: list[str], separator: str | None) -> Target:
    """A label cell as a target: one of ``classes`` (its index), or with ``separator`` any of
    them (multi-hot; empty is none). ``ValueError`` names the value the job does not know."""
    if separator is None:
        if value not in classes:
            raise ValueError(f"{value!r} is not one of the job's classes {classes}")
        return classes.index(value)
    named = [part.strip() for part in value.split(separator) if part.strip()]
    unknown = [name for name in named if name not in classes]
    if unknown:
        raise ValueError(f"{unknown} in {value!r} are not among the job's classes {classes}")
    return [1.0 if name in named else 0.0 for name in classes]


def targets_tensor(targets: list[Target]) -> torch.Tensor:
    """Class indices as int64 [N], multi-hot targets as float32 [N, C]."""
    if targets and isinstance(targets[0], list):
        return torch.tensor(targets, dtype=torch.float32)
    return torch.tensor(targets, dtype=torch.int64)


def absent_classes(y: torch.Tensor, classes: list[str]) -> list[str]:
    """The classes no record here has."""
    if y.dim() == 2:
        return [name for i, name in enumerate(classes) if not bool((y[:, i] > 0.5).any())]
    return [name for i, name in enumerate(classes) if not bool((y == i).any())]


@dataclass
class LabelledSet:
    """Images gathered against a labels table, by every image source alike.

    Each item is looked up by its key (a file path, a UID); a missing row or a label value the
    job does not know is a problem under the skip-or-fail rule, and ``finish`` reports the rows
    nothing matched, a class the site lacks, and what was loaded.
    """

    labels: dict[str, str]
    classes: list[str]
    labels_path: str
    collect: Collector
    key_name: str = "file"
    separator: str | None = None  # multi-label: what separates the classes of one record
    images: list[torch.Tensor] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    @classmethod
    def of(
        cls,
        config: DicomData | PictureData | VolumeData,
        labels: dict[str, str],
        summary: LoadSummary,
    ) -> LabelledSet:
        """The set an image source gathers into, as its data section says."""
        return cls(
            labels,
            config.classes,
            str(config.labels_path),
            Collector(config.on_bad_input, summary),
            key_name=config.key,
            separator=config.label_separator if config.multilabel else None,
        )

    def target(self, key: str, source: str) -> Target | None:
        """The target labelled for ``key`` (None once reported as a problem)."""
        value = self.labels.get(key)
        if value is None:
            self.collect.problem(
                "file without a label",
                f"{source}: no row for {self.key_name} {key!r} in {self.labels_path}",
            )
            return None
        self.seen.add(key)
        try:
            return parse_target(value, self.classes, self.separator)
        except ValueError as exc:
            self.collect.problem("unknown label value", f"{source}: label {exc}")
            return None

    def add(self, image: torch.Tensor, target: Target, patient: str) -> None:
        self.images.append(image)
        self.targets.append(target)
        self.patients.append(patient)

    def finish(self, folder: object) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Images, class indices and patients, after the checks that need every item seen."""
        for key in sorted(set(self.labels) - self.seen):
            self.collect.problem(
                "label for a missing file",
                f"{self.labels_path}: {self.key_name} {key!r} has a label but no readable "
                f"file in {folder}",
            )
        summary = self.collect.summary
        if not self.images:
            raise DataError(f"{folder}: no usable images ({summary.describe()})")
        y = targets_tensor(self.targets)
        for name in absent_classes(y, self.classes):
            self.collect.problem(
                "class absent at this site", f"{folder}: no image of class {name!r}"
            )
        summary.loaded, summary.patients = len(self.images), len(set(self.patients))
        x = torch.stack(self.images)
        summary.intensity = Intensity.of(x)
        return x, y, self.patients
