"""The run's privacy report, ``privacy.json``: written after a run, read back, summed up, drawn.

:func:`privacy_report` gathers what a reader needs to check the run's privacy claims (each
client's sample-level epsilon per round, the federation's client-level rounds, secure
aggregation) and the server writes it as ``privacy.json``; :func:`privacy_lines` sums it up for the
terminal and :func:`plot_privacy` draws ``privacy.png``: each client's cumulative sample-level
epsilon and the federation's client-level epsilon per round, with their budgets, and a mark where
a budget stopped training.

The readers stay light (``privet runs`` and the end of a simulation load no Flower and no
Opacus): the client-level wrapper is only a type here, and the writer imports the privacy
arithmetic when it runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privet.common.config import PrivetConfig, sampled_per_round
from privet.common.protocol import ErrorCode, partition_of_reason

if TYPE_CHECKING:
    from privet.server.privacy import ClientLevelDP

__all__ = [
    "load_privacy_report",
    "plot_privacy",
    "privacy_lines",
    "privacy_report",
    "secure_aggregation_report",
]


def load_privacy_report(run_dir: Path) -> dict[str, Any]:
    """Read ``privacy.json`` of a run (empty when the run wrote none)."""
    path = Path(run_dir) / "privacy.json"
    if not path.exists():
        return {}
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def privacy_lines(report: dict[str, Any]) -> list[str]:
    """A few lines that sum the report up for the terminal."""
    lines: list[str] = []
    sample = report.get("sample_level", {})
    if sample.get("enabled"):
        for name, c in sorted(sample.get("clients", {}).items()):
            stop = (
                f", budget refused rounds {c['budget_refused_rounds']}"
                if c.get("budget_refused_rounds")
                else ""
            )
            again = "".join(
                f", round {r} charged {n} times (redone after a resume)"
                for r, n in sorted(c.get("charges_per_round", {}).items(), key=lambda x: int(x[0]))
            )
            lines.append(
                f"client {name}: ε = {c['final_epsilon']:.3f} (δ = {sample['delta']:g}), "
                f"joined rounds {c['rounds_joined']}{again}{stop}"
            )
    fed = report.get("client_level", {})
    if fed.get("enabled"):
        lines.append(
            f"federation (client-level): ε = {fed['final_epsilon']:.3f} (δ = {fed['delta']:g}, "
            f"z = {fed['noise_multiplier']:.4g}, budget {fed['budget_epsilon']})"
            + "".join(
                f", round {r} charged {n} times (redone after a resume)"
                for r, n in sorted(
                    fed.get("charges_per_round", {}).items(), key=lambda x: int(x[0])
                )
                if n > 1
            )
        )
    sa = report.get("secure_aggregation")
    if isinstance(sa, dict) and sa.get("enabled"):
        tolerance = (
            f", {sa['num_shares']} shares, threshold {sa['reconstruction_threshold']} (tolerates "
            f"{sa['tolerated_dropouts_per_neighbourhood']} dropouts per round)"
            if "num_shares" in sa
            else ""
        )
        lines.append(f"secure aggregation: SecAgg+, the server saw only sums{tolerance}")
    if report.get("stopped"):
        lines.append(f"training stopped early: {report['stopped']}")
    return lines


def plot_privacy(run_dir: Path) -> Path | None:
    """Draw ``privacy.png`` (cumulative ε per round) from ``privacy.json``; ``None`` if nothing to draw."""
    report = load_privacy_report(run_dir)
    sample = report.get("sample_level", {})
    fed = report.get("client_level", {})
    if not sample.get("enabled") and not fed.get("enabled"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [p for p in ("sample", "fed") if (sample if p == "sample" else fed).get("enabled")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "sample":
            for name, c in sorted(sample["clients"].items()):
                pts = sorted((int(r), e) for r, e in c["epsilon_per_round"].items())
                if pts:
                    ax.plot(
                        [0] + [r for r, _ in pts],
                        [0.0] + [e for _, e in pts],
                        marker="o",
                        label=name,
                    )
                for r in c.get("budget_refused_rounds", []):
                    ax.axvline(r, color="red", alpha=0.2)
            if sample.get("budget_epsilon") is not None:
                ax.axhline(sample["budget_epsilon"], color="black", linestyle="--", label="budget")
            ax.set_title(
                f"sample-level ε per client (δ = {sample['delta']:g}, {sample['accountant']})"
            )
        else:
            pts = [(r["round"], r["epsilon_after"]) for r in fed.get("rounds", [])]
            ax.plot(
                [0] + [r for r, _ in pts],
                [0.0] + [e for _, e in pts],
                marker="o",
                color="tab:purple",
                label="federation",
            )
            if fed.get("budget_epsilon") is not None:
                ax.axhline(fed["budget_epsilon"], color="black", linestyle="--", label="budget")
            if report.get("stopped") and pts:
                ax.axvline(pts[-1][0] + 1, color="red", alpha=0.4, label="stopped before")
            ax.set_title(
                f"client-level ε (δ = {fed['delta']:g}, z = {fed['noise_multiplier']:.3g})"
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel("cumulative ε")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(run_dir) / "privacy.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def secure_aggregation_report(cfg: PrivetConfig) -> dict[str, Any]:
    """What secure aggregation did for a run configured by ``cfg`` (a section of ``privacy.json``)."""
    if not cfg.privacy.secure_aggregation:
        return {"enabled": False}
    sa = cfg.privacy.secagg
    m = sampled_per_round(cfg)
    out: dict[str, Any] = {
        "enabled": True,
        "protocol": "SecAgg+ (Flower's SecAggPlusWorkflow and secaggplus_mod)",
        "server_sees": "only the sum of each round's updates; per-client metrics (loss, "
        "examples, epsilon) travel in the clear",
        "weights": "equal (client-level DP)" if cfg.privacy.client_level.enabled else "examples",
        "clipping_range": sa.clipping_range,
        "quantization_range": sa.quantization_range,
        "modulus_range": sa.modulus_range,
        "quantization_step": 2 * sa.clipping_range / sa.quantization_range,
    }
    if m is not None:
        k, t = sa.shares_and_threshold(m)
        out.update(
            clients_per_round=m,
            num_shares=k,
            reconstruction_threshold=t,
            tolerated_dropouts_per_neighbourhood=k - t,
        )
    return out


def _client_of_error(reason: str, client_names: list[str]) -> str | None:
    # Client error replies name their partition (privet.common.protocol.error_reason).
    partition = partition_of_reason(reason)
    if partition is not None and partition < len(client_names):
        return client_names[partition]
    return None


def privacy_report(
    cfg: PrivetConfig,
    *,
    history: list[Any],
    client_names: list[str],
    examples_per_client: dict[str, int],
    client_level: ClientLevelDP | None,
    stopped: str | None,
) -> dict[str, Any]:
    """Everything a reader needs to check the run's privacy claims, as one JSON-ready dictionary.

    Parameters
    ----------
    cfg
        The run's configuration.
    history
        The run's ``RoundRecord`` objects (round 0 first).
    client_names
        All clients, by partition id.
    examples_per_client
        Training examples per client as the server sees the data (for each client's sampling
        rate), used only for clients that never reported their own count (``num-examples``).
    client_level
        The client-level wrapper, when client-level DP is on.
    stopped
        Why training stopped early (``None``: it ran all planned rounds).

    Returns
    -------
    dict
        ``sample_level`` (per-client epsilon per round, rounds joined, budget refusals, and the
        mechanism), ``client_level`` (per-round federation epsilon, clip, noise, dropped updates),
        ``stopped``.

    """
    # Here, not at the top: the readers below must not load Opacus (see the module docstring).
    from privet.common.privacy.mechanism import example_sampling

    p = cfg.privacy
    clients: dict[str, dict[str, Any]] = {}
    # What each client reported training on wins over the server's view of the data: a deployed
    # site trains on its own split, and its ledger's sampling rate comes from that count.
    reported: dict[str, int] = {}
    for rec in history:
        reported.update(getattr(rec, "examples_per_client", {}))
    for name in [*client_names, *sorted(set(reported) - set(client_names))]:
        n = reported.get(name, examples_per_client.get(name, 0))
        # The client's own arithmetic on the count it trained on: what its ledger records.
        sampling = (
            example_sampling(
                n, batch_size=cfg.train.batch_size, local_epochs=cfg.train.local_epochs
            )
            if n
            else None
        )
        clients[name] = {
            "examples": n,
            "sample_rate": sampling.sample_rate if sampling else None,
            "steps_per_round": sampling.steps if sampling else None,
            "epsilon_per_round": {},
            "rounds_joined": [],
            "budget_refused_rounds": [],
            # Rounds this client's ledger charged more than once (redone after a resume).
            "charges_per_round": {},
        }
    for rec in history:
        if rec.round == 0:
            continue
        for name, eps in rec.epsilon_per_client.items():
            if name in clients:
                clients[name]["epsilon_per_round"][str(rec.round)] = eps
                clients[name]["rounds_joined"].append(rec.round)
        for name, attempt in rec.charged_again.items():
            if name in clients:
                clients[name]["charges_per_round"][str(rec.round)] = attempt
        for key, reason in rec.errors.items():
            who = _client_of_error(reason, client_names)
            # A refusal is known by its code, never by the wording of its reason.
            if who is not None and rec.error_codes.get(key) == ErrorCode.BUDGET:
                clients[who]["budget_refused_rounds"].append(rec.round)
    for info in clients.values():
        eps = list(info["epsilon_per_round"].values())
        info["final_epsilon"] = eps[-1] if eps else 0.0
        info["budget_stopped"] = bool(info["budget_refused_rounds"])
    sample_level = {
        "enabled": p.enabled,
        "mechanism": "DP-SGD (Opacus), Poisson sampling, per-sample clipping",
        "accountant": p.accountant,
        "delta": p.delta,
        "target_epsilon": p.target_epsilon,
        "noise_multiplier": p.noise_multiplier,
        "noise_multiplier_note": (
            "calibrated per client at its first round to spend target_epsilon over all planned "
            "rounds (stored in the client's ledger)"
            if p.noise_multiplier is None
            else "fixed"
        ),
        "max_grad_norm": p.max_grad_norm,
        "budget_epsilon": p.effective_budget,
        "batch_size": cfg.train.batch_size,
        "local_epochs": cfg.train.local_epochs,
        "clients": clients,
    }
    if p.enabled and cfg.adapter.readout_center:
        # One more release per client, counted in every epsilon above (client/privacy.py).
        sample_level["readout_direction"] = {
            "mechanism": "Gaussian: the sum of the examples' unit final states (sensitivity 1)",
            "noise_multiplier": p.readout_center_noise,
            "sample_rate": 1.0,
            "steps": 1,
            "note": (
                "released once per client with enough examples, before its first round, and "
                "counted in its epsilon; a deployed site's noise floor raises the noise"
            ),
        }
    fed: dict[str, Any] = {"enabled": False}
    if client_level is not None:
        cl = client_level.cl
        fed = {
            "enabled": True,
            "mechanism": "DP-FedAvg: clipped client updates, fixed-denominator mean, Gaussian noise",
            "clipping": cl.clipping,
            "side": cl.side,
            "initial_clipping_norm": cl.clipping_norm,
            **client_level.mechanism.as_json(),
            "sampling": (
                "Poisson-subsampling bound at q = clients per round / population (approximation "
                "for Flower's fixed-size sampling)"
                if cl.sampling_amplification
                else "no amplification (q = 1): valid for any choice of clients"
            ),
            "rounds": [r.as_json() for r in client_level.rounds],
            # From the ledger, so rounds charged before a resume count too; > 1: redone rounds.
            "charges_per_round": {str(r): n for r, n in client_level.ledger.attempts().items()},
            "final_epsilon": client_level.epsilon(),
            "ledger": str(client_level.ledger_path),
        }
    return {
        "sample_level": sample_level,
        "client_level": fed,
        "secure_aggregation": secure_aggregation_report(cfg),
        "stopped": stopped,
        "rounds_run": len([r for r in history if r.round > 0]),
        "rounds_planned": cfg.federation.rounds,
    }
