"""Differential-privacy accounting and the per-client privacy ledger."""

from privet.common.privacy.accounting import (
    MAX_NOISE_MULTIPLIER,
    MIN_NOISE_MULTIPLIER,
    AccountantName,
    HistoryEntry,
    accountant_steps,
    calibrate_noise,
    epsilon_from_history,
)
from privet.common.privacy.ledger import (
    LEDGER_FORMAT_VERSION,
    Ledger,
    LedgerEntry,
    open_ledger,
    save_ledger,
)

__all__ = [
    "LEDGER_FORMAT_VERSION",
    "MAX_NOISE_MULTIPLIER",
    "MIN_NOISE_MULTIPLIER",
    "AccountantName",
    "HistoryEntry",
    "Ledger",
    "LedgerEntry",
    "accountant_steps",
    "calibrate_noise",
    "epsilon_from_history",
    "open_ledger",
    "save_ledger",
]
