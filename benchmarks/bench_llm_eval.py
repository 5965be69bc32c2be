"""Exact-match evaluation of the sentiment preset: one pass per chat vs one pass per choice row.

The chats are the server test set of ``examples/llm_sentiment.toml`` (VADER sentences as
instructions, ``negative``/``positive`` answers) on the embedded SmolLM2-135M-Instruct, all 30
layers, ``model.max_length`` as the preset sets it. Two ways to score the same chats, timed
alternately (``benchlib.interleaved``) so a shared machine's load falls on both:

- ``per-choice``: what evaluation did before (re-implemented here, micro-batches included): the
  loss pass over each chat, then a full pass over every choice row that is not the chat's own
  row (its prompt again, then the other answer);
- ``cached``: what ``CausalLM.evaluate`` does now (``CausalLM.choice_losses``): the loss pass,
  and each other answer continued from the pass's key/value cache (a few tokens per chat), in
  micro-batches bounded by the logits it keeps rather than by the rows' length.

Both give the same choice sums (printed: the largest difference) and the same exact match.

    python benchmarks/bench_llm_eval.py [--examples 100] [--repeats 1]
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import torch

from privet.common.config import load_config
from privet.common.data import cached_federated_data, collate_generation, length_sorted_microbatches
from privet.common.tasks import CausalLM, _next_token, _Rows

PRESET = benchlib.ROOT / "examples" / "llm_sentiment.toml"


def full_passes(model: torch.nn.Module, rows: _Rows, pad: int) -> np.ndarray:
    """Summed target cross-entropy of each row, one whole row each, as evaluation did before.

    Micro-batches as before, too: bounded by ``rows x longest row x vocabulary`` logits.
    """
    out = np.zeros(len(rows))
    vocab = int(model.config.vocab_size)  # type: ignore[union-attr]
    size = max(1, min(32, (1 << 25) // (int(rows.lengths.max()) * vocab)))
    for mb in length_sorted_microbatches(np.arange(len(rows)), rows.lengths, size):
        batch = collate_generation([rows[int(i)] for i in mb], pad)
        labels = batch.pop("labels").index_select(1, batch["logits_to_keep"])
        ce, _, _ = _next_token(model(**batch).logits, labels)
        out[mb] = ce.sum(dim=1).double().numpy()
    return out


def per_choice(model: torch.nn.Module, data: Any, pad: int) -> np.ndarray:
    """Choice sums the old way: the loss pass, then a full pass per other choice row."""
    rows = _Rows(list(data.input_ids), list(data.labels))
    ce = full_passes(model, rows, pad)
    scores = []
    for choice in data.choices:
        score = ce.copy()
        todo = [i for i in range(len(rows)) if choice[i] != rows[i]]
        if todo:
            other = _Rows([choice.input_ids[i] for i in todo], [choice.labels[i] for i in todo])
            score[todo] = full_passes(model, other, pad)
        scores.append(score)
    return np.stack(scores)


def main() -> None:
    p = benchlib.parser(__doc__ or "")
    p.add_argument("--examples", type=int, default=100, help="chats to score")
    args = p.parse_args()
    cfg = load_config(PRESET, [])
    task = CausalLM()
    chats = cached_federated_data(cfg.data).server_test
    chats = chats.subset(np.arange(min(args.examples, len(chats))))
    built = task.build_model(cfg.model, cfg.adapter, seed=0)
    model = built.model.eval()
    pad = int(built.tokenizer.pad_token_id)
    data = task.tokenize(chats, built.tokenizer, max_length=cfg.model.max_length)
    out: dict[str, np.ndarray] = {}

    def timed(name: str) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            if name == "per-choice":
                out[name] = per_choice(model, data, pad)
            else:
                out[name] = task.choice_losses(
                    model, data, batch_size=32, pad_token_id=pad, mixed_precision="off"
                )
        return time.perf_counter() - start

    loads = [os.getloadavg()[0]]
    times = benchlib.interleaved(
        {name: lambda name=name: timed(name) for name in ("per-choice", "cached")},
        args.repeats or 1,
        warmup=False,
    )
    loads.append(os.getloadavg()[0])
    before, after = benchlib.median(times["per-choice"]), benchlib.median(times["cached"])
    same = bool((out["per-choice"].argmin(0) == out["cached"].argmin(0)).all())
    print(
        f"{len(data)} chats, max_length {cfg.model.max_length}, {torch.get_num_threads()} "
        f"threads, 1-min load {loads[0]:.2f} -> {loads[1]:.2f}\n"
        f"per-choice {before:.1f} s, cached {after:.1f} s: {before / after:.2f}x; "
        f"largest choice-sum difference {np.abs(out['per-choice'] - out['cached']).max():.2e}, "
        f"same picks: {same}\n"
        f"each run (s): per-choice {[round(t, 1) for t in times['per-choice']]}, "
        f"cached {[round(t, 1) for t in times['cached']]}"
    )
    print(f"command: {benchlib.command_line()}  ({Path.cwd()})")


if __name__ == "__main__":
    main()
