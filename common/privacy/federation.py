"""Client-level (federation) DP: the mechanism's parameters, decided once from the configuration.

DP-FedAvg releases, each round, ``(sum of clipped client updates + N(0, (z C)^2)) / m``, where ``C``
is the clipping norm, ``z`` the noise multiplier and ``m`` the number of clients asked that round (a
fixed denominator, public before any client answers).  Adding or removing one client changes the
sum by at most ``C``, so every round is a Gaussian mechanism with noise multiplier ``z`` on the sum;
rounds compose.  With ``sampling_amplification`` each round is accounted as Poisson-subsampled at
``q = m / population`` (the DP-FedAvg paper's analysis); otherwise at ``q = 1``, which holds for any
way of picking clients.  The epsilon is computed by the same Opacus accountants as the clients'
(:func:`epsilon_from_history` with one step per round).

The server (``privet.server.privacy``) and the preflight (``privet plan``) both call
:func:`plan_federation`, so the noise the plan prints is the noise the run uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from privet.common.config import ClientLevelConfig, FederationConfig
from privet.common.errors import PrivacyError
from privet.common.privacy.accounting import AccountantName, epsilon_from_history
from privet.common.privacy.mechanism import client_sampling, flower_sample_size, round_mechanism

__all__ = [
    "FederationMechanism",
    "clients_per_round",
    "federation_delta",
    "plan_federation",
]


@dataclass(frozen=True)
class FederationMechanism:
    """The client-level DP mechanism of a federation.

    Parameters
    ----------
    noise_multiplier
        ``z``: noise std on the sum of clipped updates over the clipping norm (for adaptive
        clipping, the effective multiplier of update and quantile noise together).
    sample_rate
        ``q`` the accountant uses per round (1 without sampling amplification).
    delta
        The client-level delta.
    clients_per_round
        ``m``, the fixed denominator of the average.
    population
        The number of clients in the federation.
    rounds
        The planned rounds.
    accountant
        The Opacus accountant.
    budget_epsilon
        The federation budget (``None``: unbounded).

    """

    noise_multiplier: float
    sample_rate: float
    delta: float
    clients_per_round: int
    population: int
    rounds: int
    accountant: AccountantName
    budget_epsilon: float | None

    def epsilon_after(self, rounds: int) -> float:
        """The federation epsilon after ``rounds`` released rounds of this mechanism."""
        if rounds <= 0:
            return 0.0
        return epsilon_from_history(
            [(self.noise_multiplier, self.sample_rate, rounds)],
            delta=self.delta,
            accountant=self.accountant,
        )

    def as_json(self) -> dict[str, Any]:
        """The mechanism as a JSON-ready dictionary."""
        return asdict(self)


def clients_per_round(fed: FederationConfig, *, num_clients: int) -> int:
    """How many clients Flower's FedAvg asks per round when ``num_clients`` are connected.

    :func:`~privet.common.privacy.mechanism.flower_sample_size` with the federation's settings.
    """
    return flower_sample_size(
        num_clients, fraction=fed.fraction_train, minimum=fed.min_train_clients
    )


def federation_delta(cl: ClientLevelConfig, *, num_clients: int) -> float:
    """The client-level delta: the configured one, else ``1 / (10 N)``; refused unless below ``1 / N``.

    A delta of ``1 / N`` or more is met by a mechanism that publishes one random client's update
    in the clear, so it certifies nothing.
    """
    delta = cl.delta if cl.delta is not None else 1.0 / (10.0 * num_clients)
    if delta >= 1.0 / num_clients:
        raise PrivacyError(
            f"privacy.client_level.delta = {delta:g} is not below 1 / number of clients = "
            f"{1.0 / num_clients:.3g}: a mechanism that publishes one client's update in the clear "
            "would satisfy it",
            fix=f"set privacy.client_level.delta below {1.0 / num_clients:.3g} (or leave it unset)",
        )
    return delta


def plan_federation(
    cl: ClientLevelConfig, fed: FederationConfig, *, num_clients: int
) -> FederationMechanism:
    """Decide the client-level mechanism: noise multiplier, sampling rate, delta.

    With ``target_epsilon`` the noise multiplier is calibrated (never overshooting) so that all
    ``fed.rounds`` rounds spend at most the target.

    Parameters
    ----------
    cl
        The ``privacy.client_level`` section (must be enabled).
    fed
        The federation section (rounds and client sampling).
    num_clients
        The population size.

    Raises
    ------
    PrivacyError
        When the delta is too large or no noise level reaches the target.

    """
    if not cl.enabled:
        raise PrivacyError("privacy.client_level is not enabled")
    sampling = client_sampling(
        num_clients,
        fraction=fed.fraction_train,
        minimum=fed.min_train_clients,
        amplification=cl.sampling_amplification,
    )
    delta = federation_delta(cl, num_clients=num_clients)
    try:
        mechanism = round_mechanism(
            sampling,
            rounds=fed.rounds,
            delta=delta,
            accountant=cl.accountant,
            noise_multiplier=cl.noise_multiplier,
            target_epsilon=cl.target_epsilon,
        )
    except PrivacyError as exc:
        raise PrivacyError(
            f"client-level DP: {exc.message}",
            fix="raise privacy.client_level.target_epsilon or lower federation.rounds",
        ) from None
    sigma, q, m = mechanism.noise_multiplier, mechanism.sample_rate, sampling.per_round
    return FederationMechanism(
        noise_multiplier=sigma,
        sample_rate=q,
        delta=delta,
        clients_per_round=m,
        population=num_clients,
        rounds=fed.rounds,
        accountant=cl.accountant,
        budget_epsilon=cl.effective_budget,
    )
