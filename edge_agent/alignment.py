"""Which patients every party of a vertical job holds, without telling anyone who is not shared.

Each party declares a key column (a patient identifier its records carry). Before anything
leaves the site, every key is salted with the job's salt and hashed (SHA-256), so that the
identifiers never travel and a key means nothing outside the job. The parties then run
OpenMined's private set intersection (``openmined-psi``: ECDH blinding, the client learns the
intersection, the server learns only the client's set size), the label party as the client and
each other party, in turn, as the server, the label party narrowing its set as it goes:

* a party other than the label party learns the size of the label party's set, and at the end
  which of its own rows are in the common set;
* the label party learns, of its own patients, which the first party holds, then which of
  those the second holds, and so on: in a job of three or more parties it learns more than the
  final intersection (its own patients the first party also holds), never anything of a
  patient it does not hold itself;
* whoever relays the messages (the aggregator) sees blinded group elements and set sizes. The
  common keys the label party hands the others at the end are encrypted (AES-GCM) under a key
  derived from the secret the parties share and the aggregator does not hold
  (``common_key``), so the aggregator learns the intersection's size and nothing else: not even
  the salted hashes of the common patients.

The common rows are then put in one order every party derives alone -- sorted by the
identifier itself, which every party holds for its own rows -- so that batches drawn from the
job seed line up row for row across the parties, and the order does not depend on the job's
salt (a job run again under another id trains on the same batches).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from medsplit.protocol.meta import AlignStage
from medsplit.protocol.spec import PSI_TENSORS

DIGEST_BYTES = 32  # SHA-256
NONCE_BYTES = 12  # AES-GCM's
COMMON_CONTEXT = b"medsplit vertical common keys"


def _psi() -> ModuleType:
    """OpenMined's PSI, imported when a vertical job needs it (docs/vertical.md: installed
    without its protobuf pin)."""
    try:
        from private_set_intersection import python as psi  # noqa: PLC0415
    except ImportError:
        raise AlignmentError(
            "a vertical job aligns its parties with openmined-psi, which is not installed "
            "(pip install --no-deps openmined-psi==2.0.6; docs/vertical.md)"
        ) from None
    module: ModuleType = psi
    return module


class AlignmentError(ValueError):
    """The parties' keys cannot be aligned; the message names the party, column and rows."""


def job_salt(secret: bytes, job_id: str) -> bytes:
    """The salt of one job's keys: the parties' shared secret bound to the job, so keys of
    two jobs never match and the aggregator, which does not hold the secret, cannot hash a
    guess."""
    return hashlib.sha256(secret + b"\x00medsplit-vertical-key\x00" + job_id.encode()).digest()


def common_key(secret: bytes, job_id: str) -> bytes:
    """The key the common keys travel under: the parties' shared secret bound to the job by
    HKDF, apart from the salt (another purpose, another key)."""
    info = COMMON_CONTEXT + b"\x00" + job_id.encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def seal_common(key: bytes, blob: bytes) -> bytes:
    """The common keys, encrypted for the other parties (a fresh nonce before the ciphertext)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, blob, COMMON_CONTEXT)


def open_common(key: bytes, sealed: bytes) -> bytes:
    """The common keys the label party sent; refused when they do not open with this party's
    key -- the parties' secrets differ, or the message was altered on the way."""
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], COMMON_CONTEXT)
    except (InvalidTag, ValueError):
        raise AlignmentError(
            "the common keys the label party sent do not open with this party's key: the "
            "parties' key_secret_file differ, or the message was altered on the way"
        ) from None


def salted_keys(values: Sequence[object], salt: bytes, *, column: str, source: str) -> list[str]:
    """Each row's key, salted and hashed. A missing key or one held by two rows is refused,
    naming the rows: a patient must be one row of a party's table."""
    keys = [str(value).strip() if value is not None else "" for value in values]
    missing = [row for row, key in enumerate(keys) if key in ("", "nan", "None")]
    if missing:
        rows = ", ".join(str(row + 1) for row in missing[:5])
        raise AlignmentError(
            f"{source}: key column {column!r} is empty in {len(missing)} row(s) (rows {rows}); "
            "every record needs its patient key"
        )
    repeated = [key for key, count in Counter(keys).items() if count > 1]
    if repeated:
        first = repeated[0]
        rows = ", ".join(str(row + 1) for row, key in enumerate(keys) if key == first)
        raise AlignmentError(
            f"{source}: key column {column!r} repeats {len(repeated)} key(s) (e.g. rows "
            f"{rows}); a patient must be one row of the table"
        )
    return [hashlib.sha256(salt + key.encode()).hexdigest() for key in keys]


def rows_of(keys: Sequence[str], common: Sequence[str]) -> list[int]:
    """The rows of ``keys`` that hold the ``common`` keys; every common key must be there."""
    index = {key: row for row, key in enumerate(keys)}
    missing = [key for key in common if key not in index]
    if missing:
        raise AlignmentError(
            f"{len(missing)} key(s) said to be common are not among this party's keys"
        )
    return [index[key] for key in common]


class KeyHolder:
    """A party other than the label party: the PSI server over its salted keys."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)
        self._psi = _psi()
        self._server = self._psi.server.CreateWithNewKey(True)

    def setup(self, asking: int) -> bytes:
        """The blinded keys, for a label party asking about ``asking`` keys. The setup lists
        them as they are (``RAW``): exact, where a Bloom filter or a Golomb-compressed set
        would admit false positives -- patients wrongly taken as common."""
        raw = self._psi.DataStructure.RAW
        message: Any = self._server.CreateSetupMessage(0.0, max(asking, 1), self.keys, raw)
        return bytes(message.SerializeToString())

    def answer(self, request: bytes) -> bytes:
        """The label party's blinded keys, blinded again by this party's secret."""
        response: Any = self._server.ProcessRequest(self._psi.Request.FromString(request))
        return bytes(response.SerializeToString())


class LabelHolder:
    """The label party: the PSI client, narrowing its keys party by party."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)
        self.remaining = list(keys)
        self._psi = _psi()
        self._client = self._psi.client.CreateWithNewKey(True)

    def restart(self) -> None:
        """All keys again (the alignment is run anew: the aggregator restarted)."""
        self.remaining = list(self.keys)
        self._client = self._psi.client.CreateWithNewKey(True)

    def request(self) -> bytes:
        """Its remaining keys, blinded by its secret."""
        return bytes(self._client.CreateRequest(self.remaining).SerializeToString())

    def narrow(self, setup: bytes, response: bytes) -> int:
        """Keep the remaining keys the other party holds too; returns how many are left."""
        found = self._client.GetIntersection(
            self._psi.ServerSetup.FromString(setup), self._psi.Response.FromString(response)
        )
        self.remaining = [self.remaining[i] for i in sorted(found)]
        self._client = self._psi.client.CreateWithNewKey(True)  # a fresh secret per party
        return len(self.remaining)

    def common(self) -> list[str]:
        """The common keys (sorted: their order tells nothing of the rows')."""
        return sorted(self.remaining)


def psi_self_check() -> str:
    """Run one small intersection through the installed PSI library, as the parties' holders
    do, and say which library answered: ``medsplit data-check`` tells a hospital before the
    job that alignment will work on this machine (or image), not at the job's first stage."""
    from importlib.metadata import version  # noqa: PLC0415

    label, holder = LabelHolder(["a", "b", "c"]), KeyHolder(["b", "c", "d"])
    request = label.request()
    if label.narrow(holder.setup(3), holder.answer(request)) != 2 or label.common() != ["b", "c"]:
        raise AlignmentError("openmined-psi is installed but gave a wrong intersection")
    return f"openmined-psi {version('openmined-psi')}"


class PartyAlignment:
    """One party's side of the stages the aggregator relays (``aggregator.alignment``)."""

    def __init__(
        self,
        party: str,
        label_party: str,
        others: list[str],
        keys: list[str],
        order: Sequence[str],
        *,
        sealing: bytes,
    ) -> None:
        """``keys``: the party's salted keys, row by row; ``order``: what its rows are sorted
        by once aligned (their identifiers, the same at every party); ``sealing``: the
        parties' ``common_key`` for the job, which the common keys travel under."""
        self.party = party
        self.sealing = sealing
        self.order = list(order)
        self.first_partner = others[0] if others else None
        self.label: LabelHolder | None = LabelHolder(keys) if party == label_party else None
        self.holder: KeyHolder | None = None if self.label else KeyHolder(keys)
        self.keys = keys
        self.rows: list[int] | None = None  # this party's rows of the common patients, in order
        self.common: list[str] = []

    def answer(
        self,
        stage: AlignStage,
        partner: str | None,
        asking: int,
        tensors: dict[str, torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], int | None]:
        """This party's answer to ``stage``: PSI bytes, and a set size where the stage has one."""
        if stage == "serve":
            holder = self._holder()
            request = _bytes(tensors["request"])
            return _tensors(setup=holder.setup(asking), response=holder.answer(request)), None
        if stage == "adopt":
            self._adopt(_digests(open_common(self.sealing, _bytes(tensors["common"]))))
            return _tensors(), len(self.common)
        label = self._label(stage)
        if stage == "ask":
            if partner == self.first_partner:
                label.restart()  # the alignment begins (again)
            return _tensors(request=label.request()), len(label.remaining)
        if stage == "narrow":
            left = label.narrow(_bytes(tensors["setup"]), _bytes(tensors["response"]))
            if left == 0:
                raise AlignmentError(
                    f"no patient of {self.party} is held by {partner} (no key in common): "
                    "nothing to train on"
                )
            return _tensors(), None
        self.common = label.common()
        self.rows = self._ordered(rows_of(label.keys, self.common))
        blob = b"".join(bytes.fromhex(k) for k in self.common)
        return _tensors(common=seal_common(self.sealing, blob)), len(self.common)

    def _adopt(self, common: list[str]) -> None:
        if not common:
            raise AlignmentError(f"no patient is common to every party, {self.party} included")
        self.rows = self._ordered(rows_of(self._holder().keys, common))
        self.common = common

    def _ordered(self, rows: list[int]) -> list[int]:
        return sorted(rows, key=lambda row: self.order[row])

    def _holder(self) -> KeyHolder:
        if self.holder is None:
            raise AlignmentError(f"{self.party} holds the labels: it asks, it does not serve")
        return self.holder

    def _label(self, stage: str) -> LabelHolder:
        if self.label is None:
            raise AlignmentError(f"{stage}: only the label party asks; {self.party} does not")
        return self.label


def _bytes(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.numpy().tobytes())


def _digests(blob: bytes) -> list[str]:
    if len(blob) % DIGEST_BYTES:
        raise AlignmentError(
            f"the common keys are {len(blob)} bytes, not a whole number of {DIGEST_BYTES}-byte "
            "digests"
        )
    return [blob[i : i + DIGEST_BYTES].hex() for i in range(0, len(blob), DIGEST_BYTES)]


def _tensors(**blobs: bytes) -> dict[str, torch.Tensor]:
    """Every PSI tensor of an alignment message, empty where the stage has nothing."""
    return {
        name: torch.frombuffer(bytearray(blobs[name]), dtype=torch.uint8)
        if blobs.get(name)
        else torch.zeros(0, dtype=torch.uint8)
        for name in PSI_TENSORS
    }
