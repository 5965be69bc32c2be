"""Client-level DP of the federation (DP-FedAvg) on Flower's DP strategy wrappers, with accounting.

Flower supplies the mechanism: its four Message-API wrappers
(``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping``) clip each client's update (or
ask the client's ``fixedclipping_mod`` / ``adaptiveclipping_mod`` to) and add Gaussian noise to the
aggregate.  What they lack, and :class:`ClientLevelDP` adds around them:

* **Accounting and a budget that stops the run.**  Flower's own accountant needs an extra package,
  covers fixed clipping only and loses its state when the server restarts.  Here every round is
  written to a federation ledger on disk (the same file format as a client's) *before* the noised
  model leaves the server, epsilon is recomputed from it with Opacus, and a round that would pass
  ``privacy.client_level.budget_epsilon`` is refused before any client is asked
  (:class:`FederationBudgetExhausted`).
* **A fixed denominator, so a failing client does not cost the round.**  Flower's wrappers skip
  aggregation when any reply is an error.  The analysis does not need that: the released model is
  ``(sum of the clipped updates that arrived + N(0, (z C)^2)) / m`` with ``m`` the number of
  clients *asked* (fixed before anyone answers), and a client that failed, timed out or whose
  update was rejected simply contributes zero, which is inside the clipping ball.  Neighbouring
  federations (one client added or removed) still differ by at most ``C`` in the sum, so the round
  keeps its guarantee and the same epsilon.  Averaging by the number of replies instead would shrink
  the effective noise multiplier to ``z k / m``.  A round where *no* update arrived releases nothing
  (the global model stays) and is still charged, which is conservative.
* **Uniform weights.**  FedAvg weights clients by their number of examples; a client with many
  examples would then move the average by more than ``C / m`` and break the sensitivity bound, so
  the clipped updates are averaged with equal weights.
* **A server-side norm check for client-side clipping**: an update above the clip (a client
  without the mod) is dropped (it contributes zero); one a rounding error above it is projected
  back onto the ball, so the bound the accountant assumes holds exactly.

Only linear aggregation keeps the guarantee (noise is added *after* the wrapped strategy
aggregates; an adaptive server optimizer in between would see un-noised updates), so the wrapped
strategy must aggregate like FedAvg; anything else is refused.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from privet.common.config import ClientLevelConfig, PrivetConfig
from privet.common.errors import BudgetExhaustedError, ConfigError
from privet.common.privacy import Ledger, open_ledger, save_ledger
from privet.common.privacy.federation import FederationMechanism, plan_federation
from privet.server.flower_door import (
    AdaptiveClipHooks,
    ClientSideAdaptiveClipping,
    ServerSideAdaptiveClipping,
)
from privet.server.wrapping import WrappedStrategy

__all__ = [
    "ClientLevelDP",
    "FederationBudgetExhausted",
    "FederationRound",
    "client_level_of",
    "federation_ledger_path",
    "update_norm",
    "wrap_client_level_dp",
]

log = logging.getLogger("privet")

# A client-side clipped update may exceed the clip by float32 rounding (the mod adds the clipped
# delta back onto the weights); above this relative slack the client did not clip at all.
_CLIENT_CLIP_SLACK = 1e-3


class FederationBudgetExhausted(BudgetExhaustedError):  # noqa: N818 (the family's naming)
    """The next round would take the federation's client-level epsilon past its budget."""


@dataclass
class FederationRound:
    """What the client-level mechanism did in one round (one row of the privacy report)."""

    round: int
    clients_asked: int
    updates_aggregated: int
    updates_dropped: dict[str, str] = field(default_factory=dict)
    clipping_norm: float = 0.0
    noise_std: float = 0.0
    released: bool = False
    epsilon_after: float = 0.0
    #: 2, 3, ... when the round was redone after a crash and resume (each attempt is charged).
    attempt: int = 1

    def as_json(self) -> dict[str, Any]:
        """The round as a JSON-ready dictionary."""
        return asdict(self)


def federation_ledger_path(run_dir: Path) -> Path:
    """Where the server keeps the federation's client-level privacy ledger."""
    return Path(run_dir) / "privacy" / "federation-ledger.json"


def update_norm(new: ArrayRecord, old: ArrayRecord) -> float:
    """L2 norm of ``new - old`` over all arrays (float64, so the check itself adds no rounding)."""
    total = 0.0
    for key, arr in new.items():
        diff = arr.numpy().astype(np.float64) - old[key].numpy().astype(np.float64)
        total += float(np.sum(diff * diff))
    return math.sqrt(total)


def _scaled_update(new: ArrayRecord, old: ArrayRecord, factor: float) -> ArrayRecord:
    out = ArrayRecord()
    for key, arr in new.items():
        base = old[key].numpy()
        delta = (arr.numpy().astype(np.float64) - base.astype(np.float64)) * factor
        out[key] = Array(np.asarray(base + delta.astype(base.dtype)))
    return out


class _RoundClipNoise(AdaptiveClipHooks):
    """Two corrections to Flower 1.41's adaptive-clipping wrappers (both the Message-API and the legacy ones).

    * **Noise at the round's clip.**  Flower updates the clip *before* adding the noise, so the
      noise std is ``z * C_next / m`` while the updates were clipped to ``C_this``; whenever the
      clip shrinks the round gets less noise than its noise multiplier claims.  Here the noise
      uses the clip of the round (set by :class:`ClientLevelDP` before aggregation).
    * **The direction of the clip update.**  Flower's norm bit is 1 for a *clipped* update, but its
      geometric update ``C *= exp(-lr (bit_mean - target))`` is the rule of Andrew et al. (2021)
      for the fraction of *unclipped* updates; with the clipped fraction it runs the wrong way
      (all updates clipped -> the clip shrinks further) and collapses or explodes.  Here the rule
      gets the unclipped fraction, ``1 - clipped``, whose noise is the same.

    Both go through the hooks of ``server/flower_door.py`` (Flower's steps are private methods).
    """

    clip_norm_lr: float
    target_clipped_quantile: float
    round_clip: float | None = None

    def noise_clip(self) -> float:
        """The clip the round's updates were clipped to (not Flower's already updated one)."""
        return self.clipping_norm if self.round_clip is None else self.round_clip

    def update_clip(self, clipped_fraction: float) -> None:
        """Andrew et al.'s rule on the unclipped fraction."""
        unclipped = 1.0 - clipped_fraction
        self.clipping_norm *= math.exp(
            -self.clip_norm_lr * (unclipped - self.target_clipped_quantile)
        )


class _ServerSideAdaptive(_RoundClipNoise, ServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, noised with the round's own clip."""


class _ClientSideAdaptive(_RoundClipNoise, ClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping, noised with the round's own clip."""


class _FixedDenominatorMean(WrappedStrategy):
    """FedAvg's sampling and evaluation, but ``current + sum(updates) / m`` as the aggregate.

    ``m`` (``denominator``) is the number of clients asked this round; replies count with equal
    weights.  Flower's DP wrappers call this between their clipping and their noise.
    """

    def __init__(self, base: FedAvg) -> None:
        super().__init__(base)
        self.base = base
        self.current = ArrayRecord()
        self.denominator = 1

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling; remember the arrays the updates are measured against."""
        self.current = arrays
        return self.base.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sum the (already clipped) updates and divide by the fixed denominator."""
        total: dict[str, np.ndarray] = {
            k: np.zeros(a.numpy().shape, dtype=np.float64) for k, a in self.current.items()
        }
        for reply in replies:
            record = reply.content.array_records[self.base.arrayrecord_key]
            for k, a in record.items():
                total[k] += a.numpy().astype(np.float64) - self.current[k].numpy()
        out = ArrayRecord()
        for k, a in self.current.items():
            base = a.numpy()
            out[k] = Array(np.asarray(base + (total[k] / self.denominator).astype(base.dtype)))
        return out, None


class ClientLevelDP(WrappedStrategy):
    """DP-FedAvg around a FedAvg-like strategy: Flower's DP wrapper plus accounting and a budget.

    Parameters
    ----------
    inner
        The federation's strategy; must aggregate like Flower's ``FedAvg``.
    cl
        The ``privacy.client_level`` section.
    mechanism
        The planned mechanism (:func:`~privet.common.privacy.federation.plan_federation`).
    ledger_path
        The federation ledger file; reopened (not reset) when it exists.

    Raises
    ------
    ConfigError
        When ``inner`` does not aggregate like FedAvg.

    """

    def __init__(
        self,
        inner: Strategy,
        *,
        cl: ClientLevelConfig,
        mechanism: FederationMechanism,
        ledger_path: Path,
    ) -> None:
        if (
            not isinstance(inner, FedAvg)
            or type(inner).aggregate_train is not FedAvg.aggregate_train
        ):
            raise ConfigError(
                f"client-level DP needs a strategy that averages like FedAvg, got "
                f"{type(inner).__name__}: Flower's DP wrappers add the noise after the strategy "
                "aggregates, so a server optimizer in between would see un-noised updates",
                fix="set federation.strategy = 'fedavg' (or 'fedprox'), or "
                "privacy.client_level.enabled = false",
            )
        self.cl = cl
        self.mechanism = mechanism
        self.ledger_path = Path(ledger_path)
        self.ledger: Ledger = open_ledger(
            self.ledger_path,
            client_id="federation",
            accountant=mechanism.accountant,
            delta=mechanism.delta,
            budget_epsilon=mechanism.budget_epsilon,
        )
        self.rounds: list[FederationRound] = []
        self._mean = _FixedDenominatorMean(inner)
        m, z, c = mechanism.clients_per_round, mechanism.noise_multiplier, cl.clipping_norm
        self.dp: Strategy
        if cl.clipping == "fixed":
            fixed = (
                DifferentialPrivacyServerSideFixedClipping
                if cl.side == "server"
                else DifferentialPrivacyClientSideFixedClipping
            )
            self.dp = fixed(self._mean, z, c, m)
        else:
            # Flower's default count noise (m / 20) is below z / 2 for any useful z on a small
            # federation and Flower then refuses; z itself always satisfies z < 2 * stddev.
            stddev = cl.clipped_count_stddev or max(m / 20.0, z)
            if z >= 2 * stddev:
                raise ConfigError(
                    f"privacy.client_level.clipped_count_stddev = {stddev:g} must exceed half the "
                    f"noise multiplier ({z:.4g} / 2) for adaptive clipping",
                    fix=f"set privacy.client_level.clipped_count_stddev >= {z:.4g} (or unset it)",
                )
            adaptive = _ServerSideAdaptive if cl.side == "server" else _ClientSideAdaptive
            self.dp = adaptive(
                self._mean,
                z,
                m,
                initial_clipping_norm=c,
                target_clipped_quantile=cl.target_quantile,
                clip_norm_lr=cl.clip_learning_rate,
                clipped_count_stddev=stddev,
            )
        # Flower's DP wrapper is the strategy this one wraps: the steps not written below are its.
        super().__init__(self.dp)
        self._asked = 0

    # -- accounting -----------------------------------------------------------------------------

    def epsilon(self) -> float:
        """The federation's cumulative epsilon, recomputed from the ledger."""
        return self.ledger.epsilon()

    def _clip(self) -> float:
        return float(self.dp.clipping_norm)  # type: ignore[attr-defined]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Refuse the round if it would pass the budget; else sample clients through Flower's wrapper.

        Raises
        ------
        FederationBudgetExhausted
            Before any client is asked, when one more round would pass the federation budget.

        """
        mech = self.mechanism
        try:
            projected = self.ledger.check_round(
                noise_multiplier=mech.noise_multiplier, sample_rate=mech.sample_rate, steps=1
            )
        except BudgetExhaustedError:
            spent = self.ledger.epsilon()
            projected = self.ledger.projected_epsilon(
                noise_multiplier=mech.noise_multiplier, sample_rate=mech.sample_rate, steps=1
            )
            raise FederationBudgetExhausted(
                f"the federation has spent client-level eps={spent:.4f} of its budget "
                f"{mech.budget_epsilon:g} (delta={mech.delta:g}); round {server_round} would bring "
                f"it to {projected:.4f}, so training stops before it",
                fix="raise privacy.client_level.budget_epsilon (a deliberate decision to spend more "
                "privacy), or plan fewer rounds",
            ) from None
        log.debug("round %d: federation eps after it would be %.4f", server_round, projected)
        messages = list(self.dp.configure_train(server_round, arrays, config, grid))
        self._asked = len(messages)
        # The fixed denominator and Flower's noise scale follow the number of clients actually
        # asked (decided before anyone answers), so the noise std on the sum stays z * C.
        self._mean.denominator = max(1, self._asked)
        self.dp.num_sampled_clients = max(1, self._asked)  # type: ignore[attr-defined]
        return messages

    def _screen(self, replies: list[Message]) -> tuple[list[Message], dict[str, str]]:
        """Keep successful, in-bound replies; say why each other one contributes zero."""
        kept: list[Message] = []
        dropped: dict[str, str] = {}
        key = self._mean.base.arrayrecord_key
        current = self._mean.current
        clip = self._clip()
        for reply in replies:
            who = f"node-{reply.metadata.src_node_id}"
            if reply.has_error():
                dropped[who] = f"error reply ({reply.error.code})"
                continue
            record = reply.content.array_records.get(key)
            if record is None:
                dropped[who] = "no arrays in the reply"
                continue
            norm = update_norm(record, current)
            if norm == 0.0:
                # A zero update adds nothing to the sum (and Flower's clipping divides by it).
                dropped[who] = "zero update"
                continue
            if self.cl.side == "client":
                if norm > clip * (1 + _CLIENT_CLIP_SLACK):
                    dropped[who] = (
                        f"update norm {norm:.4g} above the clip {clip:.4g}: the client did not clip "
                        "(is it running privet with privacy.client_level.side = 'client'?)"
                    )
                    log.warning("client-level DP: dropped the update of %s: %s", who, dropped[who])
                    continue
                if norm > clip:
                    # float32 rounding of the client's own clipping: project back onto the ball.
                    reply.content.array_records[key] = _scaled_update(record, current, clip / norm)
            kept.append(reply)
        return kept, dropped

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate what arrived with a fixed denominator, noise it, and charge the ledger."""
        replies = list(replies)
        kept, dropped = self._screen(replies)
        missing = self._asked - len(replies)
        if missing > 0:
            dropped["(no reply)"] = f"{missing} client(s) did not answer or were rejected"
        clip = self._clip()
        stdv = float(self.dp.noise_multiplier) * clip / max(1, self._asked)  # type: ignore[attr-defined]
        arrays: ArrayRecord | None = None
        metrics: MetricRecord | None = None
        if isinstance(self.dp, _RoundClipNoise):
            self.dp.round_clip = clip
        if kept:
            arrays, metrics = self.dp.aggregate_train(server_round, kept)
        else:
            log.warning(
                "round %d: no client update arrived; the global model is unchanged (the round is "
                "still charged to the federation's budget)",
                server_round,
            )
        mech = self.mechanism
        # Charged before the noised model can leave the server (the next configure_train sends it).
        # A round redone after a resume is recorded as its next attempt and charged again.
        entry = self.ledger.record_round(
            round=server_round,
            noise_multiplier=mech.noise_multiplier,
            sample_rate=mech.sample_rate,
            steps=1,
        )
        save_ledger(self.ledger, self.ledger_path)
        self.rounds.append(
            FederationRound(
                round=server_round,
                clients_asked=self._asked,
                updates_aggregated=len(kept),
                updates_dropped=dropped,
                clipping_norm=clip,
                noise_std=stdv,
                released=arrays is not None,
                epsilon_after=self.ledger.epsilon(),
                attempt=entry.attempt,
            )
        )
        return arrays, metrics


def wrap_client_level_dp(
    strategy: Strategy, cfg: PrivetConfig, *, num_clients: int, run_dir: Path
) -> Strategy:
    """Wrap ``strategy`` in :class:`ClientLevelDP` when ``privacy.client_level.enabled``; else return it.

    Parameters
    ----------
    strategy
        The strategy ``build_strategy`` returned.
    cfg
        The run's configuration.
    num_clients
        The population size (the accountant's ``N``).
    run_dir
        The run directory; the federation ledger lives under it.

    Raises
    ------
    PrivacyError
        When the mechanism cannot be planned (delta too large, target unreachable).
    ConfigError
        When the strategy is not FedAvg-like.

    """
    cl = cfg.privacy.client_level
    if not cl.enabled:
        return strategy
    mechanism = plan_federation(cl, cfg.federation, num_clients=num_clients)
    if mechanism.clients_per_round < 2:
        log.warning(
            "client-level DP with one client per round: the noise must hide that client's whole "
            "update, so expect the model to learn little"
        )
    wrapped = ClientLevelDP(
        strategy, cl=cl, mechanism=mechanism, ledger_path=federation_ledger_path(run_dir)
    )
    log.info(
        "client-level DP: z=%.4g, clip=%g (%s, %s side), %d of %d clients per round, q=%g, "
        "delta=%g, budget eps=%s",
        mechanism.noise_multiplier,
        cl.clipping_norm,
        cl.clipping,
        cl.side,
        mechanism.clients_per_round,
        num_clients,
        mechanism.sample_rate,
        mechanism.delta,
        mechanism.budget_epsilon,
    )
    return wrapped


def client_level_of(strategy: Strategy) -> ClientLevelDP | None:
    """The :class:`ClientLevelDP` inside ``strategy`` (following ``.inner``), or ``None``."""
    seen = 0
    node: Any = strategy
    while node is not None and seen < 16:  # bounded: wrappers do not nest deeper than this
        if isinstance(node, ClientLevelDP):
            return node
        node = getattr(node, "inner", None)
        seen += 1
    return None
