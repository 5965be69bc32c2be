"""Differential-privacy accounting and the per-client privacy ledger."""

from privet.common.privacy.accounting import (
    MAX_NOISE_MULTIPLIER,
    MIN_NOISE_MULTIPLIER,
    AccountantName,
    HistoryEntry,
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
from privet.common.privacy.mechanism import (
    Mechanism,
    Sampling,
    accountant_steps,
    client_sampling,
    example_sampling,
    flower_sample_size,
    readout_center_minimum,
    round_mechanism,
)

__all__ = [
    "LEDGER_FORMAT_VERSION",
    "MAX_NOISE_MULTIPLIER",
    "MIN_NOISE_MULTIPLIER",
    "AccountantName",
    "HistoryEntry",
    "Ledger",
    "LedgerEntry",
    "Mechanism",
    "Sampling",
    "accountant_steps",
    "calibrate_noise",
    "client_sampling",
    "epsilon_from_history",
    "example_sampling",
    "flower_sample_size",
    "open_ledger",
    "readout_center_minimum",
    "round_mechanism",
    "save_ledger",
]
