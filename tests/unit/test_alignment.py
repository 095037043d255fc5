"""The parties' private set intersection, run stage by stage as the aggregator relays it."""

from __future__ import annotations

import pytest

from aggregator.alignment import relay_in_process
from edge_agent.alignment import (
    AlignmentError,
    PartyAlignment,
    common_key,
    job_salt,
    open_common,
    salted_keys,
    seal_common,
)


def _keys(*ids: int) -> list[str]:
    return [f"MRN{i:05d}" for i in ids]


def _relay(
    parties: dict[str, list[str]], label: str = "L", secrets: dict[str, bytes] | None = None
) -> dict[str, PartyAlignment]:
    """The stages of ``aggregator.alignment``, with the tensors carried as the aggregator does."""
    salt = job_salt(b"secret", "job-a")
    secrets = secrets or {}
    names = list(parties)
    others = [p for p in names if p != label]
    sides = {
        p: PartyAlignment(
            p,
            label,
            others,
            salted_keys(k, salt, column="id", source=p),
            k,
            sealing=common_key(secrets.get(p, b"secret"), "job-a"),
        )
        for p, k in parties.items()
    }
    relay_in_process(sides, label)
    return sides


@pytest.mark.parametrize("count", [2, 3])
def test_every_party_ends_with_its_rows_of_the_common_patients_in_one_order(count: int) -> None:
    held = {"L": _keys(*range(0, 60)), "A": _keys(*range(20, 90)), "B": _keys(*range(10, 50))}
    parties = dict(list(held.items())[:count])
    sides = _relay(parties)
    common = set.intersection(*(set(k) for k in parties.values()))
    rows = {p: [parties[p][r] for r in side.rows or []] for p, side in sides.items()}
    assert set(rows["L"]) == common and len(rows["L"]) == len(common)
    assert all(r == rows["L"] for r in rows.values())  # row i of every party: one patient


def test_the_keys_depend_on_the_job_and_on_the_parties_secret() -> None:
    keys = _keys(1, 2)
    one = salted_keys(keys, job_salt(b"secret", "job-a"), column="id", source="s")
    assert one != salted_keys(keys, job_salt(b"secret", "job-b"), column="id", source="s")
    assert one != salted_keys(keys, job_salt(b"other", "job-a"), column="id", source="s")
    assert not any("MRN" in key for key in one)


def test_a_party_learns_only_the_common_keys_it_holds_itself() -> None:
    sides = _relay({"L": _keys(*range(0, 30)), "A": _keys(*range(25, 60))})
    assert set(sides["A"].common) <= set(sides["A"].keys)  # nothing of the label party's others
    assert len(sides["A"].common) == 5


def test_no_patient_in_common_is_refused() -> None:
    with pytest.raises(AlignmentError, match="no patient of L is held by A"):
        _relay({"L": _keys(1, 2, 3), "A": _keys(4, 5)})


@pytest.mark.parametrize(
    ("values", "said"),
    [
        (["MRN1", None, "MRN3"], "key column 'id' is empty in 1 row(s) (rows 2)"),
        (["MRN1", "MRN2", "MRN1"], "key column 'id' repeats 1 key(s) (e.g. rows 1, 3)"),
    ],
)
def test_a_missing_or_repeated_key_is_refused_naming_the_rows(
    values: list[str | None], said: str
) -> None:
    with pytest.raises(AlignmentError) as refused:
        salted_keys(values, b"salt", column="id", source="labs.csv")
    assert str(refused.value).startswith("labs.csv: ") and said in str(refused.value)


def test_the_common_keys_travel_encrypted_for_the_parties_only() -> None:
    salt = job_salt(b"secret", "job-a")
    key = common_key(b"secret", "job-a")
    assert key != common_key(b"secret", "job-b") and key != common_key(b"other", "job-a")
    blob = b"".join(
        bytes.fromhex(k) for k in salted_keys(_keys(1, 2), salt, column="id", source="L")
    )
    sealed = seal_common(key, blob)
    assert blob not in sealed and sealed != seal_common(key, blob)  # a fresh nonce each time
    assert open_common(key, sealed) == blob
    with pytest.raises(AlignmentError, match="do not open with this party's key"):
        open_common(common_key(b"other", "job-a"), sealed)
    with pytest.raises(AlignmentError, match="altered on the way"):
        open_common(key, sealed[:-1] + bytes([sealed[-1] ^ 1]))


def test_a_party_whose_secret_differs_cannot_read_the_common_keys() -> None:
    # Same keys, so the intersection is found; the other party's secret differs only for the
    # key the common keys travel under: it is refused, saying why, rather than misaligned.
    with pytest.raises(AlignmentError, match="key_secret_file differ"):
        _relay({"L": _keys(1, 2, 3), "A": _keys(2, 3)}, secrets={"A": b"not the secret"})
