"""A throw-away certificate authority for TLS tests, over ``medsplit.security.pki``.

``issue(name)`` writes a client certificate (or, with ``server=True``, one for ``localhost``)
and its key next to the CA; tests use it for a CA other than a federation's, and for HTTPS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medsplit.security import pki


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path


class CertificateAuthority:
    def __init__(self, folder: Path, name: str = "medsplit test CA") -> None:
        self.folder = folder
        self._ca = pki.CertificateAuthority.create(folder / "ca", name, validity_days=2)
        self.ca_file = self._ca.cert_path

    def issue(
        self, common_name: str, *, server: bool = False, hosts: tuple[str, ...] = ("localhost",)
    ) -> Identity:
        role: pki.Role = "broker" if server else "site"
        hosts = hosts if server else ()
        key, cert = self._ca.issue(common_name, role, validity_days=1, hosts=hosts)
        cert_path, key_path = self.folder / f"{common_name}.pem", self.folder / f"{common_name}.key"
        cert_path.write_bytes(cert)
        pki.write_private(key_path, key)
        return Identity(cert_path, key_path)
