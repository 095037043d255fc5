"""The parties' private set intersection, run stage by stage as the aggregator relays it."""

from __future__ import annotations

import pytest
import torch

from aggregator.alignment import alignment_script
from edge_agent.alignment import (
    AlignmentError,
    PartyAlignment,
    job_salt,
    salted_keys,
)


def _keys(*ids: int) -> list[str]:
    return [f"MRN{i:05d}" for i in ids]


def _relay(parties: dict[str, list[str]], label: str = "L") -> dict[str, PartyAlignment]:
    """The stages of ``aggregator.alignment``, with the tensors carried as the aggregator does."""
    salt = job_salt(b"secret", "job-a")
    names = list(parties)
    others = [p for p in names if p != label]
    sides = {
        p: PartyAlignment(p, label, others, salted_keys(k, salt, column="id", source=p), k)
        for p, k in parties.items()
    }
    carry: dict[str, torch.Tensor] = {}
    size = 0
    for stage in alignment_script(tuple(names), label):
        answers = [
            sides[ask.site].answer(ask.stage, ask.partner, size, dict(carry)) for ask in stage
        ]
        carry = {k: v for tensors, _ in answers for k, v in tensors.items() if v.numel()}
        size = next((s for _, s in answers if s is not None), size)
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
