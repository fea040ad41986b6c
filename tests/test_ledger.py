"""The node's privacy ledger: persistent, composed by the accountant, refusing past the cap."""

from __future__ import annotations

import json
import threading

import pytest

from fedsynth.generative.accounting import epsilon_of
from fedsynth.privacy.ledger import LedgerError, PrivacyLedger

DELTA = 1e-5
ROUND = [(1.2, 0.05, 40)]


def test_spend_persists_and_epsilon_is_recomputed_from_the_whole_history(tmp_path):
    path = tmp_path / "node" / "ledger.json"
    ledger = PrivacyLedger(path)
    after_1 = ledger.spend("bank", "train", ROUND, delta=DELTA, run=1, round=1)
    after_2 = ledger.spend("bank", "train", ROUND, delta=DELTA, run=1, round=2)
    assert 0 < after_1 < after_2
    reopened = PrivacyLedger(path)  # a restarted node reads the same file
    assert reopened.history("bank") == ROUND * 2
    assert reopened.epsilon("bank", DELTA) == pytest.approx(epsilon_of(ROUND * 2, DELTA))
    assert after_2 == pytest.approx(epsilon_of(ROUND * 2, DELTA))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert reopened.history("other") == [] and reopened.epsilon("other", DELTA) == 0.0


def test_check_refuses_past_the_cap_and_a_refusal_is_kept(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    one_round = epsilon_of(ROUND, DELTA)
    check = ledger.check("bank", ROUND, cap=one_round * 1.2, delta=DELTA)
    assert check.allowed and check.spent == 0.0 and check.after == pytest.approx(one_round)
    ledger.spend("bank", "train", ROUND, delta=DELTA)
    second = ledger.check("bank", ROUND, cap=one_round * 1.2, delta=DELTA)
    assert not second.allowed and second.after > second.cap
    assert second.remaining == pytest.approx(one_round * 0.2)
    ledger.refuse("bank", "train", second, delta=DELTA, run=1, round=2)
    refusal = ledger.section("bank")["refusals"][0]
    assert refusal["round"] == 2 and refusal["would_reach"] == pytest.approx(second.after)
    assert ledger.history("bank") == ROUND  # a refusal spends nothing


def test_a_damaged_or_foreign_file_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    with pytest.raises(LedgerError, match="unreadable ledger"):
        PrivacyLedger(path).spend("bank", "train", ROUND, delta=DELTA)
    assert path.read_text() == "{not json"
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(LedgerError, match="not a fedsynth-ledger/1 file"):
        PrivacyLedger(path).history("bank")


def test_delta_of_a_federation_cannot_change_silently(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    ledger.spend("bank", "train", ROUND, delta=DELTA)
    with pytest.raises(LedgerError, match="accounted at delta 1e-05, not 0.0001"):
        ledger.spend("bank", "train", ROUND, delta=1e-4)


def test_concurrent_spends_are_all_kept(tmp_path):
    path = tmp_path / "ledger.json"

    def spend(i: int) -> None:
        PrivacyLedger(path).spend("bank", "train", ROUND, delta=DELTA, round=i)

    threads = [threading.Thread(target=spend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rounds = sorted(e["round"] for e in PrivacyLedger(path).section("bank")["entries"])
    assert rounds == list(range(6))


def test_released_values_are_remembered_for_resending(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    assert ledger.recall("bank", "counts") is None
    ledger.remember("bank", "counts", [10.5, 3.25], delta=DELTA)
    assert PrivacyLedger(tmp_path / "ledger.json").recall("bank", "counts") == [10.5, 3.25]
