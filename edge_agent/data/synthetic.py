"""Chest-radiograph-like images generated from a seed: the pixels behind ``synthetic-cxr``."""

from __future__ import annotations

import torch


def synthetic_cxr(
    count: int, *, size: int = 64, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chest-radiograph-like images: lung fields, ribs, noise; label 1 adds a faint round lesion."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    lungs = torch.exp(-(((xx.abs() - 0.45) / 0.3) ** 2) - (yy / 0.7) ** 2)
    ribs = 0.15 * torch.sin(yy * 18) ** 2 * lungs
    labels = torch.randint(0, 2, (count,), generator=g)
    images = torch.empty(count, 1, size, size)
    for i in range(count):
        image = 0.6 * lungs + ribs + 0.08 * torch.randn(size, size, generator=g)
        if labels[i] == 1:
            cx, cy = (torch.rand(2, generator=g) - 0.5) * 1.2
            radius = 0.08 + 0.08 * torch.rand(1, generator=g)
            image += 0.35 * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius**2))
        images[i, 0] = image.clamp(0, 1.5) / 1.5
    return images, labels


# The clinic's record of each synthetic-cxr patient: (column, mean without a lesion, shift
# with one, spread). Each column alone separates the classes weakly (a shift of 0.5-0.6
# spreads), so a table of them is worth something and the radiograph more: together they
# beat either, which is what a vertical partition of this data is for.
CXR_FINDINGS: tuple[tuple[str, float, float, float], ...] = (
    ("age_years", 58.0, 6.0, 11.0),
    ("pack_years", 14.0, 7.0, 12.0),
    ("crp_mg_l", 6.0, 3.0, 5.0),
    ("spo2_pct", 96.5, -1.0, 1.8),
)


def cxr_findings(labels: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """A clinical table for the patients of ``synthetic_cxr`` (one row per label, columns
    ``CXR_FINDINGS``): the same patients' labs and history, as a hospital would hold them
    beside the imaging centre's radiographs. Drawn from ``seed``, independently of the pixels."""
    g = torch.Generator().manual_seed(seed * 104_729 + 17)
    lesion = labels.to(torch.float32)
    columns = [
        mean + shift * lesion + spread * torch.randn(len(labels), generator=g)
        for _, mean, shift, spread in CXR_FINDINGS
    ]
    return torch.stack(columns, dim=1)
