"""How a built-in dataset is divided among sites, so that sites differ the way hospitals do.

* ``iid``: a random, equal split.
* ``dirichlet:ALPHA``: label skew; each class is spread over the sites in Dirichlet(ALPHA)
  proportions (smaller ALPHA, more skew; 0.1 leaves most sites with nearly one class).
* ``shards:K``: pathological label skew (McMahan et al., 2017): samples sorted by label are cut
  into ``sites x K`` shards and each site gets K of them, so it sees at most K classes.
* ``feature-shift``: an IID split, then each site's images pass through its own "scanner":
  contrast, brightness, gamma and noise drawn per site. Images only: tabular features are
  standardised per site, which would undo any per-site affine shift anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edge_agent.data.names import parse_scheme


def partition(
    labels: torch.Tensor, num_sites: int, scheme: str, *, seed: int = 0, min_size: int = 10
) -> list[np.ndarray]:
    """Sorted sample indices for each site; every sample goes to exactly one site."""
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    parsed = parse_scheme(scheme)
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    if parsed.kind == "dirichlet":
        return _dirichlet(y, num_sites, parsed.alpha, rng, min_size=min_size, scheme=scheme)
    if parsed.kind == "shards":
        return _shards(y, num_sites, parsed.shards, rng, min_size=min_size, scheme=scheme)
    return [np.sort(part) for part in np.array_split(rng.permutation(len(y)), num_sites)]


def _dirichlet(
    y: np.ndarray,
    num_sites: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_size: int,
    scheme: str,
) -> list[np.ndarray]:
    for _ in range(100):
        shares: list[list[int]] = [[] for _ in range(num_sites)]
        for cls in np.unique(y):
            members = rng.permutation(np.flatnonzero(y == cls))
            proportions = rng.dirichlet([alpha] * num_sites)
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for site, chunk in enumerate(np.split(members, cuts)):
                shares[site] += chunk.tolist()
        if min(len(s) for s in shares) >= min_size:
            return [np.sort(np.array(s, dtype=np.int64)) for s in shares]
    raise ValueError(
        f"{scheme} leaves some of {num_sites} sites with fewer than {min_size} samples; raise ALPHA"
    )


def _shards(
    y: np.ndarray,
    num_sites: int,
    per_site: int,
    rng: np.random.Generator,
    *,
    min_size: int,
    scheme: str,
) -> list[np.ndarray]:
    count = num_sites * per_site
    if len(y) // count < max(1, min_size // per_site):
        raise ValueError(
            f"{scheme}: {len(y)} samples make shards too small for {num_sites} sites; lower K"
        )
    # Sort by label, ties in random order, then deal whole shards out at random.
    order = np.lexsort((rng.permutation(len(y)), y))
    shards = np.array_split(order, count)
    dealt = rng.permutation(count).reshape(num_sites, per_site)
    return [np.sort(np.concatenate([shards[i] for i in row])) for row in dealt]


@dataclass(frozen=True)
class Scanner:
    """One site's imaging chain: out = clamp(contrast * (x - 0.5) + 0.5 + brightness) ** gamma."""

    contrast: float
    brightness: float
    gamma: float
    noise: float

    @classmethod
    def for_site(cls, index: int, seed: int) -> Scanner:
        rng = np.random.default_rng([seed, index, 0x5CA11])
        return cls(
            contrast=float(rng.uniform(0.6, 1.4)),
            brightness=float(rng.uniform(-0.15, 0.15)),
            gamma=float(rng.uniform(0.7, 1.5)),
            noise=float(rng.uniform(0.0, 0.06)),
        )

    def apply(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        out = (self.contrast * (images - 0.5) + 0.5 + self.brightness).clamp(0, 1) ** self.gamma
        out = out + self.noise * torch.randn(images.shape, generator=generator)
        return out.clamp(0, 1)
