"""The privacy report of a run as a person reads it: a plot of cumulative epsilon per round.

The server writes ``privacy.json`` (``privet.server.privacy.privacy_report``); this draws
``privacy.png`` from it: each client's cumulative sample-level epsilon and the federation's
client-level epsilon per round, with their budgets, and a mark where a budget stopped training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["load_privacy_report", "plot_privacy", "privacy_lines"]


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
