"""The client-server contract: every key a privet message carries, and the error codes of replies.

A privet round is a Flower ``Message`` whose ``RecordDict`` holds the weights (:data:`ARRAYS`), the
server's instructions (:data:`CONFIG`) and the client's measurements (:data:`METRICS`).  The keys
inside those records, the node- and run-config keys and the error codes a client replies with are
the protocol between ``privet.client`` and ``privet.server`` (and the simulations that stand in for
either): they are named here once, so that a key cannot be spelled two ways on the two sides, and
``tests/test_protocol.py`` refuses a key literal repeated outside this module.

The server recognises a refusal by its :class:`ErrorCode`, never by the wording of the reason.
"""

from __future__ import annotations

from enum import IntEnum, unique

__all__ = [
    "ACCURACY",
    "ARRAYS",
    "CLIPPING",
    "CLIPPING_CODES",
    "CONFIG",
    "CONFIG_KEY",
    "EPSILON",
    "EXAMPLES_SEEN",
    "FINGERPRINT",
    "LOSS",
    "MAX_WEIGHT",
    "METRICS",
    "NOISE_MULTIPLIER",
    "NUM_EXAMPLES",
    "NUM_PARTITIONS",
    "PARTITION_ID",
    "PRIVACY_ATTEMPT",
    "PROXIMAL_MU",
    "REPLAYED",
    "RESUME_KEY",
    "RUN_DIR_KEY",
    "SERVER_ROUND",
    "STARTUP_SECONDS",
    "TOTAL_ROUNDS",
    "TRAIN_LOSS",
    "TRAIN_SECONDS",
    "UNIFORM_WEIGHTS",
    "ErrorCode",
    "error_reason",
    "partition_of_reason",
]

# -- records of a message's RecordDict (Flower's strategies use the same names by default) --------

#: The ArrayRecord of weights, both ways.
ARRAYS = "arrays"
#: The ConfigRecord of the server's instructions for the round.
CONFIG = "config"
#: The MetricRecord of a client's reply.
METRICS = "metrics"

# -- keys of the server's ConfigRecord --------------------------------------------------------------

#: The round being trained or evaluated (Flower's strategies set it).
SERVER_ROUND = "server-round"
#: Rounds the federation plans (a client calibrates its noise over all of them).
TOTAL_ROUNDS = "total-rounds"
#: Fingerprint of the frozen base model: a client with different weights refuses the round.
FINGERPRINT = "fingerprint"
#: FedProx's proximal coefficient (Flower's FedProx sends it).
PROXIMAL_MU = "proximal-mu"
#: Secure aggregation: weight every update equally (client-level DP) rather than by examples.
UNIFORM_WEIGHTS = "uniform-weights"
#: Secure aggregation: the largest example count a client may weight its update by.
MAX_WEIGHT = "max-weight"

# -- node config, and both records: which partition (client) a node or a message plays -------------

#: The client a message or a node stands for (node config, server config and client metrics).
PARTITION_ID = "partition-id"
#: How many partitions a simulated federation has (node config).
NUM_PARTITIONS = "num-partitions"

# -- keys of a client's MetricRecord ------------------------------------------------------------------

#: Examples the client trained or evaluated on (FedAvg's weight; the client's sampling rate).
NUM_EXAMPLES = "num-examples"
#: Mean training loss of the round.
TRAIN_LOSS = "train-loss"
#: Examples the round's batches held in total.
EXAMPLES_SEEN = "examples-seen"
#: The client's cumulative sample-level epsilon after the round, from its ledger.
EPSILON = "epsilon"
#: How many times the client's ledger has charged this round (more than 1: redone after a resume).
PRIVACY_ATTEMPT = "privacy-attempt"
#: The noise multiplier the client trained with (0 without DP).
NOISE_MULTIPLIER = "noise-multiplier"
#: Seconds of training.
TRAIN_SECONDS = "train-seconds"
#: The per-example clipping that ran (``privacy.clipping = 'auto'`` resolved by the client), as
#: its code in :data:`CLIPPING_CODES` (a metric holds numbers only); 0 without DP. Every train
#: reply carries it: Flower aggregates only replies whose metric keys agree.
CLIPPING = "clipping"
#: Code of each clipping implementation in the :data:`CLIPPING` metric.
CLIPPING_CODES: dict[str, int] = {"flat": 1, "ghost": 2, "bookkeeping": 3}
#: Seconds of cold start (loading the model, tokenizing) before training.
STARTUP_SECONDS = "startup-seconds"
#: 1 when the reply resends an update kept from an earlier attempt (nothing was trained).
REPLAYED = "replayed"
#: Evaluation accuracy and loss on the client's test split.
ACCURACY = "accuracy"
LOSS = "loss"

# -- run config of a deployed federation --------------------------------------------------------------

#: The coordinator's run directory (names the run; the same after a resume).
RUN_DIR_KEY = "privet-run-dir"
#: The run's configuration, as TOML.
CONFIG_KEY = "privet-config"
#: Set when the coordinator resumes a run.
RESUME_KEY = "privet-resume"


@unique
class ErrorCode(IntEnum):
    """Codes of the error replies privet's clients (and its simulated faults) send.

    Flower reserves small numbers for its own errors; privet's start at 1001.
    """

    #: The client's privacy budget would be passed: it refused to train (nothing was spent).
    BUDGET = 1001
    #: Any other failure of the client (a bad input, a bug): the reason says which.
    CLIENT = 1002
    #: A simulated dropout (``[faults]``).
    DROPOUT = 1003
    #: A simulated straggler that answered too late (``[faults]``).
    LATE = 1004
    #: The server's secure-aggregation workflow failed for this client.
    SECAGG = 1005
    #: The client requires secure aggregation and the server did not use it.
    SECAGG_REQUIRED = 1006
    #: The site's policy refused what the coordinator asked.
    POLICY = 1007


def error_reason(partition: int, reason: str) -> str:
    """An error reply's reason: ``"[<partition-id>] <reason>"``, so the server can name the client."""
    return f"[{partition}] {reason}"


def partition_of_reason(reason: str) -> int | None:
    """The partition id an :func:`error_reason` names, or ``None`` when it names none."""
    if reason.startswith("[") and "]" in reason:
        head = reason[1 : reason.index("]")]
        if head.isdigit():
            return int(head)
    return None
