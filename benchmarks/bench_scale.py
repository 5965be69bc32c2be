"""Scale: 1,000 clients with 10 training per round against 20 clients with the same 10 per round.

Both federations give every client the same amount of data (the 20-client one uses a matching
subset of VADER), so the training work per round is the same and any difference is the cost of
the population: node bookkeeping, per-client data, ledgers, model handling in the workers.
Evaluation is off. Peak memory is the resident memory of this process and every process it
started (Ray and its workers), sampled every 0.25 s.
Goals: later rounds of the large federation within 1.2x of the small one; peak memory under 4 GB.

    python benchmarks/bench_scale.py [--device cuda] [--quick]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import benchlib
import numpy as np

from privet.common.config import PrivetConfig, load_config
from privet.common.data import cached_federated_data


def config(
    args: Any, out: Path, clients: int, per_round: int, max_examples: int | None
) -> PrivetConfig:
    rounds = 2 if args.quick else 3
    return load_config(
        None,
        [
            f"data.num_clients={clients}",
            f"data.max_examples={max_examples if max_examples else 'none'}",
            f"federation.rounds={rounds}",
            f"federation.fraction_train={per_round / clients}",
            f"federation.min_train_clients={per_round}",
            "federation.server_evaluation=false",
            "federation.fraction_evaluate=0.0",
            "train.local_epochs=1.0",
            f"model.device='{args.device}'",
            f"model.mixed_precision='{args.mixed_precision}'",
            f"simulation.gpus_per_client={0.5 if args.device == 'cuda' else 0.0}",
            f"simulation.output_dir='{out}'",
            f"simulation.run_name='c{clients}'",
        ],
    )


def run(cfg: PrivetConfig) -> dict[str, Any]:
    from privet.simulations import simulate

    with benchlib.PeakMemory() as mem:
        run_dir = simulate(cfg)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["round"] > 0]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "round_seconds": [r["seconds"] for r in recs],
        "round_startup_seconds": [r.get("startup_seconds", 0.0) for r in recs],
        "trained": [len(r["clients_trained"]) for r in recs],
        "errors": [r["errors"] for r in recs if r["errors"]],
        "peak_memory_gib": mem.peak / 2**30,
        "ray_start_seconds": summary.get("ray_start_seconds"),
    }


def main() -> None:
    p = benchlib.parser(__doc__ or "")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--small", type=int, default=20)
    p.add_argument("--per-round", type=int, default=10)
    args = p.parse_args()
    benchlib.check_device(args)
    big_n = 200 if args.quick else args.clients
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        big_cfg = config(args, out, big_n, args.per_round, None)
        pool = cached_federated_data(big_cfg.data)
        per_client = float(np.mean([len(c.train) + len(c.test) for c in pool.clients]))
        # The same examples per client in the small federation (plus its 10% server test share).
        small_examples = round(per_client * args.small / (1 - big_cfg.data.server_test_fraction))
        small_cfg = config(args, out, args.small, args.per_round, small_examples)
        small = run(small_cfg)
        big = run(big_cfg)
    later = slice(1, None)
    s = float(np.median(small["round_seconds"][later]))
    b = float(np.median(big["round_seconds"][later]))
    peak = max(small["peak_memory_gib"], big["peak_memory_gib"])
    rows = [
        benchlib.row(
            f"{args.small} clients, {args.per_round} per round: later rounds (median)", s, "s"
        ),
        benchlib.row(f"{big_n} clients, {args.per_round} per round: later rounds (median)", b, "s"),
        benchlib.row(
            f"{big_n} / {args.small} clients, per round", b / s, "x", "<= 1.2", b / s <= 1.2
        ),
        benchlib.row(
            f"round 1 ({args.small} / {big_n} clients)",
            f"{small['round_seconds'][0]:.1f} / {big['round_seconds'][0]:.1f}",
            "s",
        ),
        benchlib.row(
            f"peak memory, {big_n} clients (all processes)",
            big["peak_memory_gib"],
            "GiB",
            "< 4 GB",
            peak * 2**30 < 4e9,
        ),
        benchlib.row(
            f"peak memory, {args.small} clients (all processes)", small["peak_memory_gib"], "GiB"
        ),
    ]
    details = {
        "examples_per_client": per_client,
        "small": small,
        "big": big,
        "small_max_examples": small_examples,
    }
    benchlib.write_result("scale", rows, details, args.out)


if __name__ == "__main__":
    main()
