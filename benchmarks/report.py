"""Print every benchmark result as one table; with --write-docs, put it into docs/benchmarks.md.

    python benchmarks/report.py [--results benchmarks/results] [--write-docs]
    python benchmarks/report.py --gpu [--results benchmarks/results/gpu] --write-docs

The docs section sits between the markers ``<!-- bench:begin -->`` and ``<!-- bench:end -->``
(added at the end of the file the first time) and holds, per benchmark, the command, the machine
and the rows. ``--gpu`` writes the GPU suite's results (``benchmarks/gpu_suite.py``) into their
own section beside it, between ``<!-- bench-gpu:begin -->`` and ``<!-- bench-gpu:end -->``, so
the CPU and GPU tables never overwrite each other.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import benchlib

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
GPU_BEGIN, GPU_END = "<!-- bench-gpu:begin -->", "<!-- bench-gpu:end -->"
GPU_RESULTS = benchlib.RESULTS / "gpu"
ORDER = ["dp_overhead", "federation_overhead", "vs_flower_examples", "communication", "scale"]
# the GPU section: the whole suite's run first, then runs of single stages (gpu_suite.py --name)
ORDER += ["gpu", "gpu-quant"]


def load(folder: Path, pattern: str = "*.json") -> list[dict[str, Any]]:
    docs = [json.loads(p.read_text()) for p in sorted(folder.glob(pattern))]
    return sorted(docs, key=lambda d: ORDER.index(d["name"]) if d["name"] in ORDER else 99)


def machine_line(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    return (
        f"{m.get('nproc')} CPUs ({m.get('cpu')}){gpu}, {m.get('memory_gib')} GiB RAM, "
        f"torch {m.get('torch')}, flwr {m.get('flwr')}, opacus {m.get('opacus')}, "
        f"ray {m.get('ray')}"
    )


def markdown(docs: list[dict[str, Any]], *, gpu: bool = False) -> str:
    if gpu:
        out = [
            GPU_BEGIN,
            "",
            '## GPU results (`make bench BENCH_ARGS="--device cuda"`)',
            "",
            "Written by `python benchmarks/report.py --gpu --write-docs` from "
            "`benchmarks/results/gpu/gpu.json` (`benchmarks/gpu_suite.py`; on a bare GPU machine "
            "`benchmarks/gpu_run.sh`); each stage ran in its own process under its own time limit.",
            "",
        ]
    else:
        out = [
            BEGIN,
            "",
            "## `make bench` results",
            "",
            "Written by `python benchmarks/report.py --write-docs` from `benchmarks/results/*.json`; "
            "each ratio is measured side by side in one run.",
            "",
        ]
    for d in docs:
        met = {True: "yes", False: "**no**", None: ""}
        out += [
            f"### {d['name']}",
            "",
            f"Command: `{d['command']}` ({d['when']}). Machine: {machine_line(d['machine'])}.",
            "",
            "| metric | value | goal | met |",
            "| --- | --- | --- | --- |",
        ]
        for r in d["rows"]:
            value = f"{benchlib.fmt(r['value'])} {r['unit']}".strip()
            out.append(f"| {r['metric']} | {value} | {r['goal']} | {met[r['met']]} |")
        out.append("")
    out.append(GPU_END if gpu else END)
    return "\n".join(out) + "\n"


def write_docs(docs: list[dict[str, Any]], path: Path, *, gpu: bool = False) -> None:
    text = path.read_text() if path.is_file() else ""
    block = markdown(docs, gpu=gpu)
    begin, end = (GPU_BEGIN, GPU_END) if gpu else (BEGIN, END)
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--gpu", action="store_true", help="the GPU suite's results, their own section")
    p.add_argument("--docs", type=Path, default=benchlib.ROOT / "docs" / "benchmarks.md")
    args = p.parse_args()
    if args.results is None:
        args.results = GPU_RESULTS if args.gpu else benchlib.RESULTS
    # the GPU folder also holds the suite's per-stage files; gpu.json gathers them, gpu-<x>.json
    # are later runs of single stages (each its own table, with its own machine line)
    docs = load(args.results, "gpu*.json" if args.gpu else "*.json")
    if not docs:
        raise SystemExit(f"no results in {args.results}; run `make bench` first")
    from rich.console import Console
    from rich.table import Table

    table = Table(title="privet benchmarks")
    for col in ("benchmark", "metric", "value", "goal", "met"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for d in docs:
        for r in d["rows"]:
            met = {True: "[green]yes[/]", False: "[red]no[/]", None: ""}[r["met"]]
            value = f"{benchlib.fmt(r['value'])} {r['unit']}".strip()
            table.add_row(d["name"], r["metric"], value, r["goal"], met)
    console = Console(width=160)
    console.print(table)
    console.print(f"machine: {machine_line(docs[0]['machine'])}")
    if args.write_docs:
        write_docs(docs, args.docs, gpu=args.gpu)
        console.print(f"wrote {args.docs}")


if __name__ == "__main__":
    main()
