"""Sealed segments: a site's own layers, readable only by the job's other sites.

In split modes a site's head (and tail) must reach the site that trains next (sequential) or
every site (parallel, where the sites average them themselves), through the aggregator and the
broker. A **seal** lets both relay the layers without reading or altering them:

* the tensors (safetensors bytes) are encrypted once with a fresh content key
  (ChaCha20-Poly1305), and that key is encrypted to each recipient's X25519 key with HPKE
  (RFC 9180, base mode, ``cryptography``'s ``hpke.Suite``); the HPKE ``info`` names the job,
  round, turn, sender and recipient, so a wrapped key opens nowhere else;
* the header (job, round, turn, sender, sample count, recipients, wrapped keys) is the AEAD's
  associated data and, with the ciphertext, is signed with the sender's Ed25519 key: nobody but
  the sender can make or change a seal, and the aggregator can check who sealed it and the
  sample count it bounds without opening it.

Each site holds its two private keys in ``seal.key``, apart from its TLS key. Its peers learn
the public halves from the **roster**: one JSON document listing every site's two public keys,
signed by the federation's CA (``medsplit provision`` writes it). The aggregator hands the
roster to the sites in ``setup``; a site trusts it only if the CA it already trusts for TLS
signed it for this job, so the aggregator cannot slip in a key of its own. A signed roster
rather than a certificate per site: one file to verify and to redistribute when a site joins or
is revoked, and X.509 has no standard way to certify an X25519 key with an Ed25519 key beside it.

Nothing here touches torch or the network: bytes in, bytes out.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
SEAL_MAGIC = b"MSSEAL1\n"
BUNDLE_MAGIC = b"MSBNDL1\n"
SIGNATURE_BYTES = 64
ROSTER_VERSION = 1
MAX_HEADER_BYTES = 1 << 20


class SealError(ValueError):
    """A seal or roster that cannot be used; the message names the sender and the reason."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise SealError(f"{what}: expected base64 text, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise SealError(f"{what}: not valid base64") from None


def _raw(key: x25519.X25519PublicKey | ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# -- keys ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SealKeys:
    """One site's private sealing keys: X25519 to open seals, Ed25519 to sign its own."""

    site: str
    opening: x25519.X25519PrivateKey
    signing: ed25519.Ed25519PrivateKey

    @classmethod
    def generate(cls, site: str) -> SealKeys:
        return cls(site, x25519.X25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate())

    def pem(self) -> bytes:
        """Both private keys as PKCS#8 PEM blocks, X25519 first (``seal.key``)."""
        return b"".join(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            for key in (self.opening, self.signing)
        )

    @classmethod
    def load(cls, site: str, path: Path) -> SealKeys:
        """Read ``seal.key``; SealError naming the file and what it should hold."""
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise SealError(f"{path}: cannot read the site's seal keys ({exc.strerror})") from None
        end = b"-----END PRIVATE KEY-----"
        blocks = [block + end for block in text.split(end) if block.strip()]
        try:
            keys = [serialization.load_pem_private_key(block, None) for block in blocks]
        except ValueError:
            keys = []
        opening = [k for k in keys if isinstance(k, x25519.X25519PrivateKey)]
        signing = [k for k in keys if isinstance(k, ed25519.Ed25519PrivateKey)]
        if len(opening) != 1 or len(signing) != 1:
            raise SealError(
                f"{path}: expected one X25519 and one Ed25519 private key in PEM "
                "(written by `medsplit provision`)"
            )
        return cls(site, opening[0], signing[0])

    def public(self) -> PeerKeys:
        return PeerKeys(self.opening.public_key(), self.signing.public_key())


@dataclass(frozen=True)
class PeerKeys:
    """A site's public halves, as the roster lists them."""

    sealing: x25519.X25519PublicKey
    verifying: ed25519.Ed25519PublicKey

    def same_as(self, other: PeerKeys) -> bool:
        return _raw(self.sealing) == _raw(other.sealing) and _raw(self.verifying) == _raw(
            other.verifying
        )


# -- the roster ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Roster:
    """Every site's public sealing keys for one job, as signed by the federation's CA."""

    job_id: str
    sites: Mapping[str, PeerKeys]
    text: str  # the signed document, as it travels

    def keys_of(self, site: str) -> PeerKeys:
        keys = self.sites.get(site)
        if keys is None:
            raise SealError(f"{site} is not on the job's roster of sealing keys")
        return keys


def _roster_body(job_id: str, sites: Mapping[str, PeerKeys]) -> bytes:
    entries = {
        site: {"sealing": _b64(_raw(k.sealing)), "verifying": _b64(_raw(k.verifying))}
        for site, k in sorted(sites.items())
    }
    document = {"version": ROSTER_VERSION, "job_id": job_id, "sites": entries}
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def sign_roster(
    job_id: str, sites: Mapping[str, PeerKeys], ca_key: ec.EllipticCurvePrivateKey
) -> str:
    """The roster of ``sites`` for ``job_id``, signed with the CA's key (ECDSA, SHA-256)."""
    body = _roster_body(job_id, sites)
    signature = ca_key.sign(body, ec.ECDSA(hashes.SHA256()))
    return json.dumps({"roster": body.decode(), "signature": _b64(signature)}, indent=1)


def _signed_parts(text: str) -> tuple[bytes, bytes]:
    try:
        outer = json.loads(text)
        return outer["roster"].encode(), _unb64(outer["signature"], "roster signature")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SealError("the roster is not a signed roster document (roster, signature)") from None


def parse_roster(text: str, job_id: str) -> Roster:
    """The roster in ``text``, its signature unchecked: for an aggregator without a CA file,
    which only relays it (every site checks the signature itself)."""
    body, _ = _signed_parts(text)
    try:
        document = json.loads(body)
        if not isinstance(document, dict) or not isinstance(document.get("sites"), dict):
            raise TypeError
    except (ValueError, TypeError):
        raise SealError("the roster's body is not a JSON object with sites") from None
    if document.get("version") != ROSTER_VERSION:
        raise SealError(f"roster version {document.get('version')!r}; expected {ROSTER_VERSION}")
    if document.get("job_id") != job_id:
        raise SealError(f"the roster is for job {document.get('job_id')!r}, not {job_id!r}")
    sites = {}
    for site, entry in document["sites"].items():
        if not isinstance(entry, dict):
            raise SealError(f"roster entry {site!r} is not an object")
        try:
            sites[site] = PeerKeys(
                x25519.X25519PublicKey.from_public_bytes(
                    _unb64(entry.get("sealing"), f"{site} sealing")
                ),
                ed25519.Ed25519PublicKey.from_public_bytes(
                    _unb64(entry.get("verifying"), f"{site} verifying")
                ),
            )
        except ValueError as exc:
            raise SealError(f"roster entry {site!r}: {exc}") from None
    return Roster(job_id, sites, text)


def verify_roster(text: str, ca_public: ec.EllipticCurvePublicKey, job_id: str) -> Roster:
    """The roster in ``text`` if the CA signed it for ``job_id``; SealError saying why not."""
    body, signature = _signed_parts(text)
    try:
        ca_public.verify(signature, body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SealError("the roster's signature does not verify against the CA") from None
    return parse_roster(text, job_id)


def ca_public_key(ca_pem: Path) -> ec.EllipticCurvePublicKey:
    """The federation CA's public key, the trust anchor of the roster."""
    from cryptography import x509  # noqa: PLC0415 - only where a CA file is read

    try:
        cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    except (OSError, ValueError) as exc:
        raise SealError(f"{ca_pem}: cannot read the CA certificate ({exc})") from None
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SealError(f"{ca_pem}: the CA's key is not an EC key")
    return key


# -- seals -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SealHeader:
    """What a seal says in the clear (and signs): where it belongs and whom it is for."""

    job_id: str
    round: int
    turn: int
    sender: str
    samples: int
    recipients: tuple[str, ...]

    @property
    def position(self) -> tuple[int, int]:
        return self.round, self.turn

    def describe(self) -> str:
        return f"the seal of {self.sender} (round {self.round}, turn {self.turn})"


def _info(header: SealHeader, recipient: str) -> bytes:
    fields = (header.job_id, str(header.round), str(header.turn), header.sender, recipient)
    return b"medsplit-seal-v1\x00" + "\x00".join(fields).encode()


def seal(
    payload: bytes,
    header: SealHeader,
    keys: SealKeys,
    roster: Roster,
) -> bytes:
    """``payload`` sealed to ``header.recipients`` (all on ``roster``), signed by ``keys``."""
    if keys.site != header.sender:
        raise SealError(f"{keys.site} cannot seal as {header.sender}")
    content_key = ChaCha20Poly1305.generate_key()
    wrapped = {
        site: _b64(
            SUITE.encrypt(content_key, roster.keys_of(site).sealing, info=_info(header, site))
        )
        for site in header.recipients
    }
    document = {
        "job_id": header.job_id,
        "round": header.round,
        "turn": header.turn,
        "sender": header.sender,
        "samples": header.samples,
        "recipients": list(header.recipients),
        "wrapped": wrapped,
    }
    head = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    body = ChaCha20Poly1305(content_key).encrypt(bytes(12), payload, head)  # the key is fresh
    signed = SEAL_MAGIC + struct.pack(">I", len(head)) + head
    signature = keys.signing.sign(signed + body)
    return signed + signature + body


def _split(blob: bytes) -> tuple[bytes, dict[str, object], bytes, bytes]:
    """(signed part, header document, signature, body) of a seal; SealError if malformed."""
    if not blob.startswith(SEAL_MAGIC) or len(blob) < len(SEAL_MAGIC) + 4:
        raise SealError("not a medsplit seal (bad magic)")
    (size,) = struct.unpack_from(">I", blob, len(SEAL_MAGIC))
    start = len(SEAL_MAGIC) + 4
    if size > MAX_HEADER_BYTES or start + size + SIGNATURE_BYTES > len(blob):
        raise SealError("a seal whose header runs past its end")
    head = blob[start : start + size]
    try:
        document = json.loads(head)
    except ValueError:
        raise SealError("a seal whose header is not JSON") from None
    if not isinstance(document, dict):
        raise SealError("a seal whose header is not a JSON object")
    signature = blob[start + size : start + size + SIGNATURE_BYTES]
    return blob[: start + size], document, signature, blob[start + size + SIGNATURE_BYTES :]


def read_header(blob: bytes) -> SealHeader:
    """The clear header of a seal, unverified (``verify_sender`` checks who made it)."""
    _, doc, _, _ = _split(blob)
    try:
        recipients = doc["recipients"]
        if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
            raise TypeError
        header = SealHeader(
            job_id=_text(doc["job_id"]),
            round=_number(doc["round"]),
            turn=_number(doc["turn"]),
            sender=_text(doc["sender"]),
            samples=_number(doc["samples"]),
            recipients=tuple(recipients),
        )
    except (KeyError, TypeError):
        raise SealError(
            "a seal header without job_id, round, turn, sender, samples and recipients"
        ) from None
    return header


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value


def _number(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError
    return value


def verify_sender(blob: bytes, roster: Roster) -> SealHeader:
    """The header of ``blob`` if its sender, on ``roster``, signed it; SealError otherwise."""
    header = read_header(blob)
    signed, _, signature, body = _split(blob)
    try:
        roster.keys_of(header.sender).verifying.verify(signature, signed + body)
    except InvalidSignature:
        raise SealError(
            f"{header.describe()} does not verify: altered, or not made by {header.sender}"
        ) from None
    return header


def open_seal(blob: bytes, keys: SealKeys, roster: Roster, job_id: str) -> tuple[SealHeader, bytes]:
    """The header and payload of a seal made for ``keys.site`` in ``job_id``."""
    header = verify_sender(blob, roster)
    if header.job_id != job_id:
        raise SealError(f"{header.describe()} belongs to job {header.job_id!r}, not {job_id!r}")
    _, doc, _, body = _split(blob)
    wrapped = doc.get("wrapped")
    if keys.site not in header.recipients or not isinstance(wrapped, dict):
        raise SealError(f"{header.describe()} was not sealed to {keys.site}")
    try:
        content_key = SUITE.decrypt(
            _unb64(wrapped.get(keys.site), "wrapped key"),
            keys.opening,
            info=_info(header, keys.site),
        )
        signed, _, _, _ = _split(blob)
        head = signed[len(SEAL_MAGIC) + 4 :]
        payload = ChaCha20Poly1305(content_key).decrypt(bytes(12), body, head)
    except (InvalidTag, ValueError):
        raise SealError(f"{header.describe()} does not open with {keys.site}'s key") from None
    return header, payload


# -- bundles: the seals a request relays -------------------------------------------------------------


def bundle(seals: Iterable[bytes]) -> bytes:
    """Several seals as one byte string, in order."""
    parts = list(seals)
    out = [BUNDLE_MAGIC, struct.pack(">I", len(parts))]
    for part in parts:
        out += [struct.pack(">Q", len(part)), part]
    return b"".join(out)


def unbundle(data: bytes) -> list[bytes]:
    """The seals of a bundle; SealError if it is malformed."""
    if not data.startswith(BUNDLE_MAGIC) or len(data) < len(BUNDLE_MAGIC) + 4:
        raise SealError("not a bundle of seals (bad magic)")
    (count,) = struct.unpack_from(">I", data, len(BUNDLE_MAGIC))
    offset, seals = len(BUNDLE_MAGIC) + 4, []
    for _ in range(count):
        if offset + 8 > len(data):
            raise SealError("a bundle of seals cut short")
        (size,) = struct.unpack_from(">Q", data, offset)
        offset += 8
        if offset + size > len(data):
            raise SealError("a bundle of seals cut short")
        seals.append(data[offset : offset + size])
        offset += size
    if offset != len(data):
        raise SealError("a bundle of seals with bytes after its last seal")
    return seals


def recipients_of(sites: Sequence[str], roster: Roster) -> tuple[str, ...]:
    """Whom a seal goes to: the listed sites that are on the roster, in order."""
    return tuple(s for s in sites if s in roster.sites)
