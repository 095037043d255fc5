"""Sealed segments through a real Mosquitto with mutual TLS, as deployed: the kits, seal keys
and roster of ``medsplit provision``, the aggregator and the agents as processes. Every frame
the broker carries is captured (listeners holding the aggregator's and each site's own
certificate, reading everything their ACL lets them), and none of it -- nor anything the
aggregator wrote to disk -- holds a byte of the sites' heads and tails."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from experiments.federation import Federation, small_job
from medsplit.brokers.embedded import LocalBroker, start_local_broker
from medsplit.ids import AGGREGATOR_ID
from medsplit.protocol import edge_keys, topics
from medsplit.wire import Decoder
from tests.support.configs import job_config
from tests.support.twin import Listener

pytestmark = pytest.mark.integration
SITES = ["hospital-1", "hospital-2", "hospital-3"]


@pytest.fixture
def sealed_job(tmp_path: Path) -> Iterator[tuple[Federation, LocalBroker, list[Listener]]]:
    job = {**small_job("split-u", "sequential", rounds=2, deadline_s=300), "sites": SITES}
    with ExitStack() as stack:
        broker = stack.enter_context(ExitStack())
        local = start_local_broker(broker, provision=(tmp_path / "pki", job["job_id"], SITES))
        assert local.kits is not None, "this test needs Mosquitto (scripts/setup.sh)"
        port = int(local.url.rsplit(":", 1)[1])
        (tmp_path / "fed").mkdir()
        fed = Federation(tmp_path / "fed", local.url, job, kits=local)
        listeners = [
            Listener(local.kits, port, AGGREGATOR_ID, topics.aggregator_subscriptions(fed.job_id))
        ] + [
            Listener(local.kits, port, site, topics.site_subscriptions(fed.job_id, site))
            for site in SITES
        ]
        try:
            yield fed, local, listeners
        finally:
            fed.stop_all()
            for listener in listeners:
                listener.transport.close()


def _windows(tensor: torch.Tensor, size: int = 24) -> list[bytes]:
    """Byte windows of a tensor as float32 and float16: any copy of it on the wire shows one."""
    out = []
    for dtype in (torch.float32, torch.float16):
        raw = tensor.detach().to(dtype).contiguous().flatten().numpy().tobytes()
        out += [raw[i : i + size] for i in range(0, max(len(raw) - size, 1), size)][:8]
    return out


def test_no_frame_and_no_aggregator_file_holds_a_site_segment(
    sealed_job: tuple[Federation, LocalBroker, list[Listener]],
) -> None:
    fed, _, listeners = sealed_job
    fed.start_all()
    codes = fed.wait_all(300)
    assert all(code == 0 for code in codes.values()), [fed.tail(n) for n in codes]
    report = fed.report()
    assert report["status"] == "completed" and report["sealed_segments"] is True
    frames = [frame for listener in listeners for frame in listener.close()]
    assert any("/up/done" in topic for topic, _ in frames)
    assert any("/down/train" in topic for topic, _ in frames)

    plan = job_config({"job_id": fed.job_id, "plan": "mlp-ehr-u", "sites": SITES}).plan
    own = set(edge_keys(plan))
    secrets: list[bytes] = []
    for site in SITES:
        layers = load_file(str(fed.state_dir(site) / "edge.safetensors"))
        assert own <= set(layers)  # every site ended with its head and tail
        secrets += [w for k in own for w in _windows(layers[k])]
    # Whatever the broker carried: raw frames, and the tensors decoded from them.
    decoder = Decoder(dedup_window=10**6)
    names: set[str] = set()
    for _, payload in frames:
        assert not any(window in payload for window in secrets)
        envelope = decoder.feed(payload)
        if envelope is not None:
            names |= set(envelope.tensors)
    assert not names & own and {"seal", "seals"} <= names
    # Whatever the aggregator wrote: its checkpoints and its final tensors.
    written = [*fed.checkpoints.glob("*.safetensors"), fed.run_dir / "model.safetensors"]
    assert len(written) >= 3
    for path in written:
        data = path.read_bytes()
        assert not any(window in data for window in secrets), path
        assert not own & set(load_file(str(path)))
