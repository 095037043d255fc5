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
Sealed segments (the default) keep the head and tail from the aggregator; what it can still do,
black-box:

* ``train_surrogate_head``: start a head from the job's initial weights (the aggregator knows
  the seed), train it with its own trunk and a fresh tail on the labelled auxiliary slice, as
  the sites train theirs, and invert its activations with a decoder (``train_inversion``):
  a shadow model whose representation may resemble the real one.
* ``unsplit`` (Erdogan et al., arXiv 2108.09033): optimise a surrogate head and the inputs
  together so that the surrogate's activations of the inputs match the ones received.
* ``known_label_completion`` (Fu et al., USENIX Security 2022): the trunk's outputs, which the
  aggregator computes for every batch, with a handful of known labels: a classifier fitted on
  those few predicts the rest.

* ``geiping_inversion`` (Geiping et al., arXiv 2003.14053): in federated modes, inputs and
  labels optimised so that the site's local round, simulated on them, moves the weights the
  way the update the aggregator received does.
* ``first_layer_inversion`` (Phong et al., 2017; Geiping et al., arXiv 2003.14053): in
  federated modes, row j of a fully connected first layer's update divided by its bias update
  is a weighted mean of the inputs that reached neuron j, exactly so for one SGD step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medsplit.config import OptimizerConfig

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


def train_surrogate_head(
    head_init: nn.Module,
    trunk: nn.Module,
    tail_init: nn.Module | None,
    aux_x: torch.Tensor,
    aux_y: torch.Tensor,
    *,
    epochs: int,
    seed: int,
) -> nn.Module:
    """A shadow head: from the job's initial head, trained on the labelled auxiliary slice
    through the aggregator's (frozen) trunk and a fresh tail (vanilla split: the trunk ends in
    the logits)."""
    head = head_init
    trunk.eval()
    for parameter in trunk.parameters():
        parameter.requires_grad_(False)
    params = list(head.parameters()) + (list(tail_init.parameters()) if tail_init else [])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        optimizer = torch.optim.Adam(params, lr=1e-3)
        head.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(aux_x)).split(INVERSION_BATCH):
                out = trunk(head(aux_x[idx]))
                logits = tail_init(out) if tail_init is not None else out
                loss = nn.functional.cross_entropy(logits, aux_y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    for parameter in trunk.parameters():
        parameter.requires_grad_(True)
    head.eval()
    return head


def unsplit(
    head_init: nn.Module,
    activations: torch.Tensor,
    start: torch.Tensor,
    *,
    steps: int,
    seed: int,
    prior: float = 0.1,
) -> torch.Tensor:
    """UnSplit: inputs (from ``start``, the auxiliary mean) and a surrogate head (from the
    job's initial head) optimised together, in turns, so that the surrogate's activations of
    the inputs match ``activations``; ``prior`` keeps the inputs near the start (a smoothness
    prior of the paper, for tables and images alike)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        guess = start.expand_as(torch.empty(len(activations), *start.shape[1:])).clone()
        guess.requires_grad_(True)
        head = head_init
        head.train()
        inputs = torch.optim.Adam([guess], lr=1e-2)
        weights = torch.optim.Adam(head.parameters(), lr=1e-3)
        for step in range(steps):
            optimizer = inputs if step % 2 == 0 else weights
            mismatch = nn.functional.mse_loss(head(guess), activations)
            loss = mismatch + prior * nn.functional.mse_loss(guess, start.expand_as(guess))
            inputs.zero_grad()
            weights.zero_grad()
            loss.backward()
            optimizer.step()
    return guess.detach()


def known_label_completion(
    outputs: torch.Tensor, labels: torch.Tensor, known: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Scores for the records whose labels the attacker does not know, from a logistic
    regression fitted on ``known`` records whose labels it does (both classes among them), and
    the true labels of those scored records (for the AUC). None if ``known`` is too many."""
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    if known >= len(labels) - 2:
        return None
    # The known few must include both classes (an attacker would pick them so).
    positives = order[labels[order] == 1][: max(1, known // 2)]
    negatives = order[labels[order] != 1][: known - len(positives)]
    chosen = torch.cat([positives, negatives])
    rest = torch.tensor([i for i in order.tolist() if i not in set(chosen.tolist())])
    features = outputs.flatten(1).double().numpy()
    model = LogisticRegression(max_iter=1000).fit(features[chosen], labels[chosen].numpy())
    scores = torch.as_tensor(model.predict_proba(features[rest])[:, -1])
    return scores, labels[rest]


def geiping_inversion(
    model: nn.Module,
    before: dict[str, torch.Tensor],
    after: dict[str, torch.Tensor],
    *,
    samples: int,
    batches: list[torch.Tensor],
    optimizer: OptimizerConfig,
    classes: int,
    start: torch.Tensor,
    iterations: int,
    seed: int,
) -> torch.Tensor:
    """Inverting gradients (Geiping et al., arXiv 2003.14053) on a site's whole local round.

    The attacker knows the weights it sent (``before``), the update it got back (``after``),
    the optimizer, the batch size and order (the job's seed) and the sample count the site
    declared. It makes up ``samples`` inputs and soft labels, runs the site's local round on
    them -- every step unrolled, differentiably -- and moves them so that the simulated update
    points where the real one does (cosine distance, over the tensors it received)."""
    names = [n for n, p in model.named_parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    received = [n for n in names if n in after]
    target = torch.cat([(after[n] - before[n]).flatten() for n in received]).double()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        shape = (samples, *start.shape[1:])
        guess = (start.expand(shape) + 0.1 * torch.randn(shape)).clone().requires_grad_(True)
        label_logits = torch.zeros(samples, classes, requires_grad=True)
    attacker = torch.optim.Adam([guess, label_logits], lr=0.05)
    model.train()
    for _ in range(iterations):
        params = {n: before[n].detach().clone().requires_grad_(True) for n in names}
        simulated = _unrolled_round(
            model, {**params, **buffers}, guess, label_logits, batches=batches, config=optimizer
        )
        moved = torch.cat([(simulated[n] - before[n]).flatten() for n in received]).double()
        loss = 1 - nn.functional.cosine_similarity(moved, target, dim=0)
        attacker.zero_grad()
        loss.backward()
        attacker.step()
    return guess.detach()


def _unrolled_round(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    x: torch.Tensor,
    label_logits: torch.Tensor,
    *,
    batches: list[torch.Tensor],
    config: OptimizerConfig,
) -> dict[str, torch.Tensor]:
    """The site's local round on ``x`` as a differentiable function of ``x``: SGD or Adam
    (PyTorch's update rules), step by step in the job's batch order. ``state``: the
    parameters (requiring grad) and the buffers."""
    from torch.func import functional_call  # noqa: PLC0415

    names = [n for n, _ in model.named_parameters()]
    params = {n: state[n] for n in names}
    buffers = {n: v for n, v in state.items() if n not in params}
    first = {n: torch.zeros_like(p) for n, p in params.items()}
    second = {n: torch.zeros_like(p) for n, p in params.items()}
    for step, idx in enumerate(batches, start=1):
        logits = functional_call(model, {**params, **buffers}, (x[idx],))
        soft = label_logits[idx].softmax(1)
        loss = -(soft * logits.log_softmax(1)).sum(1).mean()
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
        params = {
            name: _optimizer_step(
                config, step, params[name], raw, moments=(first, second), name=name
            )
            for name, raw in zip(names, grads, strict=True)
        }
    return params


def _optimizer_step(
    config: OptimizerConfig,
    step: int,
    param: torch.Tensor,
    raw: torch.Tensor,
    *,
    moments: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
    name: str,
) -> torch.Tensor:
    """One parameter's update by PyTorch's SGD or Adam rule, its moments kept in
    ``moments``."""
    first, second = moments
    grad = raw + config.weight_decay * param if config.weight_decay else raw
    if config.name == "sgd":
        if config.momentum:
            first[name] = config.momentum * first[name] + grad if step > 1 else grad
            grad = first[name]
        return param - config.lr * grad
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    first[name] = beta1 * first[name] + (1 - beta1) * grad
    second[name] = beta2 * second[name] + (1 - beta2) * grad * grad
    m_hat = first[name] / (1 - beta1**step)
    v_hat = second[name] / (1 - beta2**step)
    return param - config.lr * m_hat / ((v_hat + 1e-20).sqrt() + eps)
