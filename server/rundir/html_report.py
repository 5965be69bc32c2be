"""A run report: one self-contained HTML page (inline CSS, plots as base64 PNG) plus the PNG files.

Nothing on the page is fetched: no script, font or stylesheet from the network, so the report opens
on an offline machine and can be mailed as one file. Plots are matplotlib (Agg).
"""

from __future__ import annotations

import base64
import html
import io
import json
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from privet.server.rundir import read_rounds

__all__ = ["PLOTS", "write_report"]

#: The plots a report holds, by file stem.
PLOTS = ("accuracy", "loss", "epsilon", "bytes")

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1100px; color: #1b1f23; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
.sub { color: #57606a; margin-top: 0; }
.cards { display: flex; flex-wrap: wrap; gap: .8rem; margin: 1rem 0; }
.card { border: 1px solid #d0d7de; border-radius: 6px; padding: .6rem 1rem; min-width: 9rem; }
.card .v { font-size: 1.4rem; font-weight: 600; } .card .k { color: #57606a; font-size: .85rem; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 1rem; }
figure { margin: 0; } figure img { width: 100%; border: 1px solid #eee; }
figcaption { color: #57606a; font-size: .85rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .6rem; text-align: right; }
th { background: #f6f8fa; } td.l, th.l { text-align: left; }
pre { background: #f6f8fa; padding: .8rem; overflow-x: auto; font-size: .85rem; }
.off { color: #b00020; font-weight: 700; } .warn { color: #9a6700; }
"""


@dataclass
class _Run:
    run_dir: Path
    records: list[dict[str, Any]]
    config_text: str
    config: dict[str, Any]
    summary: dict[str, Any]


def _load(run_dir: Path) -> _Run:
    from privet.common.errors import ConfigError

    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise ConfigError(
            f"{run_dir} is not a run directory (no config.toml)",
            fix="give a folder privet simulate wrote, e.g. runs/<name>",
        )
    text = config_path.read_text(encoding="utf-8")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    records, stopped = read_rounds(run_dir)
    if summary.get("stopped") is None:
        summary["stopped"] = stopped
    return _Run(run_dir, records, text, tomllib.loads(text), summary)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(r["round"]), float(r[key])) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _causal_lm(run: _Run) -> bool:
    return (run.config.get("model") or {}).get("task") == "causal_lm"


def _accuracy_name(run: _Run) -> str:
    """What ``server_accuracy`` means in this run.

    A classifier's accuracy, or a causal LM's exact match (data with answer choices) or token
    accuracy.
    """
    if not _causal_lm(run):
        return "accuracy"
    exact = any("exact-match" in (r.get("server_metrics") or {}) for r in run.records)
    return "exact match" if exact else "token accuracy"


def _perplexity(record: dict[str, Any]) -> float | None:
    value = (record.get("server_metrics") or {}).get("perplexity")
    return None if value is None else float(value)


def _figures(run: _Run) -> dict[str, bytes]:
    """Render each plot to PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = run.records
    rounds = [int(r["round"]) for r in recs]
    out: dict[str, bytes] = {}

    def _finish(fig: Any, ax: Any, name: str, ylabel: str, title: str) -> None:
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if rounds:
            ax.set_xticks(rounds)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        out[name] = buf.getvalue()

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, label in (
        ("server_accuracy", "server test set"),
        ("client_accuracy", "clients' test splits"),
    ):
        xs, ys = _series(recs, key)
        if xs:
            ax.plot(xs, ys, marker="o", label=label)
    acc = _accuracy_name(run)
    _finish(fig, ax, "accuracy", acc, f"{acc[0].upper()}{acc[1:]} of the global model")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, label in (
        ("train_loss", "train (clients, weighted)"),
        ("server_loss", "server test set"),
    ):
        xs, ys = _series(recs, key)
        if xs:
            ax.plot(xs, ys, marker="o", label=label)
    loss_title = "Loss per round"
    if _causal_lm(run):
        # A causal LM's loss is the mean cross-entropy per target token: perplexity = exp(loss).
        loss_title = "Loss per target token (perplexity = exp(loss))"
    _finish(fig, ax, "loss", "cross-entropy", loss_title)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    clients = sorted({c for r in recs for c in (r.get("epsilon_per_client") or {})})
    # Every client starts at ε = 0 before round 1: a one-round run still draws a line.
    for c in clients:
        pts = [(0, 0.0)] + [
            (int(r["round"]), float(r["epsilon_per_client"][c]))
            for r in recs
            if c in (r.get("epsilon_per_client") or {})
        ]
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            markersize=4,
            alpha=0.8,
            label=c if len(clients) <= 12 else None,
        )
    xs, ys = _series(recs, "max_epsilon")
    if xs:
        # Drawn under the clients' lines (zorder) and dotted: it coincides with the top client.
        ax.plot(
            [0, *xs],
            [0.0, *ys],
            color="black",
            linewidth=3,
            linestyle=":",
            zorder=1,
            label="federation (max over clients)",
        )
    budget = (run.config.get("privacy") or {}).get("budget_epsilon") or (
        run.config.get("privacy") or {}
    ).get("target_epsilon")
    if clients and budget:
        ax.axhline(float(budget), color="#b00020", linestyle="--", label=f"budget {budget}")
    if not clients:
        # Say why the plot is empty: the config decides whether DP was on, not the missing points.
        dp_on = bool((run.config.get("privacy") or {}).get("enabled", True))
        why = "no trained round yet" if dp_on else "DP off"
        ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
    else:
        ax.set_ylim(bottom=0)
    _finish(fig, ax, "epsilon", "cumulative ε", "Privacy spent per client")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    trained = [r for r in recs if int(r["round"]) > 0]
    xs = [int(r["round"]) for r in trained]
    width = 0.38
    top = max(
        [r.get("bytes_sent", 0) for r in trained]
        + [r.get("bytes_received", 0) for r in trained]
        + [0]
    )
    unit, scale = next(
        ((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if top >= s),
        ("bytes", 1),
    )
    ax.bar(
        [x - width / 2 for x in xs],
        [r.get("bytes_sent", 0) / scale for r in trained],
        width,
        label="sent to clients",
    )
    ax.bar(
        [x + width / 2 for x in xs],
        [r.get("bytes_received", 0) / scale for r in trained],
        width,
        label="received from clients",
    )
    _finish(fig, ax, "bytes", unit, "Bytes per round")
    return out


def _fmt(x: Any, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _table(
    headers: list[str], rows: list[list[str]], left: int = 1, text_last: bool = False
) -> str:
    def cls(i: int) -> str:
        return "l" if i < left or (text_last and i == len(headers) - 1) else ""

    th = "".join(f'<th class="{cls(i)}">{html.escape(h)}</th>' for i, h in enumerate(headers))
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{cls(i)}">{html.escape(c)}</td>' for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _ledgers(run: _Run) -> dict[str, tuple[int, float | None, str]]:
    """Per client: rounds in its ledger, ε recomputed from the history, and a note."""
    from privet.common.privacy.ledger import Ledger

    state_dir = (run.config.get("simulation") or {}).get("state_dir")
    folder = Path(state_dir) if state_dir else run.run_dir / "clients"
    out: dict[str, tuple[int, float | None, str]] = {}
    for path in sorted(folder.glob("ledger-*.json")) if folder.is_dir() else []:
        try:
            ledger = Ledger.model_validate_json(path.read_text(encoding="utf-8"))
            out[ledger.client_id] = (len(ledger.entries), ledger.epsilon(), "")
        except Exception as exc:  # a report shows a broken ledger, it does not stop on it
            out[path.stem.removeprefix("ledger-")] = (
                0,
                None,
                f"unreadable: {str(exc).splitlines()[0]}",
            )
    return out


def _privacy_section(run: _Run) -> str:
    stopped = run.summary.get("stopped")
    note = (
        f'<p class="warn">The run stopped early: {html.escape(str(stopped))}</p>' if stopped else ""
    )
    return note + _privacy_body(run)


def _clipping_line(run: _Run, asked: str) -> str:
    """Which per-example clipping the clients ran (``auto`` is resolved by each client)."""
    ran: dict[str, set[str]] = {}
    for r in run.records:
        for c, kind in (r.get("clipping_per_client") or {}).items():
            ran.setdefault(str(kind), set()).add(str(c))
    if not ran:
        return f"Per-example clipping: privacy.clipping = {asked!r}."
    parts = ", ".join(
        f"{kind} ({len(cs)} client{'s' * (len(cs) != 1)})" for kind, cs in sorted(ran.items())
    )
    return f"Per-example clipping: privacy.clipping = {asked!r}; the clients ran {parts}."


def _privacy_body(run: _Run) -> str:
    p = run.config.get("privacy") or {}
    if not p.get("enabled", True):
        return '<p class="off">Differential privacy was OFF: the clients\' updates carry no privacy guarantee.</p>'
    how = (
        f"target ε = {p['target_epsilon']}"
        if p.get("target_epsilon") is not None
        else f"fixed noise multiplier σ = {p.get('noise_multiplier')}"
    )
    budget = p.get("budget_epsilon") or p.get("target_epsilon")
    lines = [
        f"<p>Sample-level DP-SGD on every client (Opacus): {html.escape(how)}, δ = {p.get('delta')}, "
        f"clipping norm C = {p.get('max_grad_norm')}, {str(p.get('accountant', 'rdp')).upper()} accountant; "
        f"a client refuses any round that would take its cumulative ε past {budget}.</p>"
    ]
    lines.append(f"<p>{html.escape(_clipping_line(run, str(p.get('clipping', 'flat'))))}</p>")
    if _causal_lm(run):
        lines.append(
            "<p>The privacy unit is one example: one sequence, or one chat (prompt and "
            "completion), however many tokens it has; each example's gradient, summed over its "
            "tokens, is clipped to C.</p>"
        )
    last: dict[str, tuple[int, float]] = {}
    for r in run.records:
        for c, e in (r.get("epsilon_per_client") or {}).items():
            last[c] = (int(r["round"]), float(e))
    ledgers = _ledgers(run)
    clients = sorted(set(last) | set(ledgers))
    rows = []
    for c in clients:
        rnd, eps = last.get(c, (None, None))
        n, led_eps, note = ledgers.get(c, (None, None, "no ledger in this run directory"))
        rows.append([c, _fmt(eps, ".4f"), _fmt(rnd, "d"), _fmt(n, "d"), _fmt(led_eps, ".4f"), note])
    if rows:
        lines.append(
            _table(
                ["client", "ε (last report)", "in round", "ledger rounds", "ε from ledger", "note"],
                rows,
                text_last=True,
            )
        )
        eps_max = run.summary.get("max_epsilon")
        if eps_max is None and last:
            eps_max = max(e for _, e in last.values())
        lines.append(
            f"<p><b>Federation: largest cumulative ε among clients = {_fmt(eps_max, '.4f')}</b> (δ = {p.get('delta')}).</p>"
        )
    refusals = [
        (r["round"], who, why) for r in run.records for who, why in (r.get("errors") or {}).items()
    ]
    if refusals:
        lines.append('<p class="warn">Clients that refused or failed a round:</p>')
        lines.append(
            _table(["round", "who", "why"], [[str(a), b, c] for a, b, c in refusals], left=3)
        )
    return "\n".join(lines)


def _rounds_table(run: _Run) -> str:
    lm = _causal_lm(run)
    acc = {"accuracy": "acc", "exact match": "exact match", "token accuracy": "token acc"}[
        _accuracy_name(run)
    ]
    rows = []
    for r in run.records:
        ppl = [_fmt(_perplexity(r), ".2f")] if lm else []
        rows.append(
            [
                str(r["round"]),
                str(len(r.get("clients_trained") or [])) if r["round"] else "untrained",
                _fmt(r.get("train_loss"), ".4f"),
                _fmt(r.get("server_loss"), ".4f"),
                *ppl,
                _fmt(r.get("server_accuracy"), ".2%"),
                _fmt(r.get("client_accuracy"), ".2%"),
                _fmt(r.get("max_epsilon"), ".4f"),
                f"{r.get('bytes_sent', 0):,}",
                f"{r.get('bytes_received', 0):,}",
                f"{r.get('seconds', 0.0):.1f}",
            ]
        )
    return _table(
        [
            "round",
            "trained",
            "train loss",
            "server loss",
            *(["server perplexity"] if lm else []),
            f"server {acc}",
            f"client {acc}",
            "max ε",
            "bytes sent",
            "bytes received",
            "s",
        ],
        rows,
    )


def _samples_section(run: _Run) -> str:
    """A causal LM's greedy answers to the first server test prompts: untrained, then last round."""
    with_samples = [r for r in run.records if r.get("server_samples")]
    if not with_samples:
        return ""
    shown = [with_samples[0]] + ([with_samples[-1]] if len(with_samples) > 1 else [])
    rows = [
        [str(r["round"]), s.get("prompt", ""), s.get("target", ""), s.get("generated", "")]
        for r in shown
        for s in r["server_samples"]
    ]
    table = _table(["round", "prompt", "expected", "generated"], rows, left=4)
    return (
        "<h2>Generated samples</h2>\n<p>Greedy generations of the global model on the first "
        "prompts of the server's test set (round 0: the base model).</p>\n" + table
    )


def write_report(run_dir: Path, *, out: Path | None = None) -> Path:
    """Write ``report.html`` for a run, and its plots as PNG files beside it.

    Parameters
    ----------
    run_dir
        A run directory (``config.toml`` and ``metrics.jsonl``; an unfinished run is reported as far
        as it got).
    out
        The HTML file (default ``RUN_DIR/report.html``). The PNGs go to ``<out stem>-plots/``.

    Returns
    -------
    Path
        The HTML file.

    """
    run_dir = Path(run_dir)
    run = _load(run_dir)
    out = Path(out) if out is not None else run_dir / "report.html"
    png_dir = out.with_name(out.stem + "-plots")
    png_dir.mkdir(parents=True, exist_ok=True)
    figures = _figures(run)
    for name, data in figures.items():
        (png_dir / f"{name}.png").write_bytes(data)

    last = run.records[-1] if run.records else {}
    planned = (run.config.get("federation") or {}).get("rounds")
    done = max((int(r["round"]) for r in run.records), default=0)
    status = (
        "finished"
        if (run_dir / "final_adapter").is_dir()
        else f"unfinished ({done} of {planned} rounds)"
    )
    if run.summary.get("stopped"):
        status = f"stopped after round {done}"
    acc = _accuracy_name(run)
    first = run.records[0] if run.records else {}
    cards = [
        ("rounds", f"{done} / {planned}"),
        (f"server {acc}", _fmt(last.get("server_accuracy"), ".2%")),
        ("untrained", _fmt(first.get("server_accuracy"), ".2%")),
        (f"client {acc}", _fmt(last.get("client_accuracy"), ".2%")),
        ("max ε", _fmt(run.summary.get("max_epsilon", last.get("max_epsilon")), ".3f")),
        ("status", status),
    ]
    if _causal_lm(run):
        cards[1:1] = [
            ("server perplexity", _fmt(_perplexity(last), ".2f")),
            ("untrained perplexity", _fmt(_perplexity(first), ".2f")),
        ]
    card_html = "".join(
        f'<div class="card"><div class="v">{html.escape(v)}</div><div class="k">{html.escape(k)}</div></div>'
        for k, v in cards
    )
    captions = {
        "accuracy": f"{acc[0].upper()}{acc[1:]} of the global adapter on the server's held-out test set and on the clients' own test splits (round 0: untrained).",
        "loss": "Weighted mean of the clients' training loss, and the server test loss.",
        "epsilon": "Cumulative ε of each client (from its ledger, as reported each round) and the largest among them.",
        "bytes": "Adapter bytes sent to and received from all clients per round.",
    }
    figs = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        f"<figcaption>{html.escape(captions[name])}</figcaption></figure>"
        for name, data in figures.items()
    )
    model = run.config.get("model") or {}
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>privet run {html.escape(run_dir.name)}</title>
<style>{_CSS}</style></head>
<body>
<h1>privet run <code>{html.escape(run_dir.name)}</code></h1>
<p class="sub">{html.escape(str(model.get("name", "")))} · {html.escape(str(run_dir.resolve()))} · report written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC</p>
<div class="cards">{card_html}</div>
<h2>Per round</h2>
<div class="grid">{figs}</div>
{_rounds_table(run)}
{_samples_section(run)}
<h2>Privacy</h2>
{_privacy_section(run)}
<h2>Configuration (as resolved)</h2>
<pre>{html.escape(run.config_text)}</pre>
</body></html>
"""
    out.write_text(page, encoding="utf-8")
    return out
