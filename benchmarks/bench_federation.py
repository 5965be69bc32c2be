"""Federation overhead: a simulated federation over centralized training on the same samples and steps.

The federation is privet's own (Flower's Simulation Engine on Ray, DP on, LoRA). The centralized
baseline runs, in this process and on the same device, exactly the training calls the clients
make: for each round and client the same data, the same DP settings (noise, clip, Poisson rate,
steps) and the same seed, so the same samples and steps, followed by the same weighted average.
Evaluation is off on both sides. Ray's start-up and the workers' one-time model loads are
reported apart (``ray_start_seconds`` and ``startup_seconds`` in the run's summary.json).
Goal: at most 1.10 with LoRA.

Fair by construction: both sides get the same cores, ``--cpus`` (default 1).  The federation's
Ray gets ``simulation.num_cpus = cpus`` and each client ``cpus_per_client = cpus``, so exactly
one Ray worker trains at a time, with ``cpus`` torch threads; the centralized run trains the same
clients one after the other in this process with ``cpus`` torch threads.  (Letting the
federation run clients in parallel on more cores than the centralized run has, as an earlier
version of this benchmark did, measures parallelism, not overhead.)  The federation's driver
(ServerApp, Flower's simulation engine) is not confined: its CPU time is the overhead measured.

    python benchmarks/bench_federation.py [--device cuda] [--quick] [--cpus N]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import torch

from privet.client.privacy import plan_round, record_round
from privet.client.training import train
from privet.common.config import PrivetConfig, load_config
from privet.common.data import TokenizedExamples, cached_federated_data
from privet.common.modeling import build_model, load_trainable_state, trainable_state


def config(args: Any, out: Path, name: str) -> PrivetConfig:
    rounds, examples, epochs = (2, 2000, 0.1) if args.quick else (3, 4000, 0.1)
    cpus = int(args.cpus)
    return load_config(
        None,
        [
            f"data.max_examples={examples}",
            "data.num_clients=2",
            f"federation.rounds={rounds}",
            "federation.server_evaluation=false",
            "federation.fraction_evaluate=0.0",
            f"train.local_epochs={epochs}",
            f"model.device='{args.device}'",
            f"model.mixed_precision='{args.mixed_precision}'",
            f"simulation.gpus_per_client={1.0 if args.device == 'cuda' else 0.0}",
            # One worker at a time with the same cores as the centralized run (see the docstring).
            f"simulation.num_cpus={cpus}",
            f"simulation.cpus_per_client={cpus}",
            f"train.num_threads={cpus}",
            f"simulation.output_dir='{out}'",
            f"simulation.run_name='{name}'",
        ],
    )


def centralized(cfg: PrivetConfig, threads: int) -> list[float]:
    """The clients' training calls, one after the other in this process; seconds per round.

    The privacy planning (a client's first round calibrates its noise) is left out of the clock:
    it is a start-up cost, reported apart on the federated side too.
    """
    torch.set_num_threads(threads)
    fed = cached_federated_data(cfg.data)
    built = build_model(cfg.model, cfg.adapter, num_labels=fed.num_labels, seed=cfg.train.seed)
    device = torch.device(cfg.model.device if cfg.model.device != "auto" else "cpu")
    model = built.model.to(device)
    pad = int(built.tokenizer.pad_token_id)
    sets = [TokenizedExamples(c.train, built.tokenizer, cfg.model.max_length) for c in fed.clients]
    global_state = trainable_state(model)
    seconds = []
    with tempfile.TemporaryDirectory() as state_dir:
        for rnd in range(1, cfg.federation.rounds + 1):
            plans = [
                plan_round(
                    privacy=cfg.privacy,
                    train=cfg.train,
                    num_examples=len(data),
                    total_rounds=cfg.federation.rounds,
                    state_dir=Path(state_dir),
                    client_id=client.name,
                )
                for client, data in zip(fed.clients, sets, strict=True)
            ]
            start = time.perf_counter()
            states, weights, results = [], [], []
            for pid, (plan, data) in enumerate(zip(plans, sets, strict=True)):
                load_trainable_state(model, global_state)
                res = train(
                    model,
                    data,
                    cfg.train,
                    dp=plan.dp,
                    pad_token_id=pad,
                    device=device,
                    mixed_precision=cfg.model.mixed_precision,
                    seed=cfg.train.seed * 1_000_003 + pid * 10_007 + rnd,
                )
                states.append(res.state)
                results.append(res)
                weights.append(float(res.num_examples))
            total = sum(weights)
            global_state = {
                k: sum(w * s[k] for w, s in zip(weights, states, strict=True)) / total
                for k in states[0]
            }
            seconds.append(time.perf_counter() - start)
            for plan, res in zip(plans, results, strict=True):
                record_round(plan, server_round=rnd, result=res)
    return seconds


def main() -> None:
    p = benchlib.parser(__doc__ or "")
    p.add_argument(
        "--cpus",
        type=int,
        default=1,
        help="cores of each side: the federation's Ray CPUs (one worker) and the centralized threads",
    )
    args = p.parse_args()
    benchlib.check_device(args)
    repeats = args.repeats or 1
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cen: list[list[float]] = []
        feds: list[dict[str, Any]] = []
        # C F C (F C ...): the centralized runs bracket the federated ones, so drift in the
        # machine's load affects both sides alike.
        cen.append(centralized(config(args, out, "c0"), args.cpus))
        for i in range(repeats):
            with benchlib.PeakMemory() as mem:
                feds.append(benchlib.timed_simulation(config(args, out, f"f{i}")))
            feds[-1]["peak_memory_gib"] = mem.peak / 2**30
            cen.append(centralized(config(args, out, f"c{i + 1}"), args.cpus))
    later = slice(1, None)
    c_later = benchlib.median([sum(c[later]) for c in cen])
    f_later = benchlib.median([sum(f["round_seconds"][later]) for f in feds])
    c_all = benchlib.median([sum(c) for c in cen])
    f_all = benchlib.median([sum(f["round_seconds"]) for f in feds])
    ray_s = benchlib.median([f["ray_start_seconds"] or 0.0 for f in feds])
    loads = benchlib.median([sum(f["round_startup_seconds"]) for f in feds])
    rows = [
        benchlib.row("centralized: rounds 2+ (same samples and steps)", c_later, "s"),
        benchlib.row("federation: rounds 2+", f_later, "s"),
        benchlib.row(
            "federation / centralized, rounds 2+",
            f_later / c_later,
            "x",
            "<= 1.10",
            f_later / c_later <= 1.10,
        ),
        benchlib.row(
            "federation / centralized, all rounds (round 1 holds the start-up)", f_all / c_all, "x"
        ),
        benchlib.row("Ray start-up (apart, before round 1)", ray_s, "s"),
        benchlib.row("worker cold start: model + data loads (inside round 1)", loads, "s"),
        benchlib.row(
            "round 1: federation / centralized",
            f"{feds[0]['round_seconds'][0]:.1f} / {cen[0][0]:.1f}",
            "s",
        ),
    ]
    cfg = config(args, Path("."), "x")
    details = {
        "centralized_seconds": cen,
        "federations": feds,
        "clients": cfg.data.num_clients,
        "rounds": cfg.federation.rounds,
        "local_epochs": cfg.train.local_epochs,
        "max_examples": cfg.data.max_examples,
        "cpus_each_side": args.cpus,
        "ray_num_cpus": cfg.simulation.num_cpus,
        "cpus_per_client": cfg.simulation.cpus_per_client,
        "torch_threads": cfg.train.num_threads,
    }
    benchlib.write_result("federation_overhead", rows, details, args.out)


if __name__ == "__main__":
    main()
