"""``privet plan``: what a run will spend and need, computed before anything trains.

For every client it works out the sampling rate and steps per round from its data, the noise
multiplier the client will calibrate (or the fixed one), and the sample-level epsilon after all
planned rounds; for the federation, the client-level noise and epsilon per round; and the payload
(bytes of trainable weights each way per client per round) and a rough memory estimate per client.
A run whose budget cannot hold is refused with the knob to change.  ``privet simulate`` runs the
same checks before any worker starts.

The numbers come from the code the run uses (``round_mechanism``, ``plan_federation``, the same
partition of the same data), so the plan and the run cannot disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from privet.common.config import PrivetConfig, sampled_per_round
from privet.common.data import cached_federated_data
from privet.common.errors import PrivacyError
from privet.common.privacy import (
    HistoryEntry,
    epsilon_from_history,
    example_sampling,
    readout_center_minimum,
    round_mechanism,
)
from privet.common.privacy.federation import FederationMechanism, plan_federation
from privet.common.privacy.secagg import quantization_slack

__all__ = ["ClientPlan", "RunPlan", "check_plan", "make_plan", "privacy_unit", "render_plan"]

_BUDGET_SLACK = 1e-9


def privacy_unit(cfg: PrivetConfig) -> str:
    """What sample-level DP protects in this run: one example, in the task's terms.

    A causal LM's examples have many tokens; DP-SGD clips each example's gradient summed over
    its tokens, so the unit is the whole sequence or chat, never a token (docs/llm.md).
    """
    if cfg.model.task == "causal_lm":
        return (
            "one example = one sequence (a plain text) or one chat (prompt and completion), "
            "however many tokens it has; someone with many examples is protected per example, "
            "a whole client only by privacy.client_level"
        )
    return "one example = one labelled text"


@dataclass
class ClientPlan:
    """One client's sample-level privacy plan."""

    name: str
    examples: int
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float | None
    epsilon_planned: float | None
    rounds_within_budget: int | None
    problem: str | None = None


@dataclass
class RunPlan:
    """The whole run's plan; :func:`check_plan` turns its problems into a refusal."""

    rounds: int
    clients: list[ClientPlan]
    federation: FederationMechanism | None
    federation_epsilon_per_round: list[float]
    trainable_parameters: int
    frozen_parameters: int
    payload_bytes: int
    memory_bytes_estimate: int
    problems: list[str] = field(default_factory=list)
    #: Decisions privet takes for the user that change the run (printed, not refused).
    notes: list[str] = field(default_factory=list)
    #: SecAgg+ per round (shares, threshold, tolerated dropouts, upload bytes); None when off.
    secure_aggregation: dict[str, Any] | None = None
    #: What one unit of sample-level DP is (:func:`privacy_unit`).
    privacy_unit: str = ""

    def as_json(self) -> dict[str, Any]:
        """The plan as a JSON-ready dictionary."""
        out = asdict(self)
        out["federation"] = self.federation.as_json() if self.federation else None
        return out


def _rounds_within(
    history_of: Any, *, rounds: int, budget: float | None
) -> tuple[float, int | None]:
    """Epsilon after ``rounds`` and the last round that stays within ``budget`` (None: all do)."""
    final = float(history_of(rounds))
    if budget is None or final <= budget + _BUDGET_SLACK:
        return final, None
    lo, hi = 0, rounds  # eps(lo) <= budget < eps(hi); epsilon is monotone in rounds
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if history_of(mid) <= budget + _BUDGET_SLACK:
            lo = mid
        else:
            hi = mid
    return final, lo


def _model_sizes(cfg: PrivetConfig, num_labels: int) -> tuple[int, int]:
    from privet.common.modeling import build_model

    built = build_model(cfg.model, cfg.adapter, num_labels=num_labels, seed=cfg.train.seed)
    trainable = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in built.model.parameters() if not p.requires_grad)
    return trainable, frozen


def _hidden_size(cfg: PrivetConfig) -> int:
    """The model's hidden size, from its configuration (768 when it names none)."""
    from transformers import AutoConfig

    from privet.common.modeling import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(cfg.model.name))
    return int(getattr(config, "hidden_size", 768))


def _memory_estimate(cfg: PrivetConfig, trainable: int, frozen: int, hidden: int) -> int:
    """A rough upper estimate of a client's training memory in bytes (fp32 everywhere).

    weights + gradients + AdamW's two moments + Opacus's per-sample gradients for one micro-batch
    + activations of one micro-batch (about 20 floats per token per hidden unit per layer).
    """
    physical = cfg.train.physical_batch_size or 16
    per_sample = physical * trainable if cfg.privacy.enabled else 0
    optimizer = 2 * trainable if cfg.train.optimizer == "adamw" else trainable
    layers = cfg.model.num_hidden_layers or 6
    activations = physical * cfg.model.max_length * hidden * layers * 20
    return 4 * (frozen + trainable + trainable + optimizer + per_sample + activations)


def make_plan(cfg: PrivetConfig, *, with_model: bool = True) -> RunPlan:
    """Compute the plan of the run ``cfg`` describes (data loaded, model built once on the CPU).

    Parameters
    ----------
    cfg
        The run's configuration.
    with_model
        Build the model to count its weights (a few seconds); ``False`` skips payload and memory.

    Returns
    -------
    RunPlan
        The plan; its ``problems`` are the reasons :func:`check_plan` would refuse it.

    """
    fed = cached_federated_data(cfg.data)
    rounds = cfg.federation.rounds
    p = cfg.privacy
    problems: list[str] = []
    notes: list[str] = []
    clients: list[ClientPlan] = []
    sigma_cache: dict[tuple[float, int, bool], float | str] = {}
    # adapter.readout_center: a client with enough examples releases its readout direction once,
    # one Gaussian step at rate 1 charged before its first round's calibration (client/privacy.py).
    center: HistoryEntry | None = None
    least = 0
    if p.enabled and cfg.adapter.readout_center:
        center = (p.readout_center_noise, 1.0, 1)
        least = readout_center_minimum(p.readout_center_noise, _hidden_size(cfg))
        notes.append(
            f"adapter.readout_center: each client with at least {least} training examples "
            f"releases its readout direction once (noise {p.readout_center_noise:g}), charged "
            "beside its DP-SGD steps and counted in the planned epsilon"
        )
    small: list[tuple[str, int]] = []  # clients with fewer examples than one batch
    for client in fed.clients:
        n = len(client.train)
        sampling = (
            example_sampling(
                n, batch_size=cfg.train.batch_size, local_epochs=cfg.train.local_epochs
            )
            if n
            else None
        )
        q = sampling.sample_rate if sampling else 1.0
        steps = sampling.steps if sampling else 0
        plan = ClientPlan(
            name=client.name,
            examples=n,
            sample_rate=q,
            steps_per_round=steps,
            noise_multiplier=None,
            epsilon_planned=None,
            rounds_within_budget=None,
        )
        clients.append(plan)
        if n and cfg.train.batch_size > n:
            small.append((client.name, n))
        if not p.enabled or n == 0:
            continue
        if p.delta >= 1.0 / n:
            plan.problem = (
                f"privacy.delta = {p.delta:g} is not below 1 / n = {1.0 / n:.2g} for client "
                f"{client.name} ({n} examples); lower privacy.delta"
            )
            problems.append(plan.problem)
            continue
        assert sampling is not None
        prior = [center] if center is not None and n >= least else []
        # Clients with the same sampling get the same noise: calibrate once per (q, steps).
        key = (q, steps, bool(prior))
        if key not in sigma_cache:
            try:
                sigma_cache[key] = round_mechanism(
                    sampling,
                    rounds=rounds,
                    delta=p.delta,
                    accountant=p.accountant,
                    noise_multiplier=p.noise_multiplier,
                    target_epsilon=p.target_epsilon,
                    prior_history=prior,
                ).noise_multiplier
            except PrivacyError as exc:
                sigma_cache[key] = exc.message
        sigma = sigma_cache[key]
        if isinstance(sigma, str):
            plan.problem = (
                f"client {client.name}: {sigma}; raise privacy.target_epsilon, or lower "
                "federation.rounds or train.local_epochs"
            )
            problems.append(plan.problem)
            continue
        plan.noise_multiplier = sigma
        s = sigma

        def eps_after(
            r: int,
            s: float = s,
            q: float = q,
            steps: int = steps,
            prior: list[HistoryEntry] = prior,
        ) -> float:
            if r <= 0:
                return 0.0
            return epsilon_from_history(
                [*prior, (s, q, steps * r)], delta=p.delta, accountant=p.accountant
            )

        final, within = _rounds_within(eps_after, rounds=rounds, budget=p.effective_budget)
        plan.epsilon_planned = final
        plan.rounds_within_budget = within
        if within is not None:
            plan.problem = (
                f"client {client.name}: privacy.budget_epsilon = {p.effective_budget:g} runs out "
                f"after round {within} of {rounds} (eps would reach {final:.3f} with "
                f"privacy.noise_multiplier = {s:g}); raise privacy.noise_multiplier, lower "
                "federation.rounds or train.local_epochs, or raise privacy.budget_epsilon"
            )
            problems.append(plan.problem)

    if small:
        name, n = min(small, key=lambda item: item[1])
        others = f" and {len(small) - 1} other client(s)" if len(small) > 1 else ""
        dp = " (under DP: no privacy amplification by sampling)" if p.enabled else ""
        notes.append(
            f"train.batch_size = {cfg.train.batch_size} is more than the {n} training examples of "
            f"{name}{others}: each of their steps uses all their examples (sampling rate 1){dp}; "
            "lower train.batch_size to sample batches"
        )

    mech: FederationMechanism | None = None
    fed_eps: list[float] = []
    cl = p.client_level
    if cl.enabled:
        try:
            mech = plan_federation(cl, cfg.federation, num_clients=len(fed.clients))
        except PrivacyError as exc:
            problems.append(f"client-level DP: {exc}")
        if mech is not None:
            fed_eps = [mech.epsilon_after(r) for r in range(1, rounds + 1)]
            budget = mech.budget_epsilon
            if budget is not None and fed_eps and fed_eps[-1] > budget + _BUDGET_SLACK:
                last = max((r for r, e in enumerate(fed_eps, 1) if e <= budget), default=0)
                problems.append(
                    f"client-level: privacy.client_level.budget_epsilon = {budget:g} runs out after "
                    f"round {last} of {rounds} (eps would reach {fed_eps[-1]:.3f} with "
                    f"noise_multiplier = {mech.noise_multiplier:g}); raise "
                    "privacy.client_level.noise_multiplier, lower federation.rounds, or raise "
                    "privacy.client_level.budget_epsilon"
                )

    trainable = frozen = 0
    memory = 0
    if with_model:
        trainable, frozen = _model_sizes(cfg, fed.num_labels)
        hidden = _hidden_size(cfg)
        memory = _memory_estimate(cfg, trainable, frozen, hidden)
    secagg = _secagg_plan(cfg, trainable, problems) if p.secure_aggregation else None
    return RunPlan(
        secure_aggregation=secagg,
        rounds=rounds,
        clients=clients,
        federation=mech,
        federation_epsilon_per_round=fed_eps,
        trainable_parameters=trainable,
        frozen_parameters=frozen,
        payload_bytes=4 * trainable,  # float32 on the wire, each way
        memory_bytes_estimate=memory,
        problems=problems,
        notes=notes,
        privacy_unit=privacy_unit(cfg),
    )


def _secagg_plan(cfg: PrivetConfig, trainable: int, problems: list[str]) -> dict[str, Any]:
    sa = cfg.privacy.secagg
    out: dict[str, Any] = {
        "quantization_step": 2 * sa.clipping_range / sa.quantization_range,
        # Flower's masked vector holds one int64 per weight (plus the weight factor).
        "upload_bytes": 8 * (trainable + 1) if trainable else None,
    }
    m = sampled_per_round(cfg)
    if m is not None:
        k, t = sa.shares_and_threshold(m)
        out.update(clients_per_round=m, num_shares=k, threshold=t, tolerated_dropouts=k - t)
    cl = cfg.privacy.client_level
    if cl.enabled and trainable:
        slack = quantization_slack(trainable, sa)
        out["quantization_slack_l2"] = slack
        if slack >= cl.clipping_norm / 2:
            problems.append(
                f"secure aggregation: the quantization error (up to {slack:.3g} in L2 norm over "
                f"{trainable:,} weights) is not small next to privacy.client_level.clipping_norm = "
                f"{cl.clipping_norm:g}; raise privacy.secagg.quantization_range or lower "
                "privacy.secagg.clipping_range"
            )
    return out


def check_plan(plan: RunPlan) -> None:
    """Refuse a plan with problems: one :class:`PrivacyError` naming the first and counting the rest.

    Raises
    ------
    PrivacyError
        When any budget cannot hold or the mechanism cannot be set up.

    """
    if not plan.problems:
        return
    more = len(plan.problems) - 1
    raise PrivacyError(
        "the plan cannot hold: "
        + plan.problems[0]
        + (f" (and {more} more problem(s); `privet plan` lists them)" if more else ""),
        fix="change the named setting, or run `privet plan --config ...` to see the whole plan",
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def render_plan(plan: RunPlan, cfg: PrivetConfig) -> Any:
    """A rich renderable of the plan (tables of clients and of the federation)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    p = cfg.privacy
    parts: list[Any] = []
    t = Table(
        title=f"sample-level DP per client ({p.accountant.upper()}, δ = {p.delta:g}, "
        f"budget ε ≤ {p.effective_budget})"
        if p.enabled
        else "sample-level DP: OFF",
        box=box.SIMPLE_HEAD,
        title_style="bold",
    )
    for col in ("client", "examples", "q", "steps/round", "σ", f"ε after {plan.rounds} rounds"):
        t.add_column(col, justify="right")
    for c in plan.clients:
        t.add_row(
            c.name,
            str(c.examples),
            f"{c.sample_rate:.4f}",
            str(c.steps_per_round),
            "-" if c.noise_multiplier is None else f"{c.noise_multiplier:.4f}",
            "-"
            if c.epsilon_planned is None
            else f"{c.epsilon_planned:.3f}"
            + (
                f" [red](budget ends after round {c.rounds_within_budget})[/red]"
                if c.rounds_within_budget is not None
                else ""
            ),
        )
    parts.append(t)
    if p.enabled and plan.privacy_unit:
        parts.append(Text(f"privacy unit of sample-level DP: {plan.privacy_unit}"))
    if plan.federation is not None:
        m = plan.federation
        cl = p.client_level
        parts.append(
            Text(
                f"client-level DP (DP-FedAvg): {cl.clipping} clipping on the {cl.side} side, clip "
                f"{cl.clipping_norm:g}, z = {m.noise_multiplier:.4f}, {m.clients_per_round} of "
                f"{m.population} clients per round, q = {m.sample_rate:g}, δ = {m.delta:g}, "
                f"{m.accountant.upper()} accountant, budget ε ≤ {m.budget_epsilon}",
                style="bold",
            )
        )
        ft = Table(box=box.SIMPLE_HEAD)
        ft.add_column("round", justify="right")
        ft.add_column("federation ε", justify="right")
        for r, e in enumerate(plan.federation_epsilon_per_round, 1):
            if r <= 3 or r == plan.rounds or r % max(1, plan.rounds // 5) == 0:
                ft.add_row(str(r), f"{e:.3f}")
        parts.append(ft)
    else:
        parts.append(Text("client-level DP: off (privacy.client_level.enabled = false)"))
    sa = plan.secure_aggregation
    if sa is not None:
        line = "secure aggregation (SecAgg+): the server sees only the sum of each round's updates"
        if "num_shares" in sa:
            line += (
                f"; {sa['num_shares']} shares per client, threshold {sa['threshold']}: up to "
                f"{sa['tolerated_dropouts']} of a client's neighbours may drop out"
            )
        if sa.get("upload_bytes"):
            line += f"; masked upload {_mib(sa['upload_bytes'])} per client per round (int64)"
        parts.append(Text(line, style="bold"))
    if plan.trainable_parameters:
        parts.append(
            Text(
                f"payload per client per round: {_mib(plan.payload_bytes)} each way "
                f"({plan.trainable_parameters:,} trainable weights, float32); frozen weights: "
                f"{plan.frozen_parameters:,}; memory per client (rough estimate): "
                f"{_mib(plan.memory_bytes_estimate)}"
            )
        )
    parts.extend(Text(f"note: {note}", style="yellow") for note in plan.notes)
    if plan.problems:
        parts.append(Text("REFUSED:", style="bold red"))
        parts.extend(Text(f"  - {why}", style="red") for why in plan.problems)
    else:
        parts.append(Text("plan OK: every budget holds for all planned rounds", style="bold green"))
    return Group(*parts)
