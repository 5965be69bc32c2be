"""Shared helpers of the benchmarks: machine facts, timing, result files, the printed table.

Every benchmark writes one JSON file ``benchmarks/results/<name>.json``::

    {"name": ..., "command": ..., "machine": {...}, "when": ...,
     "rows": [{"metric": ..., "value": ..., "unit": ..., "goal": ..., "met": ...}, ...],
     "details": {...}}

``benchmarks/report.py`` prints all of them as one table and writes the rows into
docs/benchmarks.md. Ratios are measured side by side in one process, with the variants interleaved
and the median of the repeats taken, because the machines these run on are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        import psutil

        mem_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover - psutil is a dependency
        mem_gib = None
    versions = {}
    for mod in ("torch", "flwr", "opacus", "peft", "transformers", "ray"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "gpu": gpu,
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        **versions,
    }


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    p.add_argument(
        "--mixed-precision",
        default="auto",
        choices=["auto", "off", "bf16", "fp16"],
        help="autocast for non-private steps and evaluation on GPU (DP steps stay in fp32)",
    )
    p.add_argument(
        "--quick", action="store_true", help="smallest sizes (a smoke test, not a figure)"
    )
    p.add_argument("--repeats", type=int, default=None, help="repeats per variant (median taken)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON result")
    return p


def check_device(args: argparse.Namespace) -> None:
    """Stop with one clear line when ``--device cuda`` is asked for on a machine without a GPU."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda: no CUDA device is visible on this machine; run without --device "
            "(CPU) or on a GPU machine"
        )


def command_line() -> str:
    """The command that produced a result, as one would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_s = str(script.relative_to(ROOT))
    except ValueError:
        script_s = str(script)
    return " ".join(["python", shlex.quote(script_s), *map(shlex.quote, sys.argv[1:])])


def interleaved(
    variants: dict[str, Callable[[], float]], repeats: int, *, warmup: bool = True
) -> dict[str, list[float]]:
    """Run each variant ``repeats`` times, alternating, and return the seconds of each run.

    Alternating A, B, A, B, ... spreads the load of a shared machine over all variants, so their
    ratio is far steadier than their absolute times.  Each callable returns the seconds to count
    (it may leave set-up out).  One unrecorded warm-up run per variant comes first.
    """
    if warmup:
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(fn())
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def row(
    metric: str,
    value: float | int | str | None,
    unit: str = "",
    goal: str = "",
    met: bool | None = None,
) -> dict[str, Any]:
    return {"metric": metric, "value": value, "unit": unit, "goal": goal, "met": met}


def write_result(
    name: str, rows: list[dict[str, Any]], details: dict[str, Any], out: Path = RESULTS
) -> Path:
    """Write ``<out>/<name>.json`` and print the rows."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "name": name,
        "command": command_line(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "rows": rows,
        "details": details,
    }
    path = out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print_rows(name, rows)
    return path


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("metric", "value", "goal", "met"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for r in rows:
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: ""}[r["met"]]
        table.add_row(r["metric"], f"{fmt(r['value'])} {r['unit']}".strip(), r["goal"], met)
    Console().print(table)


class PeakMemory:
    """Peak resident memory of this process and all its descendants (Ray workers too), sampled.

    Summing the RSS of a process tree counts shared pages (the torch libraries) once per process,
    so the figure errs on the high side.
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def timed_simulation(cfg: Any) -> dict[str, Any]:
    """Run ``privet.simulations.simulate(cfg)``; wall time, per-round times and ε, Ray's start-up."""
    from privet.simulations import simulate

    start = time.perf_counter()
    run_dir = simulate(cfg)
    total = time.perf_counter() - start
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["round"] > 0]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "total_seconds": total,
        "round_seconds": [r["seconds"] for r in rows],
        "round_startup_seconds": [r.get("startup_seconds", 0.0) for r in rows],
        "epsilon": [r.get("max_epsilon") for r in rows],
        "ray_start_seconds": summary.get("ray_start_seconds"),
    }
