"""Misbehaving federations on demand: dropouts, stragglers and Byzantine clients, from ``[faults]``.

A Flower mod around the ClientApp's train function plus a data hook for label flipping, both deterministic in ``faults.seed`` (who attacks, who is slow, who drops out in which
round). The honest client code is untouched; the server sees only what a real federation would send
it. Flower ships no fault injection for its simulation engine; hence our own.

How each fault reaches the server:

* dropout: the client does not train and replies with error ``ERROR_DROPOUT`` (in a real federation
  the server would wait until ``federation.round_timeout`` and then go on without it; the aggregate
  is the same, the simulation does not make the run wait).
* straggler: a delay is drawn per round; if it exceeds ``federation.round_timeout`` the reply is
  lost exactly like a dropout (error ``ERROR_LATE``), else the client really waits it when
  ``faults.sleep`` is on.
* Byzantine: the honest update is trained, then replaced (sign flip, scaling, noise, NaN, a wrong
  shape) before it leaves; label flipping trains honestly on flipped labels.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message

from privet.client.app import message_partition
from privet.client.flower_door import ClientAppCallable, Mod
from privet.common.config import FaultsConfig
from privet.common.data import ClientData, Examples, classification_examples
from privet.common.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    SERVER_ROUND,
    ErrorCode,
    error_reason,
)

__all__ = ["ERROR_DROPOUT", "ERROR_LATE", "AttackingApp", "FaultPlan"]

log = logging.getLogger("privet")

#: Error codes of simulated failures (privet's own client errors are 1001 and 1002).
ERROR_DROPOUT = int(ErrorCode.DROPOUT)
ERROR_LATE = int(ErrorCode.LATE)


def _rng(seed: int, *parts: int | str) -> np.random.Generator:
    # A stream per (seed, purpose, client, round): the same draw whatever order the clients run in.
    words = [seed] + [zlib.crc32(p.encode()) if isinstance(p, str) else p for p in parts]
    return np.random.default_rng(words)


@dataclass(frozen=True)
class FaultPlan:
    """Who misbehaves how, fixed by the seed for a federation of ``num_clients``.

    Parameters
    ----------
    faults
        The ``[faults]`` section.
    num_clients
        Clients in the federation (partition ids ``0..num_clients-1``).
    round_timeout
        The server's ``federation.round_timeout``: a straggler slower than this misses the round.
    num_labels
        Number of classes (label flipping maps ``y`` to ``num_labels - 1 - y``).

    """

    faults: FaultsConfig
    num_clients: int
    round_timeout: float
    num_labels: int = 2

    @property
    def byzantine(self) -> frozenset[int]:
        """Partition ids of the attackers: ``round(fraction * n)`` of them, drawn by the seed."""
        k = round(self.faults.byzantine_fraction * self.num_clients)
        order = _rng(self.faults.seed, "byzantine").permutation(self.num_clients)
        return frozenset(int(i) for i in order[:k])

    @property
    def stragglers(self) -> frozenset[int]:
        """Partition ids of the slow clients."""
        k = round(self.faults.straggler_fraction * self.num_clients)
        order = _rng(self.faults.seed, "stragglers").permutation(self.num_clients)
        return frozenset(int(i) for i in order[:k])

    def drops_out(self, partition: int, server_round: int) -> bool:
        """Whether ``partition`` fails to reply in ``server_round``."""
        if not self.faults.dropout:
            return False
        draw = _rng(self.faults.seed, "dropout", partition, server_round).random()
        return bool(draw < self.faults.dropout)

    def delay(self, partition: int, server_round: int) -> float:
        """Extra seconds ``partition`` takes in ``server_round`` (0 for a punctual client)."""
        mean = self.faults.straggler_delay_mean
        if partition not in self.stragglers or mean <= 0:
            return 0.0
        rng = _rng(self.faults.seed, "delay", partition, server_round)
        kind = self.faults.straggler_delay
        if kind == "fixed":
            return mean
        if kind == "uniform":
            return float(rng.uniform(0.0, 2.0 * mean))
        return float(rng.exponential(mean))

    def flip_labels(self, partition: int, data: ClientData) -> ClientData:
        """The data hook: an attacker running 'label_flip' trains on ``num_labels - 1 - y``."""
        if self.faults.attack != "label_flip" or partition not in self.byzantine:
            return data
        train = classification_examples(data.train)
        flipped = Examples(
            texts=train.texts, labels=(self.num_labels - 1) - train.labels, keys=train.keys
        )
        return ClientData(name=data.name, train=flipped, test=data.test)

    def corrupt(
        self, sent: ArrayRecord, honest: ArrayRecord, *, partition: int, server_round: int
    ) -> ArrayRecord:
        """The update an attacker sends instead of ``honest`` (``sent`` is the global model)."""
        f = self.faults
        out = ArrayRecord()
        rng = _rng(f.seed, "noise", partition, server_round)
        for i, (key, array) in enumerate(honest.items()):
            local = array.numpy()
            glob = sent[key].numpy() if key in sent else np.zeros_like(local)
            if f.attack == "sign_flip":
                new = glob - f.attack_scale * (local - glob)
            elif f.attack == "scale":
                new = glob + f.attack_scale * (local - glob)
            elif f.attack == "gaussian":
                new = glob + rng.normal(0.0, f.noise_std, size=local.shape)
            elif f.attack == "nan":
                new = np.full_like(local, np.nan)
            elif f.attack == "wrong_shape":
                # the first array loses its last row (or element)
                new = local[:-1] if i == 0 and local.shape and local.shape[0] > 1 else local
            else:  # label_flip: the honest update of poisoned data
                new = local
            out[key] = Array(np.ascontiguousarray(np.asarray(new, dtype=local.dtype)))
        return out

    def mod(self) -> Mod:
        """A Flower mod for the ClientApp's train function that applies this plan."""
        sleep = self.faults.sleep

        def _faults(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
            partition = message_partition(msg, context)
            conf = msg.content.config_records.get(CONFIG)
            server_round = int(str(conf.get(SERVER_ROUND, 0))) if conf is not None else 0
            if self.drops_out(partition, server_round):
                return Message(
                    Error(code=ERROR_DROPOUT, reason=error_reason(partition, "simulated dropout")),
                    reply_to=msg,
                )
            delay = self.delay(partition, server_round)
            if delay > self.round_timeout:
                return Message(
                    Error(
                        code=ERROR_LATE,
                        reason=error_reason(
                            partition,
                            f"simulated straggler: {delay:.1f} s exceeds the "
                            f"round timeout of {self.round_timeout:g} s",
                        ),
                    ),
                    reply_to=msg,
                )
            sent = msg.content.array_records.get(ARRAYS)
            reply = call_next(msg, context)
            if delay and sleep:
                time.sleep(delay)
            if (
                partition in self.byzantine
                and self.faults.attack != "label_flip"
                and not reply.has_error()
                and sent is not None
                and ARRAYS in reply.content.array_records
            ):
                reply.content[ARRAYS] = self.corrupt(
                    sent,
                    reply.content.array_records[ARRAYS],
                    partition=partition,
                    server_round=server_round,
                )
            return reply

        return _faults


class AttackingApp:
    """A deployed site's ClientApp that attacks every round: for tests only.

    ``privet client --test-attack ...`` (hidden options) wraps the site's real app in it, so a
    test can play a malicious site against a real coordinator: the honest update is trained (and
    charged to the ledger), then replaced as ``[faults] attack`` says, and ``num-examples`` can be
    inflated (``claim_examples``) to outvote the other sites.
    """

    def __init__(
        self,
        app: ClientAppCallable,
        *,
        attack: str,
        scale: float = 1000.0,
        claim_examples: int | None = None,
    ) -> None:
        self.app = app
        faults = FaultsConfig.model_validate(
            {"byzantine_fraction": 0.5, "attack": attack, "attack_scale": scale}
        )
        self.plan = FaultPlan(faults, num_clients=1, round_timeout=float("inf"))
        self.claim_examples = claim_examples

    def __call__(self, message: Message, context: Context) -> Message:
        """Run the real app; corrupt a successful train reply before it leaves."""
        sent = message.content.array_records.get(ARRAYS)
        reply = self.app(message=message, context=context)  # type: ignore[call-arg]
        if message.metadata.message_type != "train" or reply.has_error() or sent is None:
            return reply
        if ARRAYS in reply.content.array_records and self.plan.faults.attack != "label_flip":
            conf = message.content.config_records.get(CONFIG)
            server_round = int(str(conf.get(SERVER_ROUND, 0))) if conf is not None else 0
            reply.content[ARRAYS] = self.plan.corrupt(
                sent, reply.content.array_records[ARRAYS], partition=0, server_round=server_round
            )
        metrics = reply.content.metric_records.get(METRICS)
        if self.claim_examples is not None and metrics is not None:
            metrics[NUM_EXAMPLES] = self.claim_examples
        log.warning("test attack: sent a %s update", self.plan.faults.attack)
        return reply
