"""Seals and rosters: only the named sites open a seal, nobody alters one unnoticed, and a seal
opens only in the place (job, round, turn) it was made for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from safetensors.torch import load, save

from edge_agent.sealing import SiteSealing, to_tensor
from medsplit.protocol import JobSpec
from medsplit.security.seal import (
    SealError,
    SealHeader,
    SealKeys,
    bundle,
    open_seal,
    parse_roster,
    read_header,
    seal,
    unbundle,
    verify_roster,
    verify_sender,
)
from medsplit.security.seal_kit import SealKit, throwaway_kit, write_throwaway
from tests.support.configs import job_config

JOB = "job-s"
SITES = ["site-a", "site-b", "site-c"]


@pytest.fixture(scope="module")
def kit() -> SealKit:
    return throwaway_kit(JOB, SITES)


def _sealed(kit: SealKit, payload: bytes = b"weights", **changes: object) -> bytes:
    fields: dict[str, object] = {
        "job_id": JOB,
        "round": 2,
        "turn": 1,
        "sender": "site-a",
        "samples": 120,
        "recipients": ("site-a", "site-b"),
    }
    fields.update(changes)
    header = SealHeader(**fields)  # type: ignore[arg-type]
    return seal(payload, header, kit.keys[str(fields["sender"])], kit.roster)


def test_every_recipient_opens_the_seal_and_nobody_else(kit: SealKit) -> None:
    blob = _sealed(kit, b"the head's bytes")
    assert b"the head's bytes" not in blob  # the payload is not in the clear
    for site in ("site-a", "site-b"):
        header, payload = open_seal(blob, kit.keys[site], kit.roster, JOB)
        assert payload == b"the head's bytes"
        assert (header.sender, header.round, header.turn, header.samples) == ("site-a", 2, 1, 120)
    with pytest.raises(SealError, match="was not sealed to site-c"):
        open_seal(blob, kit.keys["site-c"], kit.roster, JOB)


def test_any_changed_byte_is_refused_naming_the_sender(kit: SealKit) -> None:
    blob = _sealed(kit, b"x" * 1000)
    for position in (len(blob) - 10, 20, len(blob) // 2):
        tampered = bytearray(blob)
        tampered[position] ^= 0x01
        with pytest.raises(SealError) as caught:
            open_seal(bytes(tampered), kit.keys["site-b"], kit.roster, JOB)
        assert "site-a" in str(caught.value) or "header" in str(caught.value)


def test_a_seal_made_with_another_key_does_not_verify(kit: SealKit) -> None:
    impostor = SealKeys.generate("site-a")  # a key pair the roster does not list
    header = SealHeader(JOB, 0, 0, "site-a", 10, ("site-b",))
    blob = seal(b"x", header, impostor, kit.roster)
    with pytest.raises(SealError, match="not made by site-a"):
        verify_sender(blob, kit.roster)


def test_a_seal_of_another_job_or_an_unknown_sender_is_refused(kit: SealKit) -> None:
    other = throwaway_kit("job-other", SITES)
    header = SealHeader("job-other", 0, 0, "site-a", 1, ("site-b",))
    foreign = seal(b"x", header, other.keys["site-a"], other.roster)
    with pytest.raises(SealError, match="not made by site-a"):  # other keys, same names
        open_seal(foreign, kit.keys["site-b"], kit.roster, JOB)
    with pytest.raises(SealError, match="belongs to job 'job-other'"):
        open_seal(foreign, other.keys["site-b"], other.roster, JOB)
    stranger = throwaway_kit(JOB, ["mallory"])
    header = SealHeader(JOB, 0, 0, "mallory", 1, ("mallory",))
    blob = seal(b"x", header, stranger.keys["mallory"], stranger.roster)
    with pytest.raises(SealError, match="mallory is not on the job's roster"):
        verify_sender(blob, kit.roster)


def test_a_wrapped_key_opens_only_in_its_own_place(kit: SealKit) -> None:
    """The HPKE info binds job, round, turn, sender and recipient: moving a recipient's wrapped
    key into another seal, or relabelling the header, does not open anything."""
    blob = _sealed(kit)
    header = read_header(blob)
    assert header.recipients == ("site-a", "site-b")
    relabelled = blob.replace(b'"round":2', b'"round":3')
    with pytest.raises(SealError):
        open_seal(relabelled, kit.keys["site-b"], kit.roster, JOB)


def test_bundles_keep_their_seals_in_order_and_refuse_garbage(kit: SealKit) -> None:
    seals = [_sealed(kit, bytes([i]) * 10) for i in range(3)]
    assert unbundle(bundle(seals)) == seals
    assert unbundle(bundle([])) == []
    for broken in (b"garbage", bundle(seals)[:-1], bundle(seals) + b"x"):
        with pytest.raises(SealError):
            unbundle(broken)


def test_the_roster_is_trusted_only_as_the_ca_signed_it(kit: SealKit) -> None:
    text = kit.roster.text
    assert verify_roster(text, kit.trust, JOB).sites.keys() == set(SITES)
    other_ca = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(SealError, match="does not verify against the CA"):
        verify_roster(text, other_ca, JOB)
    with pytest.raises(SealError, match="for job 'job-s', not 'job-x'"):
        verify_roster(text, kit.trust, "job-x")
    forged = text.replace(kit.roster.text[40:60], kit.roster.text[40:60][::-1])
    if forged != text:
        with pytest.raises(SealError):
            verify_roster(forged, kit.trust, JOB)
    with pytest.raises(SealError, match="not a signed roster"):
        parse_roster("{}", JOB)


def test_keys_written_by_a_kit_load_back_and_a_bad_file_says_what_it_needs(tmp_path: Path) -> None:
    ca_pem = write_throwaway(tmp_path, JOB, SITES)
    keys = SealKeys.load("site-b", tmp_path / "site-b" / "seal.key")
    roster = verify_roster((tmp_path / "roster.json").read_text(), _ca_key(ca_pem), JOB)
    assert roster.keys_of("site-b").same_as(keys.public())
    (tmp_path / "bad.key").write_text("not a key")
    with pytest.raises(SealError, match="expected one X25519 and one Ed25519 private key"):
        SealKeys.load("site-b", tmp_path / "bad.key")
    with pytest.raises(SealError, match="cannot read"):
        SealKeys.load("site-b", tmp_path / "missing.key")


def _ca_key(ca_pem: Path) -> ec.EllipticCurvePublicKey:
    from medsplit.security.seal import ca_public_key  # noqa: PLC0415

    return ca_public_key(ca_pem)


def _spec(orchestration: str) -> JobSpec:
    config = job_config(
        {"job_id": JOB, "plan": "mlp-ehr-u", "sites": SITES, "orchestration": orchestration}
    )
    return JobSpec(
        job_id=JOB,
        mode=config.mode,
        orchestration=config.orchestration,
        plan=config.plan,
        rounds=2,
        local_epochs=1,
        batch_size=16,
        optimizer=config.training.optimizer,
        seed=0,
        wire_dtype="float32",
        sealed=True,
        aggregation=config.aggregation,
    )


def _site(kit: SealKit, site: str) -> SiteSealing:
    sealing = SiteSealing(kit.keys[site], kit.trust)
    sealing.accept_roster(kit.roster.text, JOB)
    return sealing


def test_a_site_opens_a_relay_only_from_before_its_request(kit: SealKit) -> None:
    spec = _spec("sequential")
    a, b = _site(kit, "site-a"), _site(kit, "site-b")
    state = {"w": torch.arange(6.0).view(2, 3)}
    sealed = a.seal_state(state, spec, round=1, turn=0, samples=50, recipients=SITES)
    relay = to_tensor(bundle([sealed.numpy().tobytes()]))
    opened = b.open_relay(relay, spec, before=(1, 1))
    assert opened is not None and torch.equal(opened.weights["w"], state["w"])
    assert opened.senders == ("site-a",)
    with pytest.raises(SealError, match="not from before round 1 turn 0"):
        b.open_relay(relay, spec, before=(1, 0))  # replayed into its own place or earlier
    assert b.open_relay(to_tensor(bundle([])), spec, before=(0, 0)) is None


def test_a_relay_the_aggregator_altered_is_refused_with_the_sender_named(kit: SealKit) -> None:
    spec = _spec("sequential")
    a, b = _site(kit, "site-a"), _site(kit, "site-b")
    sealed = a.seal_state({"w": torch.ones(4)}, spec, round=0, turn=0, samples=5, recipients=SITES)
    data = bytearray(bundle([sealed.numpy().tobytes()]))
    data[-3] ^= 0xFF
    with pytest.raises(SealError, match="site-a"):
        b.open_relay(to_tensor(bytes(data)), spec, before=(0, 1))


def test_parallel_sites_combine_their_peers_to_the_same_bytes_and_drop_a_stray_start(
    kit: SealKit,
) -> None:
    spec = _spec("parallel")
    sealings = {site: _site(kit, site) for site in SITES}
    start = {"w": torch.zeros(5)}
    seals = []
    for i, (site, sealing) in enumerate(sealings.items()):
        sealing.remember_start(start if site != "site-c" else {"w": torch.full((5,), 9.0)})
        end = {"w": torch.full((5,), float(i + 1))}
        seals.append(
            sealing.seal_state(end, spec, round=0, turn=0, samples=10 * (i + 1), recipients=SITES)
        )
    relay = to_tensor(bundle(s.numpy().tobytes() for s in seals))
    results = [s.open_relay(relay, spec, before=(1, 0)) for s in sealings.values()]
    assert all(r is not None for r in results)
    combined = [save(r.weights) for r in results if r is not None]
    assert combined[0] == combined[1] == combined[2]  # every site ends with the same bytes
    # site-c started elsewhere than the majority: left out; two replies -> the weighted mean.
    expected = (1.0 * 10 + 2.0 * 20) / 30
    assert torch.allclose(load(combined[0])["w"], torch.full((5,), expected))
