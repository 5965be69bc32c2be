"""The per-client privacy ledger: the source of truth for a client's cumulative epsilon.

The ledger is a small JSON file holding every round the client has released an update for, as
Opacus accountant history entries.  It is written atomically and read back fail-closed: a ledger
that cannot be parsed, or that was kept under different accounting settings, stops the client
instead of being silently reset, because a reset would forget privacy that was already spent.

Use it in this order in each round::

    ledger = open_ledger(path, client_id=..., accountant=..., delta=..., budget_epsilon=...)
    ledger.check_round(noise_multiplier=s, sample_rate=q, steps=n)   # before training
    ...train...
    ledger.record_round(round=r, noise_multiplier=s, sample_rate=q, steps=n_taken)
    save_ledger(ledger, path)                                        # before the update leaves

A round can be *redone*: a coordinator that dies after a round was charged but before its
checkpoint asks for that round again after a resume.  A site that kept the update it released
sends the same update again (the same output released twice costs nothing more; the entry's
``release`` names it).  A redo whose update was not kept, or whose inputs differ, releases a new,
independently noised update: a new release, charged again (composition), as the next ``attempt``
of that round.  Nothing is skipped or overwritten, and a release that would pass the budget is
refused like any other round.

Round numbers are the coordinator's *labels*, not the ledger's order: the ledger's own order is
the order of its entries, and a round number far ahead or going back (another run in the same
state folder, or a coordinator that wants to lock the site out) is charged like any other release
and never blocks the rounds after it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from privet.common.errors import BudgetExhaustedError, PrivacyError
from privet.common.privacy.accounting import AccountantName, HistoryEntry, epsilon_from_history

__all__ = [
    "LEDGER_FORMAT_VERSION",
    "Ledger",
    "LedgerEntry",
    "ReadoutDirection",
    "open_ledger",
    "save_ledger",
]

log = logging.getLogger(__name__)

LEDGER_FORMAT_VERSION = 1
"""The ledger file format this code writes and reads."""

# Floating-point slack when comparing a projected epsilon with the budget: the calibrated noise is
# meant to land *on* the budget at the last round, and must not be refused for a rounding error.
_BUDGET_SLACK = 1e-9


class LedgerEntry(BaseModel):
    """One round whose update the client released, as an accountant history entry.

    Parameters
    ----------
    round
        The federated round number.
    noise_multiplier
        The DP-SGD noise multiplier used.
    sample_rate
        The Poisson sampling rate used.
    steps
        The DP-SGD steps actually taken.
    epsilon_after
        Cumulative epsilon after this round, for people reading the file; the code recomputes it.
    recorded_at
        When the round was recorded (ISO 8601, UTC).
    attempt
        1 for the first release of this round number (in this run), 2, 3, ... for each redo of it
        (after a crash and resume); every attempt is charged.
    run
        The coordinator's run this round belonged to (a label; ``None``: not known).
    release
        The fingerprint of the inputs the released update was trained on (``None``: not kept); a
        kept update with this fingerprint may be sent again at no further cost.
    kind
        ``dp-sgd``: a round's DP-SGD steps. ``readout-direction``: the one Gaussian release of the
        sum of the examples' unit final states (``adapter.readout_center``), one step at rate 1;
        it composes with the rounds like any entry and does not count as a round's attempt.

    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    round: int = Field(ge=0)
    noise_multiplier: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=1)
    epsilon_after: float = Field(ge=0)
    recorded_at: str
    attempt: int = Field(default=1, ge=1)
    run: str | None = None
    release: str | None = None
    kind: Literal["dp-sgd", "readout-direction"] = "dp-sgd"

    @field_validator("recorded_at")
    @classmethod
    def _iso_time(cls, value: str) -> str:
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"recorded_at must be an ISO 8601 time, got {value!r}") from None
        return value


class ReadoutDirection(BaseModel):
    """A readout direction a client released (``adapter.readout_center``) and the basis's scale.

    Parameters
    ----------
    direction
        The unit vector: the noisy sum of the examples' unit final states, normalized.
    scale
        The basis's ``s``, computed from the same release and the example count.

    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    direction: list[float] = Field(min_length=1)
    scale: float = Field(ge=1.0)


class Ledger(BaseModel):
    """A client's privacy ledger: its accounting settings and every round it has released.

    Use :func:`open_ledger` to get one and :func:`save_ledger` to persist it.

    Parameters
    ----------
    format_version
        The file format (:data:`LEDGER_FORMAT_VERSION`).
    client_id
        The client the ledger belongs to.
    accountant
        The Opacus accountant epsilon is computed with.
    delta
        The delta epsilon is computed at.
    budget_epsilon
        The cumulative epsilon the client will not pass (``None``: unbounded).
    planned_noise_multiplier
        The noise multiplier calibrated at the client's first round, reused after restarts.
    entries
        The releases in the order they were made; a redone round repeats its round number (and
        run) with the next ``attempt``.
    readout_directions
        The readout directions this client released (``adapter.readout_center``), unit vectors
        and their bases' scales, keyed by the frozen model they were measured on; reused, never
        released again.

    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    format_version: int = LEDGER_FORMAT_VERSION
    client_id: str = Field(min_length=1)
    accountant: Literal["rdp", "prv"]
    delta: float = Field(gt=0, lt=1)
    budget_epsilon: float | None = Field(default=None, gt=0)
    planned_noise_multiplier: float | None = Field(default=None, gt=0)
    entries: list[LedgerEntry] = Field(default_factory=list)
    readout_directions: dict[str, ReadoutDirection] = Field(default_factory=dict)

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != LEDGER_FORMAT_VERSION:
            raise ValueError(
                f"ledger format_version {value} is not the version {LEDGER_FORMAT_VERSION} this "
                "privet reads (written by a different privet version?)"
            )
        return value

    @model_validator(mode="after")
    def _attempts_count(self) -> Ledger:
        seen: dict[tuple[str | None, int], int] = {}
        for e in self.entries:
            if e.kind != "dp-sgd":
                continue
            expected = seen.get((e.run, e.round), 0) + 1
            if e.attempt != expected:
                rounds = [(e.round, e.attempt) for e in self.entries]
                raise ValueError(
                    "ledger attempts must count the releases of each (run, round): 1, 2, ...; "
                    f"got (round, attempt) = {rounds}"
                )
            seen[(e.run, e.round)] = expected
        return self

    def attempts(self, run: str | None = None) -> dict[int, int]:
        """How many times each round of ``run`` was charged (more than 1: it was redone)."""
        out: dict[int, int] = {}
        for e in self.entries:
            if e.run == run and e.kind == "dp-sgd":
                out[e.round] = e.attempt
        return out

    def released(self, release: str) -> LedgerEntry | None:
        """The entry that charged the release with this fingerprint (``None``: never charged)."""
        return next((e for e in self.entries if e.release == release), None)

    def history(self) -> list[HistoryEntry]:
        """The recorded rounds as Opacus accountant history entries."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    def epsilon(self) -> float:
        """Cumulative epsilon spent, recomputed from the history (never read from the file)."""
        return epsilon_from_history(self.history(), delta=self.delta, accountant=self.accountant)

    def projected_epsilon(
        self, *, noise_multiplier: float, sample_rate: float, steps: int
    ) -> float:
        """Cumulative epsilon after one more round with these settings.

        Parameters
        ----------
        noise_multiplier, sample_rate, steps
            The settings of the round.

        Returns
        -------
        float
            The epsilon the history would have with the round appended.

        """
        return epsilon_from_history(
            [*self.history(), (noise_multiplier, sample_rate, steps)],
            delta=self.delta,
            accountant=self.accountant,
        )

    def check_round(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Refuse a round that would take the cumulative epsilon past the budget.

        Parameters
        ----------
        noise_multiplier, sample_rate, steps
            The settings of the round.

        Returns
        -------
        float
            The projected cumulative epsilon after the round.

        Raises
        ------
        BudgetExhaustedError
            When the projected epsilon is above ``budget_epsilon``.
        PrivacyError
            When the settings are out of range.

        """
        projected = self.projected_epsilon(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
        )
        budget = self.budget_epsilon
        if budget is not None and projected > budget + _BUDGET_SLACK:
            raise BudgetExhaustedError(
                f"client {self.client_id!r} has spent eps={self.epsilon():.4f} of its budget "
                f"{budget:g} (delta={self.delta:g}, {self.accountant} accountant); this round "
                f"would bring it to {projected:.4f}",
                fix="raise privacy.budget_epsilon (a deliberate decision to spend more privacy), "
                "or start a new client state dir knowingly (it forgets what this client already "
                "spent)",
            )
        return projected

    def record_round(
        self,
        *,
        round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        run: str | None = None,
        release: str | None = None,
    ) -> LedgerEntry:
        """Append a release, after checking it against the budget.

        Call it after training and *before* the update leaves the client, then :func:`save_ledger`;
        if it raises, the update must be discarded (an update that is never released spends no
        privacy, so refusing here keeps the budget).  Nothing is appended when it raises.

        ``round`` is the coordinator's label: any round number is charged in the order it comes,
        one already recorded for ``run`` (a redo after a crash and resume) as its next attempt.
        No round number makes the ledger refuse later ones; only the budget does.

        Parameters
        ----------
        round
            The coordinator's round number.
        noise_multiplier, sample_rate, steps
            The settings the round actually ran with.
        run
            The coordinator's run (a label).
        release
            The fingerprint of the inputs of the released update, when the site keeps it.

        Returns
        -------
        LedgerEntry
            The new entry.

        Raises
        ------
        BudgetExhaustedError
            When the round would pass the budget.
        PrivacyError
            When the settings are out of range, or the round gives no finite guarantee.

        """
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise PrivacyError(f"round must be an integer >= 0, got {round!r}")
        attempt = self.attempts(run).get(round, 0) + 1
        projected = self.check_round(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
        )
        if projected == float("inf"):
            raise PrivacyError(
                f"client {self.client_id!r}: round {round} (noise_multiplier={noise_multiplier}) "
                "gives no finite epsilon, so its update must not be released",
                fix="use a larger noise multiplier",
            )
        entry = LedgerEntry(
            round=round,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            epsilon_after=projected,
            recorded_at=datetime.now(UTC).isoformat(),
            attempt=attempt,
            run=run,
            release=release,
        )
        self.entries.append(entry)
        if attempt > 1:
            log.warning(
                "%s: round %d released again (attempt %d, new inputs or no kept update): charged "
                "again, cumulative eps=%.4f",
                self.client_id,
                round,
                attempt,
                projected,
            )
        return entry

    def record_direction(
        self,
        *,
        key: str,
        direction: list[float],
        scale: float,
        noise_multiplier: float,
        round: int,
        run: str | None = None,
    ) -> LedgerEntry:
        """Charge the readout direction's release and keep the direction (one Gaussian step).

        The release is the sum of the client's unit final states (sensitivity 1) plus Gaussian
        noise of std ``noise_multiplier``: the accountant's entry ``(noise_multiplier, 1, 1)``.
        Call it before the direction is used, then :func:`save_ledger`; nothing is appended when
        it raises.

        Raises
        ------
        BudgetExhaustedError
            When the release would pass the budget.
        PrivacyError
            When a direction is already kept under ``key`` (it is reused, never released again).

        """
        if key in self.readout_directions:
            raise PrivacyError(
                f"client {self.client_id!r} already released a readout direction for this model"
            )
        projected = self.check_round(noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1)
        kept = ReadoutDirection(direction=list(direction), scale=scale)
        entry = LedgerEntry(
            round=round,
            noise_multiplier=noise_multiplier,
            sample_rate=1.0,
            steps=1,
            epsilon_after=projected,
            recorded_at=datetime.now(UTC).isoformat(),
            run=run,
            kind="readout-direction",
        )
        self.entries.append(entry)
        self.readout_directions = {**self.readout_directions, key: kept}
        return entry


def _unreadable(path: Path, why: str) -> PrivacyError:
    return PrivacyError(
        f"privacy ledger {str(path)!r} cannot be read ({why}); privet will not treat it as empty, "
        "because that would forget the privacy this client has already spent",
        fix="restore the file from a backup, or, knowingly, start a new client state dir",
    )


def open_ledger(
    path: Path,
    *,
    client_id: str,
    accountant: AccountantName,
    delta: float,
    budget_epsilon: float | None,
) -> Ledger:
    """Load a client's ledger, or create (and save) a new one when ``path`` does not exist.

    Parameters
    ----------
    path
        The ledger file.
    client_id
        The client; must match the ledger's.
    accountant
        The accountant; must match the ledger's (epsilons of different accountants don't add up).
    delta
        The delta; must match the ledger's (an epsilon is only meaningful with its delta).
    budget_epsilon
        The budget now in force.  It replaces the stored one (and the file is saved): a lower
        budget is stricter, a higher one is the operator's explicit decision and is logged.

    Returns
    -------
    Ledger
        The ledger.

    Raises
    ------
    PrivacyError
        When the file is corrupt or was kept for another client or other accounting settings.

    """
    path = Path(path)
    if not path.exists():
        try:
            ledger = Ledger(
                client_id=client_id,
                accountant=accountant,
                delta=delta,
                budget_epsilon=budget_epsilon,
            )
        except ValidationError as exc:
            raise PrivacyError(
                f"cannot create a privacy ledger for client {client_id!r}: {exc}"
            ) from None
        save_ledger(ledger, path)
        return ledger

    try:
        ledger = Ledger.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise _unreadable(
            path,
            f"not a valid ledger: {exc.error_count()} problem(s), first: {exc.errors()[0]['msg']}",
        ) from None
    except OSError as exc:
        raise _unreadable(path, str(exc)) from None

    if ledger.client_id != client_id:
        raise PrivacyError(
            f"privacy ledger {str(path)!r} belongs to client {ledger.client_id!r}, not "
            f"{client_id!r}; using it would mix two clients' privacy spending",
            fix="give each client its own state dir or ledger file",
        )
    if ledger.accountant != accountant:
        raise PrivacyError(
            f"privacy ledger {str(path)!r} was kept with the {ledger.accountant!r} accountant, not "
            f"{accountant!r}; privet does not switch accountants mid-way, because restarting the "
            "count under another accountant would forget the rounds already spent",
            fix=f"set privacy.accountant = {ledger.accountant!r}",
        )
    if ledger.delta != delta:
        raise PrivacyError(
            f"privacy ledger {str(path)!r} was kept at delta={ledger.delta!r}, not {delta!r}; an "
            "epsilon only means something together with its delta, and a larger delta would "
            "quietly weaken the guarantee of the rounds already released",
            fix=f"set privacy.delta = {ledger.delta!r}",
        )
    if ledger.budget_epsilon != budget_epsilon:
        old = ledger.budget_epsilon
        raised = budget_epsilon is None or (old is not None and budget_epsilon > old)
        if raised:
            log.warning(
                "client %s: privacy budget raised from %s to %s (spent so far: eps=%.4f)",
                client_id,
                old,
                budget_epsilon,
                ledger.epsilon(),
            )
        try:
            ledger.budget_epsilon = budget_epsilon
        except ValidationError as exc:
            raise PrivacyError(f"invalid budget_epsilon {budget_epsilon!r}: {exc}") from None
        save_ledger(ledger, path)
    return ledger


def save_ledger(ledger: Ledger, path: Path) -> None:
    """Write a ledger atomically: a crash leaves either the old file or the new one, never half.

    The JSON goes to a temporary file in the same folder (so the rename cannot cross file
    systems), is flushed and fsynced, then renamed over ``path``; the folder is fsynced too where
    the platform allows, so the rename itself survives a power loss.

    Parameters
    ----------
    ledger
        The ledger.
    path
        The ledger file (its folder is created when missing).

    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = ledger.model_dump_json(indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # Best effort: directories cannot be opened for fsync on every platform (e.g. Windows).
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
