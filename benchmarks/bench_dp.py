"""DP overhead: privet's client training with DP-SGD over the same training without DP.

Both modes run :func:`privet.client.train` on exactly the same batches: a 64-example client with
a sampling rate of 1 (every Poisson batch is the whole client) against non-private full-batch
steps of 64, both cut into the same length-sorted micro-batches.  Variants are interleaved and the
median of the repeats is taken.  Goals (CPU): LoRA at most 1.1x, full fine-tuning (ghost
clipping, privet's one-pass book-keeping variant) at most 1.8x.

    python benchmarks/bench_dp.py [--device cuda] [--quick]
"""

from __future__ import annotations

import math
import time
from typing import Any

import benchlib  # sets the offline environment before privet loads
import numpy as np
import torch

from privet.client.training import DPSettings, train
from privet.common.config import PrivetConfig
from privet.common.data import TokenizedExamples, build_federated_data
from privet.common.modeling import build_model


def main() -> None:
    p = benchlib.parser(__doc__ or "")
    p.add_argument("--batch", type=int, default=64, help="examples per (logical) batch")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument(
        "--layers", type=int, default=None, help="cut the model to N layers (smoke tests)"
    )
    args = p.parse_args()
    benchlib.check_device(args)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 3)
    full_repeats = repeats
    cfg = PrivetConfig()
    fed = build_federated_data(cfg.data.model_copy(update={"num_clients": 1}))
    device = torch.device(args.device)

    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {"batch": args.batch, "repeats": repeats, "threads": args.threads}
    cases = [
        ("LoRA", "lora", ["flat"], 2 if args.quick else 3, 1.1, repeats),
        # book-keeping (privet's one-pass ghost clipping) carries the goal; Opacus's ghost and flat
        # paths are measured beside it.
        ("full fine-tuning", "full", ["bookkeeping", "ghost", "flat"], 1, 1.8, full_repeats),
    ]
    for label, method, clippings, steps, goal, reps in cases:
        built = build_model(
            cfg.model.model_copy(update={"device": args.device, "num_hidden_layers": args.layers}),
            cfg.adapter.model_copy(update={"method": method}),
            num_labels=fed.num_labels,
            seed=0,
        )
        model = built.model.to(device)
        data = TokenizedExamples(
            fed.clients[0].train.subset(np.arange(args.batch)),
            built.tokenizer,
            cfg.model.max_length,
        )
        pad = int(built.tokenizer.pad_token_id)
        tcfg = cfg.train.model_copy(update={"batch_size": args.batch, "local_epochs": float(steps)})

        cpu: dict[str, list[float]] = {"none": [], **{c: [] for c in clippings}}

        def run(
            clipping: str | None,
            tcfg: Any = tcfg,
            model: Any = model,
            data: Any = data,
            steps: int = steps,
            pad: int = pad,
            cpu: Any = cpu,
        ) -> float:
            dp = None
            if clipping is not None:
                dp = DPSettings(
                    noise_multiplier=1.0,
                    max_grad_norm=1.0,
                    sample_rate=1.0,
                    steps=steps,
                    clipping=clipping,  # type: ignore[arg-type]
                )
            cpu0 = time.process_time()
            res = train(
                model,
                data,
                tcfg,
                dp=dp,
                pad_token_id=pad,
                device=device,
                mixed_precision=args.mixed_precision,
            )
            cpu[clipping or "none"].append((time.process_time() - cpu0) / steps)
            assert res.examples_seen == steps * args.batch
            return res.seconds / steps

        variants = {"no DP": lambda run=run: run(None)}
        for c in clippings:
            variants[f"DP {c}"] = lambda run=run, c=c: run(c)
        times = benchlib.interleaved(variants, reps)
        base = benchlib.median(times["no DP"])
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        details[label] = {
            "trainable": trainable,
            "steps": steps,
            "seconds_per_step": times,
            "cpu_seconds_per_step": cpu,
        }
        rows.append(benchlib.row(f"{label}: step without DP", base, "s"))
        for c in clippings:
            ratio = benchlib.median(times[f"DP {c}"]) / base
            primary = c == clippings[0]
            rows.append(
                benchlib.row(
                    f"{label}: DP ({c} clipping) / no DP",
                    ratio,
                    "x",
                    f"<= {goal}" if primary else "",
                    (ratio <= goal) if primary else None,
                )
            )
            # CPU time of this process: steadier than wall time on a shared machine.
            cpu_ratio = benchlib.median(cpu[c][1:]) / benchlib.median(cpu["none"][1:])
            rows.append(benchlib.row(f"{label}: DP ({c}) / no DP, CPU time", cpu_ratio, "x"))
        del model, built
        assert math.isfinite(base)
    benchlib.write_result("dp_overhead", rows, details, args.out)


if __name__ == "__main__":
    main()
