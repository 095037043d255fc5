"""The federation's certificate authority: keys, certificates, the CRL and the inventory.

Every certificate is ECDSA P-256 / SHA-256. Leaf certificates are short-lived (30 days by
default): a stolen key is worth little for long, and renewing is one command. The CA's key is
written 0600 and belongs offline once the kits are out (docs/security.md).

``inventory.json`` beside the CA lists every certificate ever issued (serial, identity, role,
validity, revocation): the CRL is rebuilt from it, and a renewal knows which certificate it
supersedes.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medsplit.storage import atomic_write

Role = Literal["ca", "broker", "aggregator", "site", "bridge"]
UTC = datetime.timezone.utc


class PkiError(ValueError):
    """A certificate, key or CA folder that cannot be used; the message names the file."""


def now() -> datetime.datetime:
    return datetime.datetime.now(UTC)


@dataclass
class Issued:
    """One certificate the CA signed, as the inventory keeps it."""

    serial: int
    identity: str
    role: Role
    not_before: str
    not_after: str
    revoked_at: str | None = None
    reason: str | None = None  # "revoked" (the identity left) or "superseded" (renewed)


def write_private(path: Path, data: bytes) -> None:
    """A secret file: written atomically, readable by its owner only."""
    atomic_write(path, data)
    os.chmod(path, 0o600)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def read_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise PkiError(f"{path}: certificate file not found") from None
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM certificate ({exc})") from None


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


class CertificateAuthority:
    """The CA in ``folder`` (``ca.pem``, ``ca.key``, ``inventory.json``, ``crl.pem``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.cert_path = folder / "ca.pem"
        self.key_path = folder / "ca.key"
        self.inventory_path = folder / "inventory.json"
        self.crl_path = folder / "crl.pem"
        if not self.cert_path.is_file() or not self.key_path.is_file():
            raise PkiError(f"{folder}: no CA here (expected ca.pem and ca.key)")
        self.cert = read_certificate(self.cert_path)
        try:
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        except ValueError as exc:
            raise PkiError(f"{self.key_path}: not a PEM private key ({exc})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{self.key_path}: expected an EC private key")
        self.key = key
        self.inventory = self._read_inventory()

    @classmethod
    def create(cls, folder: Path, name: str, validity_days: float) -> CertificateAuthority:
        """A new self-signed CA; refuses to overwrite an existing one."""
        if (folder / "ca.key").exists():
            raise PkiError(f"{folder}: a CA already exists here; it is never overwritten")
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        start = now() - datetime.timedelta(minutes=5)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=validity_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        write_private(folder / "ca.key", key_pem(key))
        atomic_write(folder / "ca.pem", cert_pem(cert))
        atomic_write(folder / "inventory.json", b"[]\n")
        ca = cls(folder)
        ca.write_crl()
        return ca

    # -- issuing ----------------------------------------------------------------------------------

    def issue(
        self,
        identity: str,
        role: Role,
        validity_days: float,
        *,
        hosts: tuple[str, ...] = (),
        not_after: datetime.datetime | None = None,
    ) -> tuple[bytes, bytes]:
        """A new key and certificate (PEM) for ``identity`` (the CN), recorded in the inventory.

        ``not_after`` overrides the validity (a test's already expired certificate)."""
        key = ec.generate_private_key(ec.SECP256R1())
        start = now() - datetime.timedelta(minutes=5)
        end = not_after or min(start + datetime.timedelta(days=validity_days), self.expires)
        usage = (
            ExtendedKeyUsageOID.SERVER_AUTH if role == "broker" else ExtendedKeyUsageOID.CLIENT_AUTH
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(identity))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(min(start, end - datetime.timedelta(seconds=1)))
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        self.inventory.append(
            Issued(
                cert.serial_number,
                identity,
                role,
                cert.not_valid_before_utc.isoformat(),
                cert.not_valid_after_utc.isoformat(),
            )
        )
        self._save_inventory()
        return key_pem(key), cert_pem(cert)

    @property
    def expires(self) -> datetime.datetime:
        return self.cert.not_valid_after_utc

    # -- revoking ---------------------------------------------------------------------------------

    def revoke(self, identity: str, reason: str = "revoked", *, keep: int | None = None) -> int:
        """Revoke every unrevoked certificate of ``identity`` (except serial ``keep``); returns
        how many. The CRL is rewritten."""
        stamp = now().isoformat()
        count = 0
        for issued in self.inventory:
            if issued.identity == identity and issued.revoked_at is None and issued.serial != keep:
                issued.revoked_at, issued.reason = stamp, reason
                count += 1
        self._save_inventory()
        self.write_crl()
        return count

    def write_crl(self) -> bytes:
        """The CRL of every revoked certificate, signed, valid until the CA expires (an expired
        CRL would make the broker refuse everyone)."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now() - datetime.timedelta(minutes=5))
            .next_update(self.expires)
            .add_extension(x509.CRLNumber(len(self.revoked) + 1), critical=False)
        )
        for issued in self.revoked:
            when = datetime.datetime.fromisoformat(issued.revoked_at or now().isoformat())
            code = (
                x509.ReasonFlags.superseded
                if issued.reason == "superseded"
                else x509.ReasonFlags.cessation_of_operation
            )
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(issued.serial)
                .revocation_date(when)
                .add_extension(x509.CRLReason(code), critical=False)
                .build()
            )
        pem = builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        atomic_write(self.crl_path, pem)
        return pem

    @property
    def revoked(self) -> list[Issued]:
        return [i for i in self.inventory if i.revoked_at is not None]

    # -- the inventory ----------------------------------------------------------------------------

    def _read_inventory(self) -> list[Issued]:
        try:
            rows = json.loads(self.inventory_path.read_text())
            return [Issued(**row) for row in rows]
        except FileNotFoundError:
            return []
        except (ValueError, TypeError) as exc:
            raise PkiError(f"{self.inventory_path}: unreadable inventory ({exc})") from None

    def _save_inventory(self) -> None:
        rows = [asdict(i) for i in self.inventory]
        atomic_write(self.inventory_path, (json.dumps(rows, indent=1) + "\n").encode())


WARN_BEFORE_DAYS = 7  # a certificate this close to expiry is logged as a warning at start


def days_left(path: Path) -> float:
    """Days until the certificate in ``path`` expires (negative once it has)."""
    left = read_certificate(path).not_valid_after_utc - now()
    return left.total_seconds() / 86400


def describe_client_certificate(
    path: Path, identity: str, job: str | None = None
) -> tuple[str, bool]:
    """What a process says at start about its certificate, and whether it is a warning.

    Raises ``PkiError`` when the certificate cannot work: its CN is neither ``identity`` nor, in
    a several-job federation, ``identity@job`` (the broker's ACL would deny every message,
    silently), or it has expired."""
    cert = read_certificate(path)
    name = common_name(cert)
    accepted = [identity] if job is None else [identity, f"{identity}@{job}"]
    if name not in accepted:
        raise PkiError(
            f"{path}: the certificate is for {name!r}, this process is "
            f"{' or '.join(map(repr, accepted))}; the broker would deny all its messages "
            "(use this identity's kit)"
        )
    identity = name
    left = cert.not_valid_after_utc - now()
    until = cert.not_valid_after_utc.date().isoformat()
    if left.total_seconds() <= 0:
        raise PkiError(f"{path}: the certificate of {identity} expired on {until}; renew it")
    days = left.total_seconds() / 86400
    warn = days < WARN_BEFORE_DAYS
    note = f"certificate of {identity} valid until {until} ({days:.0f} days left)"
    if warn:
        note += f"; renew it: medsplit provision --out DIR --renew {identity}"
    return note, warn
