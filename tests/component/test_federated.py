"""FedAvg and FLOP: the strategies' maths, exactness, privacy of private layers, traffic."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from aggregator.config import JobConfig
from aggregator.strategy import FedAvg, Flop, Reply
from edge_agent.agent import Agent
from edge_agent.data import datasets
from edge_agent.local_model import LocalModel
from experiments.inprocess import run_job
from medsplit.config import OptimizerConfig
from medsplit.evaluation import Tally
from medsplit.protocol import Kind, topics
from medsplit.training import train_centralized
from medsplit.transport import MemoryBroker
from medsplit.wire import Decoder, Envelope
from medsplit.wiring import Connector, memory_connector
from models import ConfigError, cut_shapes
from tests.support.configs import job_config


def _config(**overrides: Any) -> JobConfig:
    base: dict[str, Any] = {
        "job_id": "job-f",
        "plan": "mlp-ehr",
        "mode": "flop",
        "rounds": 3,
        "batch_size": 16,
        "optimizer": {"name": "adam", "lr": 0.01},
        "seed": 5,
        "sites": ["site-a"],
        "round_deadline_s": 60,
        "join_deadline_s": 60,
    }
    base.update(overrides)
    return job_config(base)


def _sites(names: list[str], partition: str = "iid") -> dict[str, datasets.SiteData]:
    shares = datasets.all_sites(datasets.load("breast-cancer"), len(names), partition, seed=0)
    return dict(zip(names, shares, strict=True))


def _uplink(broker: MemoryBroker) -> list[tuple[str, Envelope]]:
    """Every envelope any agent published (with its site id), decoded as a receiver would."""
    decoder = Decoder(dedup_window=10**6)
    out = []
    for client, topic, payload in broker.published:
        if not client.startswith("aggregator") and not topics.is_presence(topic):
            envelope = decoder.feed(payload)
            if envelope is not None:
                out.append((envelope.site, envelope))
    return out


# -- strategies ---------------------------------------------------------------------------------


def test_fedavg_samples_a_reproducible_fraction_of_sites_but_never_below_min_sites() -> None:
    sites = [f"s{i}" for i in range(10)]
    strategy = FedAvg(fraction=0.3, min_sites=2, seed=1)
    chosen = [strategy.configure_train(r, 0, sites) for r in range(6)]
    assert all(len(c) == 3 for c in chosen)
    assert all(c == sorted(c, key=sites.index) for c in chosen)  # roster order kept
    assert chosen == [strategy.configure_train(r, 0, sites) for r in range(6)]
    assert len({tuple(c) for c in chosen}) > 1  # different rounds, different sites
    assert len(FedAvg(fraction=0.1, min_sites=4).configure_train(0, 0, sites)) == 4
    assert FedAvg().configure_train(0, 0, sites) == sites


def test_fedavg_weights_sites_by_sample_count() -> None:
    current = {"w": torch.zeros(2), "n": torch.tensor(0)}
    replies = [
        Reply("a", {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}, samples=30),
        Reply("b", {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(5)}, samples=10),
    ]
    out = FedAvg().aggregate_train(current, replies)
    torch.testing.assert_close(out["w"], torch.tensor([1.75, 3.5]))
    assert int(out["n"]) == 5  # counters take the maximum, not an average


def test_strategies_refuse_unusable_replies() -> None:
    current = {"features.w": torch.zeros(2)}
    good = {"features.w": torch.ones(2)}
    with pytest.raises(ValueError, match="site a sent other tensors"):
        FedAvg().aggregate_train(current, [Reply("a", {"x": torch.ones(2)}, 5)])
    with pytest.raises(ValueError, match="0 samples"):
        FedAvg().aggregate_train(current, [Reply("a", good, 0)])
    flop = Flop(private_keys=frozenset({"classifier.w"}))
    leaky = {**good, "classifier.w": torch.ones(2)}
    with pytest.raises(ValueError, match=r"site b sent private tensors \['classifier.w'\]"):
        flop.aggregate_train(current, [Reply("b", leaky, 5)])
    with pytest.raises(ValueError, match="must not hold private"):
        flop.aggregate_train({**current, "classifier.w": torch.zeros(2)}, [Reply("b", good, 5)])
    with pytest.raises(ValueError, match="fraction"):
        FedAvg(fraction=0)


def test_flop_needs_a_plan_with_private_layers() -> None:
    plan = {"model": {"name": "mlp", "args": {"in_features": 30}}, "cut": 1}
    with pytest.raises(ConfigError, match="mode: flop needs a plan with both shared and private"):
        _config(plan=plan)
    with pytest.raises(ConfigError, match="sample_fraction: applies to parallel rounds"):
        _config(orchestration="sequential", sample_fraction=0.5)
    assert _config(mode="fedavg").orchestration == "parallel"  # federated rounds default
    assert _config(mode="split", orchestration="sequential").orchestration == "sequential"


# -- exactness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fedavg", "flop"])
def test_one_site_federated_training_equals_centralized_training(mode: str) -> None:
    # With SGD (no optimizer state to reset between rounds) and one site, averaging is the
    # identity: R rounds of one local epoch must give exactly R epochs of centralized training.
    sgd = {"name": "sgd", "lr": 0.05}
    config = _config(mode=mode, optimizer=sgd, rounds=3)
    data = _sites(["site-a"])
    broker = MemoryBroker()
    result = run_job(config, data, memory_connector(broker))

    reference = config.plan.model.build(seed=config.seed)
    train_centralized(
        reference,
        data["site-a"].x_train,
        data["site-a"].y_train,
        epochs=3,
        batch_size=16,
        optimizer=OptimizerConfig(**sgd),
        seed=config.seed,
    )
    site_model = result.agents["site-a"].segments
    assert isinstance(site_model, LocalModel)
    combined = {**site_model.full_state(), **result.coordinator.final_state()}
    for key, expected in reference.state_dict().items():
        torch.testing.assert_close(combined[key], expected, atol=1e-6, rtol=0), key
    if mode == "flop":
        assert set(result.coordinator.final_state()) == config.plan.shared_keys


# -- privacy ------------------------------------------------------------------------------------


def test_flop_private_layers_never_leave_a_site_and_survive_every_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = ["site-a", "site-b", "site-c"]
    config = _config(sites=names, rounds=3)
    snapshots: dict[int, list[tuple[str, dict[str, torch.Tensor]]]] = defaultdict(list)
    start_round, state = LocalModel.start_round, LocalModel.state

    def record_start(self: LocalModel) -> None:  # right after the global weights were loaded
        snapshots[id(self)].append(("start", self.private_state()))
        start_round(self)

    def record_end(self: LocalModel) -> dict[str, torch.Tensor]:  # what ``done`` carries
        snapshots[id(self)].append(("end", self.private_state()))
        return state(self)

    monkeypatch.setattr(LocalModel, "start_round", record_start)
    monkeypatch.setattr(LocalModel, "state", record_end)
    broker = MemoryBroker()
    result = run_job(config, _sites(names, "dirichlet:0.5"), memory_connector(broker))

    private = config.plan.private_keys
    initial = {
        k: v
        for k, v in config.plan.model.build(seed=config.seed).state_dict().items()
        if k in private
    }
    # 1. Private layers are restored before each local round: a round starts exactly where the
    #    site's previous round ended, and the first round from the initial weights.
    for model_id, events in snapshots.items():
        assert [kind for kind, _ in events] == ["start", "end"] * config.rounds.count, model_id
        for key in private:
            assert torch.equal(events[0][1][key], initial[key])
        for (_, ended), (_, started) in zip(events[1::2], events[2::2], strict=False):
            assert all(torch.equal(ended[k], started[k]) for k in private)
        for (_, started), (_, ended) in zip(events[0::2], events[1::2], strict=True):
            assert not torch.equal(started["classifier.weight"], ended["classifier.weight"])
    # 2. ...and differ between sites after training.
    finals = [m.segments.private_state() for m in result.agents.values()]  # type: ignore[union-attr]
    for i in range(len(finals)):
        for j in range(i + 1, len(finals)):
            assert (
                finals[i]["classifier.weight"] - finals[j]["classifier.weight"]
            ).abs().max() > 1e-3
    # 3. No private tensor is ever published: not by name, and not its bytes in any payload.
    uplink = _uplink(broker)
    assert {e.kind for _, e in uplink} >= {Kind.HELLO, Kind.DONE, Kind.METRICS}
    for _, envelope in uplink:
        assert not set(envelope.tensors) & private, envelope.kind
        if envelope.kind == Kind.DONE:
            assert set(envelope.tensors) == config.plan.shared_keys
    payloads = [p for client, _, p in broker.published if not client.startswith("aggregator")]
    private_values = [
        snap[k].numpy().tobytes()
        for events in snapshots.values()
        for _, snap in events
        for k in snap
    ]
    assert private_values and not any(v in payload for v in private_values for payload in payloads)


# -- traffic ------------------------------------------------------------------------------------


def _numel(config: JobConfig, keys: frozenset[str] | set[str]) -> int:
    state = config.plan.model.build().state_dict()
    return sum(state[k].numel() for k in keys)


@pytest.mark.parametrize("mode", ["fedavg", "flop"])
def test_federated_traffic_per_round_is_the_shared_parameters_times_four(mode: str) -> None:
    names = ["site-a", "site-b"]
    config = _config(mode=mode, sites=names, rounds=2)
    broker = MemoryBroker()
    result = run_job(config, _sites(names), memory_connector(broker))
    keys = config.plan.shared_keys if mode == "flop" else set(config.plan.model.state_keys)
    analytic = 4 * _numel(config, keys)
    assert (mode == "flop") == (analytic < 4 * _numel(config, set(config.plan.model.state_keys)))
    done = [(c, e) for c, e in _uplink(broker) if e.kind == Kind.DONE]
    assert len(done) == len(names) * config.rounds.count
    assert all(e.payload_nbytes() == analytic for _, e in done)
    tally = sum(t.numel() * t.element_size() for t in _tally(config).values())
    for record in result.history[1:]:  # round 0 also carries the hello
        for site in names:
            up = record.bytes[site]["up"]
            # done (the weights) plus metrics and their tally; framing costs a few hundred
            # bytes per message.
            assert analytic + tally < up < analytic + tally + 4096, (site, up, analytic)
    for site in names:
        total = sum(r.bytes[site]["up"] for r in result.history)
        assert total == result.coordinator.sites[site].bytes_up


def test_split_traffic_per_round_is_samples_times_the_activation_size() -> None:
    names = ["site-a", "site-b"]
    config = _config(mode="split-u", plan="mlp-ehr-u", sites=names, rounds=2)
    data = _sites(names)
    broker = MemoryBroker()
    run_job(config, data, memory_connector(broker))
    per_sample = math.prod(cut_shapes(config.plan, 1)["head_out"][1:])
    sent: dict[tuple[str, int], int] = defaultdict(int)
    for client, envelope in _uplink(broker):
        if envelope.kind == Kind.ACTIVATIONS:
            sent[(client, envelope.round)] += envelope.payload_nbytes()
    assert len(sent) == len(names) * config.rounds.count
    for (site, _), nbytes in sent.items():
        assert nbytes == data[site].train_samples * per_sample * 4


def _memory() -> Connector:
    broker = MemoryBroker()
    return memory_connector(broker)


def test_a_restarted_flop_site_takes_back_its_private_layers_from_its_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _sites(["site-a"])
    run_job(_config(rounds=2), data, _memory(), state_dir=tmp_path)
    saved = load_file(str(tmp_path / "edge.safetensors"))
    private = _config().plan.private_keys
    assert private <= set(saved)  # the whole site model is kept, private layers included

    starts: list[dict[str, torch.Tensor]] = []
    start_round = LocalModel.start_round

    def record(self: LocalModel) -> None:
        starts.append(self.private_state())
        start_round(self)

    monkeypatch.setattr(LocalModel, "start_round", record)
    # The agent restarted and the job goes on at round 2: it trains from its saved layers.
    resumed = _config(rounds=3)
    job = run_job(resumed, data, _memory(), state_dir=tmp_path, agent_type=_FromRound2)
    assert all(torch.equal(starts[0][k], saved[k]) for k in private)
    assert job.agents["site-a"].recovery.redone_rounds == []
    # Another job never inherits them.
    other = _config(job_id="job-other", rounds=1)
    run_job(other, data, _memory(), state_dir=tmp_path)
    initial = other.plan.model.build(seed=other.seed).state_dict()
    assert all(torch.equal(starts[-1][k], initial[k]) for k in private)


class _FromRound2(Agent):
    """Takes part only from round 2 on, as an agent restarted into a job that went on."""

    def _train(self, env: Envelope) -> None:
        if env.round < 2:
            # Hands the global weights back untouched: its own layers do not move.
            answer = env.reply(self.site_id, Kind.DONE, tensors=env.tensors, meta={"samples": 1})
            self._publish(answer)
            return
        super()._train(env)


def _tally(config: JobConfig) -> dict[str, torch.Tensor]:
    """The counts a site's metrics carry for the job's classes."""
    classes = cut_shapes(config.plan, 1)["logits"][1]
    labels = torch.arange(classes)
    return Tally.of(torch.eye(classes), labels).tensors()
