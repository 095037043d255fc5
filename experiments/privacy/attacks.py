"""The attacks an honest-but-curious aggregator mounts on what it received.

Each takes the tapped tensors (``aggregator.wire_tap``) and the attacker's own knowledge --
the job config, the weights sites handed it, a public auxiliary slice -- and returns scores.
Only the scoring (``experiments.privacy.sweep``) looks at a site's real records.

* ``train_inversion`` (UnSplit, Erdogan et al., arXiv 2108.09033, with the head known): in
  medsplit's split modes a site's head (and tail) travel to the aggregator at the end of every
  turn, to be handed to the next site, so the attacker runs the real head on its auxiliary
  data and trains a decoder from activations back to inputs. It knows the job's defenses and
  trains through the same activation noise.
* ``norm_scores`` / ``cosine_scores`` (Li et al., arXiv 2102.08504): per-sample gradients a
  U-shaped site returns, scored by their norm or by their direction relative to one sample of
  the batch whose label the attacker is assumed to know.
* ``completion_scores``: the tail travels too, so the aggregator can finish the forward pass
  itself and read the model's own prediction of each label.
* ``first_layer_inversion`` (Phong et al., 2017; Geiping et al., arXiv 2003.14053): in
  federated modes, row j of a fully connected first layer's update divided by its bias update
  is a weighted mean of the inputs that reached neuron j, exactly so for one SGD step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

INVERSION_BATCH = 64


def decoder_for(activation_shape: tuple[int, ...], input_shape: tuple[int, ...]) -> nn.Module:
    """A small decoder from activations of ``activation_shape`` to inputs of ``input_shape``:
    convolutions and upsampling when both are images, a perceptron otherwise."""
    if len(activation_shape) == 3 and len(input_shape) == 3:
        channels, height, _ = activation_shape
        factor = input_shape[1] // height
        stages = int(math.log2(factor)) if factor >= 1 else -1
        if 2**stages == factor and input_shape[1] == height * factor:
            # The work at the activations' resolution; each transposed convolution doubles it.
            layers: list[nn.Module] = [
                nn.Conv2d(channels, 32, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, 32, 3, padding=1),
                nn.ReLU(),
            ]
            width = 32
            for stage in range(stages):
                last = stage == stages - 1
                out = input_shape[0] if last else 16
                layers.append(nn.ConvTranspose2d(width, out, 4, stride=2, padding=1))
                layers += [] if last else [nn.ReLU()]
                width = out
            if stages == 0:
                layers.append(nn.Conv2d(width, input_shape[0], 3, padding=1))
            return nn.Sequential(*layers)
    width_in, width_out = math.prod(activation_shape), math.prod(input_shape)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(width_in, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, width_out),
        nn.Unflatten(1, input_shape),
    )


def train_inversion(
    head: nn.Module, aux_x: torch.Tensor, *, noise: float, epochs: int, seed: int
) -> nn.Module:
    """A decoder trained on the attacker's auxiliary inputs and the head's activations of them
    (with the job's activation noise, which the attacker knows from the job config)."""
    head.eval()
    with torch.no_grad():
        aux_h = head(aux_x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = decoder_for(tuple(aux_h.shape[1:]), tuple(aux_x.shape[1:]))
        optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-3)
        decoder.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(aux_x)).split(INVERSION_BATCH):
                h = aux_h[idx]
                if noise:
                    h = h + noise * torch.randn_like(h)
                loss = nn.functional.mse_loss(decoder(h), aux_x[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    decoder.eval()
    return decoder


def invert(decoder: nn.Module, activations: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([torch.as_tensor(decoder(h)) for h in activations.split(256)])


def norm_scores(gradients: torch.Tensor) -> torch.Tensor:
    """Each sample's gradient norm: larger for the class the model gets wrong more often."""
    norms: torch.Tensor = gradients.flatten(1).norm(dim=1)
    return norms


def cosine_scores(gradients: torch.Tensor, reference: int) -> torch.Tensor:
    """Cosine of each sample's gradient with the gradient of sample ``reference`` of the same
    batch (one whose label the attacker knows): same class points the same way."""
    rows = gradients.flatten(1)
    return nn.functional.cosine_similarity(rows, rows[reference : reference + 1], dim=1)


def completion_scores(trunk: nn.Module, tail: nn.Module, activations: torch.Tensor) -> torch.Tensor:
    """The model's own probability of class 1, computed by the aggregator from the received
    activations with its trunk and the tail a site handed it."""
    trunk.eval()
    tail.eval()
    with torch.no_grad():
        logits: torch.Tensor = tail(trunk(activations))
    return logits.softmax(1)[:, -1]


def first_layer_inversion(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], weight: str, bias: str
) -> torch.Tensor:
    """Candidate inputs from one fully connected layer's update: (dW_j / db_j) for every
    neuron j whose bias moved."""
    delta_w = after[weight] - before[weight]
    delta_b = after[bias] - before[bias]
    moved = delta_b.abs() > 1e-12
    return delta_w[moved] / delta_b[moved, None]
