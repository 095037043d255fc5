"""Sealing keys for a federation: each site's ``seal.key`` and the CA-signed ``roster.json``.

``medsplit provision`` writes them beside the TLS certificates (a key pair per site kept apart
from its TLS key, and the roster into the aggregator's kit); runs that make their own
throw-away federation -- the in-process experiment runner, tests -- use ``throwaway_kit``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from medsplit.security.seal import (
    PeerKeys,
    Roster,
    SealError,
    SealKeys,
    parse_roster,
    sign_roster,
    verify_roster,
)

SEAL_KEY_FILE = "seal.key"
ROSTER_FILE = "roster.json"


@dataclass(frozen=True)
class SealKit:
    """A federation's sealing material held in memory."""

    roster: Roster
    keys: Mapping[str, SealKeys]
    trust: ec.EllipticCurvePublicKey  # the key that signed the roster


def throwaway_kit(job_id: str, sites: Sequence[str]) -> SealKit:
    """Fresh keys for every site and a roster signed by a fresh key, for one run."""
    signer = ec.generate_private_key(ec.SECP256R1())
    keys = {site: SealKeys.generate(site) for site in sites}
    text = sign_roster(job_id, {s: k.public() for s, k in keys.items()}, signer)
    return SealKit(verify_roster(text, signer.public_key(), job_id), keys, signer.public_key())


def site_keys(folder: Path, site: str) -> SealKeys:
    """The site's keys in its kit folder, made the first time (kept when it is renewed)."""
    from medsplit.security.pki import write_private  # noqa: PLC0415

    path = folder / SEAL_KEY_FILE
    if path.is_file():
        return SealKeys.load(site, path)
    keys = SealKeys.generate(site)
    write_private(path, keys.pem())
    return keys


def roster_text(
    job_id: str, keys: Mapping[str, PeerKeys], signer: ec.EllipticCurvePrivateKey
) -> str:
    return sign_roster(job_id, keys, signer) + "\n"


def load_roster(path: Path, job_id: str, ca_public: ec.EllipticCurvePublicKey | None) -> Roster:
    """The aggregator's roster file; checked against the CA when the aggregator has one."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SealError(f"{path}: cannot read the roster ({exc.strerror})") from None
    try:
        if ca_public is None:
            return parse_roster(text, job_id)
        return verify_roster(text, ca_public, job_id)
    except SealError as exc:
        raise SealError(f"{path}: {exc}") from None


def write_throwaway(folder: Path, job_id: str, sites: Sequence[str]) -> Path:
    """A sealing kit for a run without ``medsplit provision`` (a plaintext loopback broker):
    a CA of its own in ``folder/ca``, ``folder/SITE/seal.key`` and ``folder/roster.json``.
    Returns the CA certificate the sites check the roster with."""
    from medsplit.security.pki import CertificateAuthority  # noqa: PLC0415

    ca = CertificateAuthority.create(folder / "ca", f"medsplit {job_id} sealing CA", 2)
    peers = {}
    for site in sites:
        (folder / site).mkdir(parents=True, exist_ok=True)
        peers[site] = site_keys(folder / site, site).public()
    (folder / ROSTER_FILE).write_text(roster_text(job_id, peers, ca.key))
    return ca.cert_path


@dataclass(frozen=True)
class SealingFiles:
    """Where a run's configs find the sealing material: the aggregator's roster, each site's
    keys, and the CA the sites check the roster with (None: their broker TLS CA)."""

    roster_file: Path
    folder: Path
    ca_file: Path | None

    def site_section(self, site: str) -> dict[str, str]:
        """The ``sealing`` group of ``site``'s site.yaml."""
        section = {"key_file": str(self.folder / site / SEAL_KEY_FILE)}
        return section if self.ca_file is None else {**section, "ca_file": str(self.ca_file)}


def sealing_files(
    kits: Path | None, workdir: Path, job_id: str, sites: Sequence[str]
) -> SealingFiles:
    """The provisioned kits' sealing material, or (a plaintext broker, no kits) a kit made
    for this run in ``workdir/sealing``."""
    if kits is not None:
        return SealingFiles(kits / "aggregator" / ROSTER_FILE, kits, None)
    folder = workdir / "sealing"
    ca = write_throwaway(folder, job_id, sites)
    return SealingFiles(folder / ROSTER_FILE, folder, ca)
