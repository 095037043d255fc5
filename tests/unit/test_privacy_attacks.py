"""The attacks on cases with known answers: an identity cut is inverted perfectly, a cut that
keeps nothing is not, gradients that carry the label give it away, one SGD step of a fully
connected layer gives its input back exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from experiments.privacy import attacks
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
