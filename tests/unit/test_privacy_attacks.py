"""The attacks on cases with known answers: an identity cut is inverted perfectly, a cut that
keeps nothing is not, gradients that carry the label give it away, one SGD step of a fully
connected layer gives its input back exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from experiments.privacy import attacks
from medsplit.config import OptimizerConfig
from medsplit.privacy import measures


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_an_identity_cut_is_reconstructed_perfectly() -> None:
    aux = torch.randn(256, 6, generator=_gen(0))
    records = torch.randn(100, 6, generator=_gen(1))
    decoder = attacks.train_inversion(nn.Identity(), aux, noise=0.0, epochs=60, seed=0)
    gain = measures.reconstruction_gain(attacks.invert(decoder, records), records, aux.mean(0))
    assert gain > 0.99


def test_a_cut_that_keeps_nothing_gives_nothing_back() -> None:
    aux = torch.randn(256, 6, generator=_gen(2))
    records = torch.randn(100, 6, generator=_gen(3))
    nothing = nn.Linear(6, 4)
    nn.init.zeros_(nothing.weight)
    decoder = attacks.train_inversion(nothing, aux, noise=0.0, epochs=30, seed=0)
    gain = measures.reconstruction_gain(
        attacks.invert(decoder, nothing(records).detach()), records, aux.mean(0)
    )
    assert gain < 0.05


def test_the_decoder_maps_cut_activations_to_the_input_shape() -> None:
    image = attacks.decoder_for((16, 32, 32), (1, 64, 64))
    assert image(torch.zeros(2, 16, 32, 32)).shape == (2, 1, 64, 64)
    same_size = attacks.decoder_for((4, 8, 8), (1, 8, 8))
    assert same_size(torch.zeros(2, 4, 8, 8)).shape == (2, 1, 8, 8)
    flat = attacks.decoder_for((128,), (1, 16, 16))
    assert flat(torch.zeros(3, 128)).shape == (3, 1, 16, 16)


def test_gradients_that_carry_the_label_give_it_away() -> None:
    labels = torch.tensor([0, 1] * 16)
    direction = torch.randn(10, generator=_gen(4))
    sign = labels.float() * 2 - 1
    jitter = 0.1 * torch.randn(32, 10, generator=_gen(5))
    gradients = sign[:, None] * direction + jitter
    reference = 1  # a positive sample
    cosine = attacks.cosine_scores(gradients, reference)
    assert measures.leak_auc(cosine, labels) == 1.0
    scaled = gradients * (1 + labels.float())[:, None]  # positives twice as large
    assert measures.leak_auc(attacks.norm_scores(scaled), labels) == 1.0
    coin = torch.randn(32, 10, generator=_gen(6))
    assert measures.leak_auc(attacks.norm_scores(coin), labels) < 0.8


def test_one_sgd_step_of_a_fully_connected_layer_gives_its_input_back() -> None:
    layer = nn.Linear(5, 3)
    before = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    record = torch.randn(1, 5, generator=_gen(7))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(record).pow(2).sum().backward()
    optimizer.step()
    candidates = attacks.first_layer_inversion(before, layer.state_dict(), "weight", "bias")
    assert len(candidates) == 3
    assert torch.allclose(candidates, record.expand(3, 5), atol=1e-4)


def test_completion_reads_the_models_own_prediction() -> None:
    trunk, tail = nn.Identity(), nn.Linear(2, 2)
    with torch.no_grad():
        tail.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        tail.bias.zero_()
    h = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    scores = attacks.completion_scores(trunk, tail, h)
    assert scores[1] > 0.5 > scores[0]
    assert scores.shape == (2,)
    assert float(scores.sum()) == pytest.approx(1.0, abs=1e-6)


def _identity_head(width: int) -> nn.Sequential:
    layer = nn.Linear(width, width)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(width))
        layer.bias.zero_()
    return nn.Sequential(layer)


def test_unsplit_recovers_the_inputs_of_an_identity_head() -> None:
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    start = torch.zeros(1, 8)
    guess = attacks.unsplit(_identity_head(8), x, start, steps=600, seed=0, prior=0.0)
    # Not 1: the surrogate head moves with the guess (UnSplit solves for both, and any pair
    # that maps onto the activations fits), yet most of each input comes back.
    assert measures.reconstruction_gain(guess, x, start) > 0.8


def test_unsplit_learns_nothing_from_a_head_that_keeps_nothing() -> None:
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    head = nn.Sequential(nn.Linear(8, 8))
    with torch.no_grad():
        head[0].weight.zero_()
        head[0].bias.zero_()
    start = torch.zeros(1, 8)
    activations = torch.zeros(64, 8)  # what such a head sends, whatever the inputs
    guess = attacks.unsplit(head, activations, start, steps=200, seed=0)
    assert abs(measures.reconstruction_gain(guess, x, start)) < 0.05


def test_known_label_completion_reads_perfectly_separable_outputs() -> None:
    labels = torch.randint(0, 2, (300,), generator=torch.Generator().manual_seed(2))
    outputs = torch.stack([labels.float() * 4 - 2, torch.randn(300)], dim=1)
    found = attacks.known_label_completion(outputs, labels, known=10, seed=0)
    assert found is not None
    scores, truth = found
    assert len(truth) == 290
    assert measures.auc(scores, truth) == 1.0
    noise = torch.randn(300, 2, generator=torch.Generator().manual_seed(3))
    blind = attacks.known_label_completion(noise, labels, known=40, seed=0)
    assert blind is not None
    assert measures.leak_auc(blind[0].numpy(), blind[1].numpy()) < 0.65


def test_inverting_gradients_recovers_the_records_of_an_sgd_round() -> None:
    """Geiping et al.'s attack, on the update of a round of plain SGD over two records: the
    records come back (up to their order), to within rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(2, 6), torch.tensor([1, 0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    after = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(before)
    guess = attacks.geiping_inversion(
        model,
        before,
        after,
        samples=2,
        batches=[torch.tensor([0, 1])],
        optimizer=OptimizerConfig(name="sgd", lr=0.1),
        classes=2,
        start=torch.zeros(1, 6),
        iterations=500,
        seed=0,
    )
    assert float(torch.cdist(guess, x).min(dim=1).values.max()) < 1e-3
