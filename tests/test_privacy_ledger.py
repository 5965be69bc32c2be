"""The privacy ledger: persistence across restarts, budget enforcement, fail-closed loading."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privet.common.errors import BudgetExhaustedError, PrivacyError
from privet.common.privacy import (
    Ledger,
    LedgerEntry,
    epsilon_from_history,
    open_ledger,
    save_ledger,
)

DELTA = 1e-5
# One round of 100 steps at sigma 1.0, q 0.01 costs eps 1.21 (RDP), two 1.34; 2000 steps 2.87.
ROUND: dict[str, Any] = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 100}


def _open(path: Path, **overrides: Any) -> Ledger:
    kwargs: dict[str, Any] = {
        "client_id": "c0",
        "accountant": "rdp",
        "delta": DELTA,
        "budget_epsilon": 2.0,
    }
    kwargs.update(overrides)
    return open_ledger(path, **kwargs)


def test_new_ledger_is_created_and_saved(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger-c0.json"
    ledger = _open(path)
    assert path.is_file()
    assert ledger.entries == []
    assert ledger.epsilon() == 0.0
    data = json.loads(path.read_text())
    assert data["client_id"] == "c0"
    assert data["format_version"] == 1
    assert data["budget_epsilon"] == 2.0


def test_ledger_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = _open(path)
    ledger.planned_noise_multiplier = 1.0
    ledger.record_round(round=1, **ROUND)
    ledger.record_round(round=2, noise_multiplier=1.3, sample_rate=0.02, steps=50)
    save_ledger(ledger, path)
    before = ledger.epsilon()

    reloaded = _open(path)  # a fresh object, as after a process restart
    assert reloaded.epsilon() == pytest.approx(before, abs=1e-12)
    assert reloaded.history() == [(1.0, 0.01, 100), (1.3, 0.02, 50)]
    assert reloaded.planned_noise_multiplier == 1.0
    assert before == pytest.approx(
        epsilon_from_history(reloaded.history(), delta=DELTA, accountant="rdp"), abs=1e-12
    )
    assert reloaded.entries[-1].epsilon_after == pytest.approx(before, abs=1e-12)


def test_prv_ledger_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = _open(path, accountant="prv")
    entry = ledger.record_round(round=1, **ROUND)
    save_ledger(ledger, path)
    assert isinstance(entry.epsilon_after, float)
    assert _open(path, accountant="prv").epsilon() == pytest.approx(entry.epsilon_after, abs=1e-12)


def test_epsilon_is_recomputed_not_read_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = _open(path)
    ledger.record_round(round=1, **ROUND)
    save_ledger(ledger, path)
    data = json.loads(path.read_text())
    data["entries"][0]["epsilon_after"] = 0.0
    path.write_text(json.dumps(data))
    assert _open(path).epsilon() == pytest.approx(ledger.epsilon(), abs=1e-12)


def test_exhausted_budget_refuses_and_records_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = _open(path)
    ledger.record_round(round=1, **ROUND)
    ledger.record_round(round=2, **ROUND)
    save_ledger(ledger, path)
    spent = ledger.epsilon()
    with pytest.raises(BudgetExhaustedError, match=r"client 'c0' has spent eps=.* budget 2"):
        ledger.check_round(noise_multiplier=1.0, sample_rate=0.01, steps=1800)
    with pytest.raises(BudgetExhaustedError) as info:
        ledger.record_round(round=3, noise_multiplier=1.0, sample_rate=0.01, steps=1800)
    assert info.value.fix is not None and "budget_epsilon" in info.value.fix
    assert len(ledger.entries) == 2
    assert ledger.epsilon() == spent
    assert len(_open(path).entries) == 2


def test_check_round_returns_the_projection(tmp_path: Path) -> None:
    ledger = _open(tmp_path / "ledger.json")
    projected = ledger.check_round(**ROUND)
    assert projected == pytest.approx(ledger.projected_epsilon(**ROUND))
    assert ledger.entries == []  # checking records nothing


def test_unbounded_budget_never_refuses(tmp_path: Path) -> None:
    ledger = _open(tmp_path / "ledger.json", budget_epsilon=None)
    for r in range(1, 6):
        ledger.record_round(round=r, noise_multiplier=0.8, sample_rate=0.05, steps=200)
    assert ledger.epsilon() > 10


def test_a_round_far_ahead_or_going_back_never_locks_the_ledger(tmp_path: Path) -> None:
    # Round numbers are the coordinator's labels: round 1000 then round 2 (a coordinator poisoning
    # the order, or a new run in the same state folder) are two releases, both charged, and the
    # ledger keeps taking rounds; only the budget refuses.
    path = tmp_path / "ledger.json"
    ledger = _open(path, budget_epsilon=None)
    ledger.record_round(round=1000, **ROUND)
    ledger.record_round(round=2, **ROUND)
    ledger.record_round(round=1, run="another run", **ROUND)
    save_ledger(ledger, path)
    again = _open(path, budget_epsilon=None)
    assert [(e.round, e.attempt, e.run) for e in again.entries] == [
        (1000, 1, None),
        (2, 1, None),
        (1, 1, "another run"),
    ]
    assert again.epsilon() == epsilon_from_history(
        [(1.0, 0.01, 100)] * 3, delta=DELTA, accountant="rdp"
    )


def test_a_ledger_with_miscounted_attempts_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = _open(path, budget_epsilon=None)
    ledger.record_round(round=1, **ROUND)
    data = json.loads(ledger.model_dump_json())
    data["entries"][0]["attempt"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(PrivacyError, match="cannot be read"):
        _open(path, budget_epsilon=None)


def test_redone_round_is_charged_again(tmp_path: Path) -> None:
    # A crash after round 2 was charged and before its checkpoint: the resumed run redoes round 2.
    path = tmp_path / "ledger.json"
    ledger = _open(path, budget_epsilon=None)
    ledger.record_round(round=1, **ROUND)
    ledger.record_round(round=2, **ROUND)
    save_ledger(ledger, path)
    ledger = _open(path, budget_epsilon=None)  # the restarted process
    redo = ledger.record_round(round=2, noise_multiplier=1.3, sample_rate=0.02, steps=50)
    save_ledger(ledger, path)
    assert redo.attempt == 2
    assert [(e.round, e.attempt) for e in ledger.entries] == [(1, 1), (2, 1), (2, 2)]
    assert ledger.attempts() == {1: 1, 2: 2}
    steps = [(1.0, 0.01, 100), (1.0, 0.01, 100), (1.3, 0.02, 50)]
    assert ledger.history() == steps
    # Every attempt counts: the accountant's epsilon over all three releases, not two.
    assert ledger.epsilon() == epsilon_from_history(steps, delta=DELTA, accountant="rdp")
    assert ledger.epsilon() == pytest.approx(1.42107, abs=1e-5)  # Opacus RDP, pinned
    assert ledger.epsilon() > epsilon_from_history(steps[:2], delta=DELTA, accountant="rdp")
    assert redo.epsilon_after == ledger.epsilon()
    # A third attempt, then the next round starts again at attempt 1; the file round-trips.
    ledger.record_round(round=2, **ROUND)
    ledger.record_round(round=3, **ROUND)
    save_ledger(ledger, path)
    again = _open(path, budget_epsilon=None)
    assert [(e.round, e.attempt) for e in again.entries] == [(1, 1), (2, 1), (2, 2), (2, 3), (3, 1)]
    assert json.loads(path.read_text())["entries"][3]["attempt"] == 3


def test_redo_past_the_budget_is_refused(tmp_path: Path) -> None:
    two = epsilon_from_history([(1.0, 0.01, 100)] * 2, delta=DELTA, accountant="rdp")
    three = epsilon_from_history([(1.0, 0.01, 100)] * 3, delta=DELTA, accountant="rdp")
    ledger = _open(tmp_path / "ledger.json", budget_epsilon=(two + three) / 2)
    ledger.record_round(round=1, **ROUND)
    ledger.record_round(round=2, **ROUND)
    with pytest.raises(BudgetExhaustedError, match="would bring it to"):
        ledger.record_round(round=2, **ROUND)
    assert [(e.round, e.attempt) for e in ledger.entries] == [(1, 1), (2, 1)]
    assert ledger.epsilon() == two


def test_invalid_round_settings_are_refused(tmp_path: Path) -> None:
    ledger = _open(tmp_path / "ledger.json")
    with pytest.raises(PrivacyError):
        ledger.record_round(round=1, noise_multiplier=0.0, sample_rate=0.01, steps=10)
    with pytest.raises(PrivacyError):
        ledger.record_round(round=1, noise_multiplier=1.0, sample_rate=1.5, steps=10)
    with pytest.raises(PrivacyError):
        ledger.record_round(round=-1, **ROUND)
    assert ledger.entries == []


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("delta", 1e-6, "delta"),
        ("accountant", "prv", "accountant"),
        ("client_id", "c1", "belongs to client"),
    ],
)
def test_mismatched_settings_are_refused(
    tmp_path: Path, field: str, value: Any, match: str
) -> None:
    path = tmp_path / "ledger.json"
    ledger = _open(path)
    ledger.record_round(round=1, **ROUND)
    save_ledger(ledger, path)
    with pytest.raises(PrivacyError, match=match):
        _open(path, **{field: value})
    assert len(_open(path).entries) == 1  # the file was not touched


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{not json",
        "[]",
        '{"client_id": "c0"}',
        "\xff\xfe garbage",
    ],
)
def test_corrupt_file_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(content, encoding="latin-1")
    with pytest.raises(PrivacyError, match=r"ledger\.json"):
        _open(path)
    assert path.read_text(encoding="latin-1") == content  # never overwritten


def _valid_json(**changes: Any) -> str:
    data: dict[str, Any] = {
        "format_version": 1,
        "client_id": "c0",
        "accountant": "rdp",
        "delta": DELTA,
        "budget_epsilon": 2.0,
        "planned_noise_multiplier": None,
        "entries": [
            {
                "round": 1,
                "noise_multiplier": 1.0,
                "sample_rate": 0.01,
                "steps": 100,
                "epsilon_after": 0.7,
                "recorded_at": "2025-01-01T00:00:00+00:00",
            }
        ],
    }
    data.update(changes)
    return json.dumps(data)


@pytest.mark.parametrize(
    "changes",
    [
        {"format_version": 2},
        {"unknown_field": 1},
        {"entries": [{"round": 1}]},
        {
            "entries": [
                {
                    "round": r,
                    "noise_multiplier": 1.0,
                    "sample_rate": 0.01,
                    "steps": 10,
                    "epsilon_after": 0.1,
                    "recorded_at": "2025-01-01T00:00:00+00:00",
                }
                for r in (2, 2)
            ]
        },
        *[
            {
                "entries": [
                    {
                        "round": r,
                        "attempt": a,
                        "noise_multiplier": 1.0,
                        "sample_rate": 0.01,
                        "steps": 10,
                        "epsilon_after": 0.1,
                        "recorded_at": "2025-01-01T00:00:00+00:00",
                    }
                    for r, a in bad
                ]
            }
            for bad in ([(2, 1), (2, 3)], [(2, 2)], [(3, 1), (2, 2)], [(2, 1), (3, 2)])
        ],
    ],
)
def test_invalid_ledger_content_is_refused(tmp_path: Path, changes: dict[str, Any]) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(_valid_json(**changes))
    with pytest.raises(PrivacyError, match=r"ledger\.json"):
        _open(path)


def test_valid_hand_written_ledger_loads(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(_valid_json())
    ledger = _open(path)
    assert isinstance(ledger.entries[0], LedgerEntry)
    assert ledger.history() == [(1.0, 0.01, 100)]


@pytest.mark.parametrize("new_budget", [1.0, 5.0, None])
def test_budget_change_is_stored(tmp_path: Path, new_budget: float | None) -> None:
    path = tmp_path / "ledger.json"
    _open(path)
    assert _open(path, budget_epsilon=new_budget).budget_epsilon == new_budget
    assert json.loads(path.read_text())["budget_epsilon"] == new_budget


def test_lower_budget_than_spent_refuses_the_next_round(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = _open(path)
    ledger.record_round(round=1, **ROUND)
    save_ledger(ledger, path)
    stricter = _open(path, budget_epsilon=0.5)
    with pytest.raises(BudgetExhaustedError):
        stricter.check_round(**ROUND)


def test_atomic_save_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = _open(path)
    for r in range(1, 4):
        ledger.record_round(round=r, noise_multiplier=2.0, sample_rate=0.01, steps=10)
        save_ledger(ledger, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]
    assert len(_open(path).entries) == 3


def test_failed_save_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger.json"
    ledger = _open(path)
    old = path.read_text()
    ledger.record_round(round=1, **ROUND)

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_ledger(ledger, path)
    assert path.read_text() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


rounds_strategy = st.lists(
    st.tuples(
        st.floats(min_value=0.7, max_value=3.0),
        st.floats(min_value=0.005, max_value=0.05),
        st.integers(min_value=1, max_value=300),
    ),
    min_size=1,
    max_size=8,
)


@pytest.mark.filterwarnings("ignore:Optimal order:UserWarning")
@settings(max_examples=12, deadline=None)
@given(rounds=rounds_strategy, redo=st.lists(st.booleans(), min_size=8, max_size=8))
def test_redone_rounds_count_every_attempt(
    rounds: list[tuple[float, float, int]], redo: list[bool]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.json"
        released: list[tuple[float, float, int]] = []
        r = 0
        for i, (sigma, q, steps) in enumerate(rounds):
            r += 0 if (redo[i] and r > 0) else 1  # a crash before the checkpoint: same round again
            ledger = _open(path, budget_epsilon=None)  # a fresh process each time
            ledger.record_round(round=r, noise_multiplier=sigma, sample_rate=q, steps=steps)
            save_ledger(ledger, path)
            released.append((sigma, q, steps))
        final = _open(path, budget_epsilon=None)
        assert final.history() == released
        assert final.epsilon() == epsilon_from_history(released, delta=DELTA, accountant="rdp")
        assert sum(final.attempts().values()) == len(rounds)


@pytest.mark.filterwarnings("ignore:Optimal order:UserWarning")
@settings(max_examples=12, deadline=None)
@given(rounds=rounds_strategy, budget=st.floats(min_value=0.5, max_value=6.0))
def test_restarts_never_record_past_the_budget(
    rounds: list[tuple[float, float, int]], budget: float
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.json"
        refused = 0
        for r, (sigma, q, steps) in enumerate(rounds, start=1):
            ledger = _open(path, budget_epsilon=budget)  # a fresh process each round
            try:
                ledger.record_round(round=r, noise_multiplier=sigma, sample_rate=q, steps=steps)
            except BudgetExhaustedError:
                refused += 1
                continue
            save_ledger(ledger, path)
        final = _open(path, budget_epsilon=budget)
        assert final.epsilon() <= budget + 1e-9
        assert all(e.epsilon_after <= budget + 1e-9 for e in final.entries)
        assert len(final.entries) + refused == len(rounds)


def test_report_lists_rounds_charged_again() -> None:
    from privet.common.config import PrivetConfig
    from privet.server.recording import RoundRecord
    from privet.server.rundir.privacy_report import privacy_lines, privacy_report

    history = [
        RoundRecord(round=0),
        RoundRecord(round=1, epsilon_per_client={"a": 1.0, "b": 1.0}),
        # the resumed run's round 2: site a had trained it once before the crash
        RoundRecord(round=2, epsilon_per_client={"a": 1.9, "b": 1.4}, charged_again={"a": 2}),
    ]
    report = privacy_report(
        PrivetConfig(),
        history=history,
        client_names=["a", "b"],
        examples_per_client={"a": 100, "b": 100},
        client_level=None,
        stopped=None,
    )
    clients = report["sample_level"]["clients"]
    assert clients["a"]["charges_per_round"] == {"2": 2}
    assert clients["b"]["charges_per_round"] == {}
    lines = privacy_lines(report)
    assert "joined rounds [1, 2], round 2 charged 2 times (redone after a resume)" in lines[0]
    assert "charged" not in lines[1]


# ---- every refusal, word for word (mutation testing found messages and fixes no test read) ------


def _refusal(call: Any) -> PrivacyError:
    with pytest.raises(PrivacyError) as info:
        call()
    return info.value


def test_each_refusal_of_an_existing_ledger_says_why_and_how_to_fix_it(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = _open(path)
    ledger.record_round(round=1, **ROUND)
    save_ledger(ledger, path)
    where = repr(str(path))
    other = _refusal(lambda: _open(path, client_id="c1"))
    assert other.message == (
        f"privacy ledger {where} belongs to client 'c0', not 'c1'; using it would mix two "
        "clients' privacy spending"
    )
    assert other.fix == "give each client its own state dir or ledger file"
    prv = _refusal(lambda: _open(path, accountant="prv"))
    assert prv.message == (
        f"privacy ledger {where} was kept with the 'rdp' accountant, not 'prv'; privet does not "
        "switch accountants mid-way, because restarting the count under another accountant "
        "would forget the rounds already spent"
    )
    assert prv.fix == "set privacy.accountant = 'rdp'"
    delta = _refusal(lambda: _open(path, delta=1e-6))
    assert delta.message == (
        f"privacy ledger {where} was kept at delta=1e-05, not 1e-06; an epsilon only means "
        "something together with its delta, and a larger delta would quietly weaken the "
        "guarantee of the rounds already released"
    )
    assert delta.fix == "set privacy.delta = 1e-05"


def test_an_unreadable_ledger_is_refused_word_for_word(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text("[]")
    err = _refusal(lambda: _open(path))
    assert err.message.startswith(
        f"privacy ledger {str(path)!r} cannot be read (not a valid ledger"
    )
    assert err.message.endswith(
        "; privet will not treat it as empty, because that would forget the privacy this client "
        "has already spent"
    )
    assert err.fix == "restore the file from a backup, or, knowingly, start a new client state dir"


def test_a_budget_refusal_says_what_was_spent_and_how_to_go_on(tmp_path: Path) -> None:
    ledger = _open(tmp_path / "ledger.json", budget_epsilon=1.3)
    ledger.record_round(round=1, **ROUND)  # eps 1.21
    with pytest.raises(BudgetExhaustedError) as info:
        ledger.check_round(**ROUND)
    assert info.value.message == (
        f"client 'c0' has spent eps={ledger.epsilon():.4f} of its budget 1.3 (delta=1e-05, rdp "
        f"accountant); this round would bring it to "
        f"{ledger.projected_epsilon(**ROUND):.4f}"
    )
    assert info.value.fix == (
        "raise privacy.budget_epsilon (a deliberate decision to spend more privacy), or start a "
        "new client state dir knowingly (it forgets what this client already spent)"
    )


def test_a_bad_round_number_is_refused_word_for_word(tmp_path: Path) -> None:
    ledger = _open(tmp_path / "ledger.json")
    err = _refusal(lambda: ledger.record_round(round=-1, **ROUND))
    assert err.message == "round must be an integer >= 0, got -1"
    err = _refusal(lambda: ledger.record_round(round=True, **ROUND))
    assert err.message == "round must be an integer >= 0, got True"


def test_round_zero_is_a_round_and_attempts_count_per_run(tmp_path: Path) -> None:
    ledger = _open(tmp_path / "ledger.json", budget_epsilon=None)
    assert ledger.record_round(round=0, **ROUND).attempt == 1
    assert ledger.record_round(round=1, run="a", **ROUND).attempt == 1
    # The same round number in another run is that run's first attempt, not a redo.
    assert ledger.record_round(round=1, run="b", **ROUND).attempt == 1
    assert ledger.record_round(round=1, run="a", **ROUND).attempt == 2
    assert ledger.attempts("a") == {1: 2} and ledger.attempts("b") == {1: 1}
    assert ledger.attempts() == {0: 1}


def test_a_release_is_found_by_its_fingerprint(tmp_path: Path) -> None:
    ledger = _open(tmp_path / "ledger.json", budget_epsilon=None)
    first = ledger.record_round(round=1, release="f1", **ROUND)
    second = ledger.record_round(round=2, release="f2", **ROUND)
    assert ledger.released("f1") is first and ledger.released("f2") is second
    assert ledger.released("f3") is None


def test_a_round_without_a_finite_epsilon_is_never_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from privet.common.privacy import ledger as ledger_module

    ledger = _open(tmp_path / "ledger.json", budget_epsilon=None)
    monkeypatch.setattr(ledger_module, "epsilon_from_history", lambda *a, **k: float("inf"))
    err = _refusal(lambda: ledger.record_round(round=3, **ROUND))
    assert err.message == (
        "client 'c0': round 3 (noise_multiplier=1.0) gives no finite epsilon, so its update must "
        "not be released"
    )
    assert err.fix == "use a larger noise multiplier"
    assert ledger.entries == []


def test_the_budget_is_reached_not_passed(tmp_path: Path) -> None:
    import math

    from privet.common.privacy.ledger import _BUDGET_SLACK

    projected = _open(tmp_path / "probe.json", budget_epsilon=None).projected_epsilon(**ROUND)
    # A budget exactly equal to the projection admits the round ...
    assert (
        _open(tmp_path / "equal.json", budget_epsilon=projected).check_round(**ROUND) == projected
    )
    # ... and so does one whose slack brings it exactly to the projection (fp rounding aside).
    budget = projected - _BUDGET_SLACK
    while budget + _BUDGET_SLACK < projected:
        budget = math.nextafter(budget, math.inf)
    while budget + _BUDGET_SLACK > projected:
        budget = math.nextafter(budget, -math.inf)
    assert budget + _BUDGET_SLACK == projected
    assert _open(tmp_path / "slack.json", budget_epsilon=budget).check_round(**ROUND) == projected
    # One slack below that, the round is refused.
    lower = _open(tmp_path / "lower.json", budget_epsilon=projected - 3 * _BUDGET_SLACK)
    with pytest.raises(BudgetExhaustedError):
        lower.check_round(**ROUND)


def test_entries_are_stamped_in_utc(tmp_path: Path) -> None:
    from datetime import datetime, timedelta

    entry = _open(tmp_path / "ledger.json").record_round(round=1, **ROUND)
    assert datetime.fromisoformat(entry.recorded_at).utcoffset() == timedelta(0)


def test_only_a_redone_round_is_logged_as_charged_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = _open(tmp_path / "ledger.json", budget_epsilon=None)
    with caplog.at_level("WARNING", logger="privet"):
        ledger.record_round(round=1, run="r", **ROUND)
        assert caplog.messages == []
        ledger.record_round(round=1, run="r", **ROUND)
        ledger.record_round(round=1, run="r", **ROUND)
    eps = ledger.epsilon()
    assert caplog.messages[-1] == (
        "c0: round 1 released again (attempt 3, new inputs or no kept update): charged again, "
        f"cumulative eps={eps:.4f}"
    )
    assert caplog.messages[0].startswith("c0: round 1 released again (attempt 2,")


def test_a_ledger_is_saved_into_missing_folders_as_indented_json(tmp_path: Path) -> None:
    path = tmp_path / "state" / "clients" / "ledger.json"
    save_ledger(Ledger(client_id="c0", accountant="rdp", delta=DELTA, budget_epsilon=None), path)
    text = path.read_text(encoding="utf-8")
    assert text.startswith('{\n  "format_version": ') and text.endswith("}\n")


def test_the_temporary_file_is_written_beside_the_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # os.replace is atomic only within one file system: the temporary file must sit beside the
    # ledger, named after it.
    made: list[str] = []
    real = tempfile.mkstemp

    def spy(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, name = real(*args, **kwargs)
        made.append(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    path = tmp_path / "ledger.json"
    _open(path)
    assert len(made) == 1
    tmp = Path(made[0])
    assert tmp.parent == tmp_path
    assert tmp.name.startswith(".ledger.json.") and tmp.name.endswith(".tmp")


def test_a_failed_cleanup_does_not_hide_the_failed_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ledger.json"
    ledger = _open(path)

    def boom(*args: Any) -> None:
        raise OSError("disk full")

    def stuck(*args: Any) -> None:
        raise OSError("cannot unlink")

    monkeypatch.setattr(os, "replace", boom)
    monkeypatch.setattr(os, "unlink", stuck)
    with pytest.raises(OSError, match="disk full"):
        save_ledger(ledger, path)


def test_a_raised_budget_is_logged_and_a_bad_one_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ledger.json"
    ledger = _open(path)
    ledger.record_round(round=1, **ROUND)
    save_ledger(ledger, path)
    spent = ledger.epsilon()
    with caplog.at_level("WARNING", logger="privet"):
        _open(path, budget_epsilon=5.0)
    assert caplog.messages == [
        f"client c0: privacy budget raised from 2.0 to 5.0 (spent so far: eps={spent:.4f})"
    ]
    err = _refusal(lambda: _open(path, budget_epsilon=-1.0))
    assert err.message.startswith("invalid budget_epsilon -1.0: ")
    assert _open(path, budget_epsilon=5.0).budget_epsilon == 5.0  # the file was not touched


def test_a_lowered_budget_is_not_logged_as_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ledger.json"
    _open(path)
    with caplog.at_level("WARNING", logger="privet"):
        assert _open(path, budget_epsilon=0.5).budget_epsilon == 0.5
    assert caplog.messages == []


def test_a_ledger_that_cannot_be_created_or_read_is_refused_word_for_word(tmp_path: Path) -> None:
    err = _refusal(lambda: _open(tmp_path / "new.json", budget_epsilon=-1.0))
    assert err.message.startswith("cannot create a privacy ledger for client 'c0': ")
    folder = tmp_path / "a-folder.json"
    folder.mkdir()  # reading it fails with an OSError, not a validation error
    err = _refusal(lambda: _open(folder))
    assert err.message.startswith(f"privacy ledger {str(folder)!r} cannot be read ([Errno ")


# ---- the readout direction's release (adapter.readout_center) ----------------------------------


def test_a_readout_direction_is_one_gaussian_step_kept_once_and_not_a_round(tmp_path: Path) -> None:
    from datetime import datetime, timedelta

    path = tmp_path / "ledger.json"
    ledger = _open(path, budget_epsilon=8.0)
    ledger.record_round(round=1, run="r", **ROUND)
    entry = ledger.record_direction(
        key="m", direction=[0.6, 0.8], scale=4.0, noise_multiplier=3.0, round=1, run="r"
    )
    assert (entry.kind, entry.noise_multiplier, entry.sample_rate, entry.steps) == (
        "readout-direction",
        3.0,
        1.0,
        1,
    )
    assert (entry.round, entry.run, entry.attempt, entry.release) == (1, "r", 1, None)
    assert datetime.fromisoformat(entry.recorded_at).utcoffset() == timedelta(0)
    expected = epsilon_from_history(
        [(1.0, 0.01, 100), (3.0, 1.0, 1)], delta=DELTA, accountant="rdp"
    )
    assert ledger.epsilon() == pytest.approx(expected, rel=1e-12) and entry.epsilon_after == (
        pytest.approx(expected, rel=1e-12)
    )
    # The direction is no attempt of round 1: the rounds' DP-SGD releases count as before.
    assert ledger.attempts("r") == {1: 1}
    assert ledger.record_round(round=2, run="r", **ROUND).attempt == 1
    with pytest.raises(PrivacyError, match="already released a readout direction"):
        ledger.record_direction(
            key="m", direction=[1.0, 0.0], scale=1.0, noise_multiplier=3.0, round=2
        )
    # As a client records them: the direction first, then its first round's DP-SGD steps.
    first = _open(tmp_path / "other.json", budget_epsilon=8.0)
    first.record_direction(key="m", direction=[1.0], scale=1.0, noise_multiplier=3.0, round=1)
    assert first.record_round(round=1, **ROUND).attempt == 1
    save_ledger(ledger, path)
    back = _open(path, budget_epsilon=8.0)
    kept = back.readout_directions["m"]
    assert (kept.direction, kept.scale) == ([0.6, 0.8], 4.0)
    assert [e.kind for e in back.entries] == ["dp-sgd", "readout-direction", "dp-sgd"]


def test_a_readout_direction_past_the_budget_is_refused_and_nothing_is_kept(
    tmp_path: Path,
) -> None:
    ledger = _open(tmp_path / "ledger.json", budget_epsilon=0.5)
    with pytest.raises(BudgetExhaustedError):
        ledger.record_direction(key="m", direction=[1.0], scale=1.0, noise_multiplier=1.0, round=1)
    assert ledger.entries == [] and ledger.readout_directions == {}
