"""What every data source hands the agent, and what they share: errors, summary, patient split."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.model_selection import GroupShuffleSplit

from edge_agent.data.inputs import DataCard


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
    """Train and test indices such that all images of a patient fall on the same side."""
    splitter = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
    train, test = next(splitter.split(np.zeros(len(patients)), groups=patients))
    return torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(test))


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
    images: list[torch.Tensor] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    def target(self, key: str, source: str) -> int | None:
        """The class index labelled for ``key`` (None once reported as a problem)."""
        value = self.labels.get(key)
        if value is None:
            self.collect.problem(
                "file without a label",
                f"{source}: no row for {self.key_name} {key!r} in {self.labels_path}",
            )
            return None
        self.seen.add(key)
        if value not in self.classes:
            self.collect.problem(
                "unknown label value",
                f"{source}: label {value!r} is not one of the job's classes {self.classes}",
            )
            return None
        return self.classes.index(value)

    def add(self, image: torch.Tensor, target: int, patient: str) -> None:
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
        y = torch.tensor(self.targets, dtype=torch.int64)
        for index, name in enumerate(self.classes):
            if not bool((y == index).any()):
                self.collect.problem(
                    "class absent at this site", f"{folder}: no image of class {name!r}"
                )
        summary.loaded, summary.patients = len(self.images), len(set(self.patients))
        x = torch.stack(self.images)
        summary.intensity = Intensity.of(x)
        return x, y, self.patients
