"""A site's defenses, applied where its cut-layer tensors leave it (``DefenseSettings``).

* **A Gaussian mechanism on activations** (``activation_noise`` sigma, ``activation_clip`` C):
  every sample's activation, in training and evaluation, is clipped to L2 norm C and sent with
  noise of standard deviation sigma x C (``medsplit.privacy.accounting`` turns it into an
  epsilon). The head is trained through the clipping and the noise (its gradient is the
  gradient at the noisy point), so the model learns to live with them.
* **NoPeek** (``nopeek_alpha``): the head's loss gains alpha times the distance correlation
  between the batch's inputs and its activations, so the head learns activations that say less
  about the inputs (Vepakomma et al., arXiv 2008.09161).
* **Noise on returned gradients** (``gradient_noise``, split-u, on by default): the gradient a
  site returns for the trunk's output carries noise scaled to the batch's mean gradient norm,
  which blurs the norm and direction the label attacks read (Li et al., arXiv 2102.08504).
* **Randomised response on labels** (``label_epsilon``, split): each training label the site
  sends is drawn once per job -- kept with probability e^eps / (e^eps + K - 1), otherwise one
  of the K - 1 other classes -- which is eps-label-differentially private (Ghazi et al.,
  arXiv 2102.06062).

The noise comes from a generator seeded from the operating system, never from the job's seed:
the aggregator knows the seed, and noise it can regenerate is noise it can subtract. A resumed
job therefore draws new noise; with every defense off nothing here touches a tensor, and split
training stays step-for-step equal to centralized training.
"""

from __future__ import annotations

import math
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

    def _clipped(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` with each sample (row) scaled down to L2 norm ``activation_clip`` at most."""
        bound = self.settings.activation_clip
        if bound is None:
            return h
        norms = h.flatten(1).norm(dim=1).clamp_min(1e-12)
        factor = (bound / norms).clamp(max=1.0)
        clipped: torch.Tensor = h * factor.view(-1, *([1] * (h.dim() - 1)))
        return clipped

    def activations(self, h: torch.Tensor) -> torch.Tensor:
        """What is sent for the head's output ``h``: detached, clipped and noised if asked."""
        sent = self._clipped(h.detach())
        sigma = self.settings.activation_noise
        if not sigma:
            return sent
        return sent + self._noise_like(sent, sigma * (self.settings.activation_clip or 1.0))

    @property
    def whole_batch_backward(self) -> bool:
        """NoPeek's penalty is the whole batch's: a pipelined step's micro-batches go back
        into the head together, after the last one's gradient came."""
        return bool(self.settings.nopeek_alpha)

    def backward_head(
        self, x: torch.Tensor, hs: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> None:
        """Backpropagate the aggregator's gradients for what was sent of the head's outputs
        ``hs`` (through the clipping; one per micro-batch of ``x``, in order) into the head,
        plus NoPeek's distance-correlation term between the inputs ``x`` and the outputs."""
        sent = [self._clipped(h) for h in hs]
        alpha = self.settings.nopeek_alpha
        if not alpha or len(x) < MIN_ROWS:  # the estimator needs 4 rows; a short batch skips it
            torch.autograd.backward(sent, grads)
            return
        h = hs[0] if len(hs) == 1 else torch.cat(hs)
        penalty = alpha * distance_correlation(x.detach(), h)
        torch.autograd.backward([*sent, penalty], [*grads, None])

    def labels(self, y: torch.Tensor, classes: int) -> torch.Tensor:
        """The labels to send for ``y`` (split): themselves, or drawn once by randomised
        response with ``label_epsilon``."""
        eps = self.settings.label_epsilon
        if eps is None:
            return y
        keep = math.exp(eps) / (math.exp(eps) + classes - 1)
        generator = torch.Generator().manual_seed(self._seed ^ 0x5EED)
        kept = torch.rand(y.shape, generator=generator) < keep
        shift = torch.randint(1, max(classes, 2), y.shape, generator=generator)
        return torch.where(kept, y, (y + shift) % classes)

    def gradient(self, g: torch.Tensor) -> torch.Tensor:
        """What is returned for the trunk's output: ``g`` plus noise whose norm is
        ``gradient_noise`` times the batch's mean per-sample gradient norm."""
        ratio = self.settings.label_noise
        if not ratio:
            return g
        rows = g.flatten(1)
        std = ratio * rows.norm(dim=1).mean() / rows.shape[1] ** 0.5
        return g + self._noise_like(g, std)
