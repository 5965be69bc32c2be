"""privet's client: local DP training as plain functions, and the thin Flower ClientApp around them.

``train``, ``evaluate`` and the privacy engine import no ``flwr``: a partner can embed them without
Flower. ``make_client_app`` (the only Flower-facing name) is imported lazily, on first use.
"""

from typing import TYPE_CHECKING, Any

from privet.client.participant import DataSource, Participant, ParticipantStatus, to_examples
from privet.client.policy import SitePolicy
from privet.client.privacy import RoundPrivacy, ledger_path, plan_round, record_round
from privet.client.training import DPSettings, EvalResult, TrainResult, evaluate, plan_steps, train

if TYPE_CHECKING:
    from privet.client.app import make_client_app

__all__ = [
    "DPSettings",
    "DataSource",
    "EvalResult",
    "Participant",
    "ParticipantStatus",
    "RoundPrivacy",
    "SitePolicy",
    "TrainResult",
    "evaluate",
    "ledger_path",
    "make_client_app",
    "plan_round",
    "plan_steps",
    "record_round",
    "to_examples",
    "train",
]


def __getattr__(name: str) -> Any:
    if name == "make_client_app":
        from privet.client.app import make_client_app

        return make_client_app
    raise AttributeError(f"module 'privet.client' has no attribute {name!r}")
