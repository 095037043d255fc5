"""A site's defenses, applied where its cut-layer tensors leave it (``DefenseSettings``).

* **Gaussian noise on activations** (``activation_noise``): every activation sent, in training
  and evaluation, carries noise of standard deviation sigma. The head is trained through the
  noise (its gradient is the gradient at the noisy point), so the model learns to live with it.
* **NoPeek** (``nopeek_alpha``): the head's loss gains alpha times the distance correlation
  between the batch's inputs and its activations, so the head learns activations that say less
  about the inputs (Vepakomma et al., arXiv 2008.09161).
* **Noise on returned gradients** (``gradient_noise``, split-u): the gradient a site returns
  for the trunk's output carries noise scaled to the batch's mean gradient norm, which blurs the
  norm and direction the label attacks read (Li et al., arXiv 2102.08504).

The noise comes from a generator seeded from the operating system, never from the job's seed:
the aggregator knows the seed, and noise it can regenerate is noise it can subtract. A resumed
job therefore draws new noise; with every defense off nothing here touches a tensor, and split
training stays step-for-step equal to centralized training.
"""

from __future__ import annotations

import secrets

import torch

from medsplit.config import DefenseSettings
from medsplit.privacy.measures import MIN_ROWS, distance_correlation


class SiteDefenses:
    def __init__(self, settings: DefenseSettings, *, seed: int | None = None) -> None:
        """``seed`` only for tests that need repeatable noise; a site never passes one."""
        self.settings = settings
        self._seed = secrets.randbits(63) if seed is None else seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _noise_like(self, tensor: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
        generator = self._generators.get(tensor.device)
        if generator is None:
            generator = torch.Generator(device=tensor.device).manual_seed(self._seed)
            self._generators[tensor.device] = generator
        noise = torch.randn(
            tensor.shape, generator=generator, device=tensor.device, dtype=tensor.dtype
        )
        return noise * std

    def activations(self, h: torch.Tensor) -> torch.Tensor:
        """What is sent for the head's output ``h``: detached, with noise if configured."""
        sent = h.detach()
        sigma = self.settings.activation_noise
        return sent + self._noise_like(sent, sigma) if sigma else sent

    def backward_head(self, x: torch.Tensor, h: torch.Tensor, grad: torch.Tensor) -> None:
        """Backpropagate the aggregator's gradient for ``h`` into the head, plus NoPeek's
        distance-correlation term between the batch's inputs ``x`` and ``h``."""
        alpha = self.settings.nopeek_alpha
        if not alpha or len(x) < MIN_ROWS:  # the estimator needs 4 rows; a short batch skips it
            h.backward(grad)
            return
        penalty = alpha * distance_correlation(x.detach(), h)
        torch.autograd.backward([h, penalty], [grad, None])

    def gradient(self, g: torch.Tensor) -> torch.Tensor:
        """What is returned for the trunk's output: ``g`` plus noise whose norm is
        ``gradient_noise`` times the batch's mean per-sample gradient norm."""
        ratio = self.settings.gradient_noise
        if not ratio:
            return g
        rows = g.flatten(1)
        std = ratio * rows.norm(dim=1).mean() / rows.shape[1] ** 0.5
        return g + self._noise_like(g, std)
