"""GPU suite (issue 15): every figure of the GPU goals table in one run, each stage time-limited.

    python benchmarks/gpu_suite.py --device cuda --out DIR [--minilm FOLDER] [--quick]

Stages (each in its own process, so one that runs out of time or memory cannot take the others
with it; each writes ``DIR/stage-<name>.json`` and ``DIR/stage-<name>.log`` as it ends, and
``DIR/gpu.json`` is rewritten after every stage):

``lora_cls``
    MiniLM-shape LoRA classifier, privet's ``train`` at batch 512 (one micro-batch): no DP and DP
    with flat, ghost and book-keeping clipping; the same with the frozen base held in bf16.
``full_ft``
    MiniLM full fine-tuning at batch 512: no DP, book-keeping, ghost.
``llm``
    The SmolLM2-135M shape (Llama, random weights), LoRA r8 on q,v, per-token cross-entropy as the
    per-example loss through privet's DP pieces (``_make_private``, ghost and book-keeping
    clippers, Opacus's optimizers): fp32 at 16 x 256 and a bf16 base at 64 x 512; tokens/s and
    peak memory.
``federation``
    ``make demo``'s recipe with 200 clients x 3 rounds on the in-process engine: wall time, round
    time, accuracy, how many base models were built, peak GPU memory.
``llm_compile``
    The bf16 64 x 512 case with ``torch.compile``: the MLPs only (no DP, book-keeping; DP's
    hooks sit on the LoRA layers and must run eagerly) and whole blocks (no DP); compile time is
    left out. Every LLM figure says whether the step trained every LoRA weight.
``llm_quant``
    The SmolLM2-135M shape under DP (book-keeping) at 32 x 512, its frozen base held in fp32, in
    bf16, and quantized by ``model.base_quantization`` (int8, NF4; torchao, bf16 compute): tokens/s,
    peak memory and the weights' own size; then one DP step through privet's own path
    (``build_model`` with ``model.base_quantization``, ``train`` with ``privacy.clipping = 'auto'``,
    which must run book-keeping and move every LoRA weight). Needs CUDA: the CPU dry run reports it
    skipped.
``llm_profile``
    Where the fp32 causal LM's DP step spends its time (the 16 x 256 case of ``llm``, the one
    still above its 1.15x goal): ``torch.profiler`` over a few steps without DP and with
    book-keeping clipping, the book-keeping phases (per-example norms, clipped sums, optimizer)
    marked; the top operators by device and host time, kernel launches and host-device syncs per
    step. A table to read, not a figure with a goal.

On the CPU, ``--device cpu --quick`` runs every stage at toy sizes (the test suite does, so the
script cannot rot). Models are built from their configs; weights do not matter for timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import benchlib  # sets the offline environment before privet loads

#: name -> (seconds allowed on the GPU, seconds allowed for --quick)
STAGES: dict[str, tuple[int, int]] = {
    "lora_cls": (60, 240),
    "full_ft": (50, 240),
    "llm": (80, 300),
    "federation": (200, 400),
    "llm_compile": (70, 300),
    "llm_quant": (180, 60),
    "llm_profile": (60, 120),
}


class SkipStageError(Exception):
    """A stage that cannot run on this machine: reported with the reason, not as a failure."""


Rows = list[dict[str, Any]]


def parser() -> argparse.ArgumentParser:
    p = benchlib.parser(__doc__ or "")
    p.set_defaults(out=benchlib.RESULTS / "gpu")
    p.add_argument(
        "--stages", default=",".join(STAGES), help="comma-separated stages to run, in this order"
    )
    p.add_argument(
        "--minilm",
        default=None,
        help="MiniLM folder (config, tokenizer, weights; float16 weights are cast to float32 "
        "first); default: the embedded package",
    )
    p.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="STAGE=SECONDS",
        help="override one stage's time limit",
    )
    p.add_argument("--clients", type=int, default=None, help="federation clients (default 200)")
    p.add_argument(
        "--gpus-per-client",
        type=float,
        default=0.0,
        help="federation: simulation.gpus_per_client (0: clients one after another; 0.5: two "
        "lanes per GPU, each with its own base model)",
    )
    p.add_argument(
        "--name",
        default="gpu",
        help="result file DIR/NAME.json (e.g. gpu-quant for a later run of one stage: "
        "report.py --gpu shows each gpu*.json as its own table)",
    )
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # run one stage (child)
    return p


# ----------------------------------------------------------------------------- timing helpers


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: Any) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def _time(fn: Callable[[], Any], device: Any, repeats: int, *, warmup: bool = True) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after one warm-up call, synchronised on the device."""
    if warmup:
        fn()
        _sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- data and models


def _minilm_source(args: argparse.Namespace) -> str:
    """A MiniLM folder from_pretrained can load in float32 (float16 weights are cast once)."""
    if args.minilm is None:
        return "embedded:all-MiniLM-L6-v2"
    src = Path(args.minilm)
    weights = src / "model.safetensors"
    dst = Path(tempfile.gettempdir()) / "privet-gpu-minilm"
    if not weights.is_file():
        return _random_weights(src, dst)
    from safetensors.torch import load_file, save_file

    done = dst / "model.safetensors"
    if done.is_file() and done.stat().st_mtime >= weights.stat().st_mtime:
        return str(dst)  # cast by an earlier stage of this run
    state = load_file(str(weights))
    if all(not t.is_floating_point() or t.dtype != _half() for t in state.values()):
        return str(src)
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    save_file(
        {k: t.float() if t.is_floating_point() else t for k, t in state.items()},
        str(dst / "model.safetensors"),
    )
    return str(dst)


def _random_weights(src: Path, dst: Path) -> str:
    """A folder like ``src`` (config and tokenizer only) with seeded random weights (timing only)."""
    import torch
    from transformers import AutoConfig, AutoModel

    if (dst / "model.safetensors").is_file():
        return str(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(str(src))).save_pretrained(str(dst))
    return str(dst)


def _half() -> Any:
    import torch

    return torch.float16


_WORDS = [
    *(
        [
            "the",
            "a",
            "film",
            "was",
            "great",
            "awful",
            "movie",
            "plot",
            "acting",
            "really",
            "not",
            "very",
            "good",
            "bad",
            "boring",
            "fun",
        ]
    ),
    *(
        [
            "loved",
            "hated",
            "story",
            "music",
            "scene",
            "end",
            "quite",
            "slow",
            "fast",
            "best",
            "worst",
            "ever",
            "seen",
            "book",
            "read",
        ]
    ),
]


def _synthetic_texts(n: int, words: int, seed: int) -> tuple[list[str], list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(_WORDS, size=words)) for _ in range(n)]
    labels = [int(x) for x in rng.integers(0, 2, size=n)]
    return texts, labels


def _vader_available() -> bool:
    from privet.common.data.vader import VADER_VERSION, _cache_is_valid, resolve_cache_dir

    # never a download here: the GPU machine has no network
    return _cache_is_valid(resolve_cache_dir() / f"vader-{VADER_VERSION}")


def _classifier_data(n: int, tokenizer: Any, max_length: int) -> tuple[Any, str]:
    """``n`` tokenized examples: VADER's first client when its cache is here, else synthetic text."""
    import numpy as np

    from privet.common.config import PrivetConfig
    from privet.common.data import Examples, TokenizedExamples, build_federated_data

    try:
        if not _vader_available():
            raise FileNotFoundError
        cfg = PrivetConfig()
        fed = build_federated_data(cfg.data.model_copy(update={"num_clients": 1}))
        train = fed.clients[0].train
        idx = np.arange(n) % len(train)
        return TokenizedExamples(train.subset(idx), tokenizer, max_length), "vader"
    except Exception:
        texts, labels = _synthetic_texts(n, 24, seed=0)
        return TokenizedExamples(Examples(texts, labels), tokenizer, max_length), "synthetic"


# ----------------------------------------------------------------------------- stages


def _classifier_stage(
    args: argparse.Namespace, *, method: str, variants: list[tuple[str, str, str | None]]
) -> tuple[Rows, dict[str, Any]]:
    """privet's ``train`` at one batch, each variant ``(label, base_dtype, clipping)``."""
    import torch

    from privet.client.training import DPSettings, train
    from privet.common.config import PrivetConfig
    from privet.common.modeling import build_model

    device = torch.device(args.device)
    quick = args.quick
    batch = 8 if quick else 512
    steps = 1 if quick else 4
    repeats = 1 if quick else 3
    cfg = PrivetConfig()
    source = _minilm_source(args)
    rows: Rows = []
    details: dict[str, Any] = {"batch": batch, "steps_per_call": steps, "repeats": repeats}
    times: dict[str, float] = {}
    models: dict[str, Any] = {}
    for label, base_dtype, clipping in variants:
        if base_dtype not in models:
            models.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            built = build_model(
                cfg.model.model_copy(
                    update={
                        "name": source,
                        "base_dtype": base_dtype,
                        "num_hidden_layers": 1 if quick else None,
                    }
                ),
                cfg.adapter.model_copy(update={"method": method}),
                num_labels=2,
                seed=0,
            )
            data, kind = _classifier_data(batch, built.tokenizer, cfg.model.max_length)
            details["data"] = kind
            models[base_dtype] = (built.model.to(device), data, int(built.tokenizer.pad_token_id))
        model, data, pad = models[base_dtype]
        tcfg = cfg.train.model_copy(
            update={
                "batch_size": batch,
                "local_epochs": float(steps),
                "physical_batch_size": batch,
            }
        )
        dp = None
        if clipping is not None:
            dp = DPSettings(
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                sample_rate=1.0,
                steps=steps,
                clipping=clipping,  # type: ignore[arg-type]
            )

        # autocast only where the label asks (privet never autocasts a DP step)
        autocast = "bf16" if label.endswith("autocast") else "off"

        def call(
            model: Any = model,
            data: Any = data,
            pad: int = pad,
            dp: Any = dp,
            tcfg: Any = tcfg,
            autocast: str = autocast,
        ) -> None:
            res = train(
                model,
                data,
                tcfg,
                dp=dp,
                pad_token_id=pad,
                device=device,
                mixed_precision=autocast,
            )
            assert res.examples_seen == steps * batch

        _reset_peak(device)
        try:
            secs = benchlib.median(_time(call, device, repeats, warmup=not quick)) / steps
        except Exception as exc:  # one variant failing (memory) must not hide the others
            details[label] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            rows.append(benchlib.row(f"{label}: failed", type(exc).__name__))
            continue
        times[label] = secs
        details[label] = {"seconds_per_step": secs, "peak_gib": _peak_gib(device)}
        rows.append(benchlib.row(f"{label}: step", secs * 1000, "ms"))
        rows.append(benchlib.row(f"{label}: examples/s", batch / secs, "ex/s"))
    return rows, {**details, "times": times}


def _ratio_rows(
    prefix: str, times: dict[str, float], pairs: list[tuple[str, str, float | None]]
) -> Rows:
    rows: Rows = []
    for num, den, goal in pairs:
        if num in times and den in times:
            r = times[num] / times[den]
            rows.append(
                benchlib.row(
                    f"{prefix}{num} / {den}",
                    r,
                    "x",
                    f"<= {goal}" if goal else "",
                    (r <= goal) if goal else None,
                )
            )
    return rows


def stage_lora_cls(args: argparse.Namespace) -> tuple[Rows, dict[str, Any]]:
    variants = [
        ("LoRA fp32 no DP", "float32", None),
        ("LoRA fp32 no DP bf16 autocast", "float32", None),
        ("LoRA fp32 DP flat", "float32", "flat"),
        ("LoRA fp32 DP ghost", "float32", "ghost"),
        ("LoRA fp32 DP bookkeeping", "float32", "bookkeeping"),
        ("LoRA bf16-base no DP", "bfloat16", None),
        ("LoRA bf16-base DP flat", "bfloat16", "flat"),
        ("LoRA bf16-base DP bookkeeping", "bfloat16", "bookkeeping"),
    ]
    if args.quick:  # the dry run: every code path once, not every combination
        variants = [v for v in variants if v[1] == "float32" or v[2] in (None, "bookkeeping")]
    rows, details = _classifier_stage(args, method="lora", variants=variants)
    t = details["times"]
    rows += _ratio_rows(
        "classifier batch 512: ",
        t,
        [
            ("LoRA fp32 no DP bf16 autocast", "LoRA fp32 no DP", None),
            ("LoRA fp32 DP flat", "LoRA fp32 no DP", 1.15),
            ("LoRA fp32 DP ghost", "LoRA fp32 no DP", 1.15),
            ("LoRA fp32 DP bookkeeping", "LoRA fp32 no DP", 1.15),
            ("LoRA bf16-base DP flat", "LoRA bf16-base no DP", 1.15),
            ("LoRA bf16-base DP bookkeeping", "LoRA bf16-base no DP", 1.15),
            ("LoRA bf16-base DP bookkeeping", "LoRA fp32 no DP", None),
        ],
    )
    return rows, details


def stage_full_ft(args: argparse.Namespace) -> tuple[Rows, dict[str, Any]]:
    variants = [
        ("full FT no DP", "float32", None),
        ("full FT DP bookkeeping", "float32", "bookkeeping"),
        ("full FT DP ghost", "float32", "ghost"),
    ]
    rows, details = _classifier_stage(args, method="full", variants=variants)
    rows += _ratio_rows(
        "classifier batch 512: ",
        details["times"],
        [
            ("full FT DP bookkeeping", "full FT no DP", 1.3),
            ("full FT DP ghost", "full FT no DP", 1.3),
        ],
    )
    return rows, details


def _smol_shape(*, quick: bool) -> Any:
    """SmolLM2-135M's shape (random weights are timed; ../shared/GPU.md), or a tiny one for --quick."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=1024 if quick else 49152,
        hidden_size=64 if quick else 576,
        intermediate_size=128 if quick else 1536,
        num_hidden_layers=2 if quick else 30,
        num_attention_heads=4 if quick else 9,
        num_key_value_heads=2 if quick else 3,
        tie_word_embeddings=True,
    )


def _llama(args: argparse.Namespace, base_dtype: str) -> Any:
    """The SmolLM2-135M shape with random weights and LoRA r8 (A frozen) on q and v.

    ``base_dtype`` may name a quantization after a ``+`` (``bfloat16+nf4``): the frozen linear
    weights are then stored as ``model.base_quantization`` would store them.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from privet.common.modeling import hold_base_in, quantize_base

    base_dtype, _, quant = base_dtype.partition("+")

    cfg = _smol_shape(quick=args.quick)
    device = torch.device(args.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with device:  # initialise on the device: a CPU init of 135M weights takes seconds
            model = LlamaForCausalLM(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, lora)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_B" in name)
    if base_dtype != "float32":
        hold_base_in(model, getattr(torch, base_dtype))
    model.to(device)
    if quant:
        quantize_base(model, quant)
    model.train()
    return model, cfg.vocab_size


def _per_token_loss(net: Any, ids: Any) -> Any:
    """Per-example mean cross-entropy of next-token prediction (in float32)."""
    import torch

    logits = net(input_ids=ids).logits
    b, t, v = logits.shape
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, v), ids[:, 1:].reshape(-1), reduction="none"
    )
    return ce.view(b, t - 1).mean(dim=1)


@contextlib.contextmanager
def _llm_step(model: Any, ids: Any, clipping: str | None) -> Iterator[Callable[[], None]]:
    """One optimizer step of the causal LM, without DP or with privet's DP pieces."""
    import torch
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    from privet.client.bookkeeping import BookKeepingClipper
    from privet.client.training import DPSettings, _GhostClipping, _make_private, release_private

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    if clipping is None:

        def plain() -> None:
            _per_token_loss(model, ids).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        yield plain
        return
    dp = DPSettings(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=1.0,
        steps=1,
        clipping=clipping,  # type: ignore[arg-type]
    )
    net, dp_opt = _make_private(model, opt, dp, n=ids.shape[0], device=ids.device, seed=0)
    clipper: Any = None
    if isinstance(net, GradSampleModuleFastGradientClipping):
        clipper = _GhostClipping(net)
    elif clipping == "bookkeeping":
        clipper = BookKeepingClipper(net, max_grad_norm=dp_opt.max_grad_norm)

    def private() -> None:
        if clipper is not None:
            clipper.start_microbatch()
            clipper.backward(_per_token_loss(net, ids))
        else:
            _per_token_loss(net, ids).mean().backward()
        dp_opt.step()
        dp_opt.zero_grad(set_to_none=True)

    try:
        yield private
    finally:
        if clipper is not None:
            clipper.close()
        release_private(net, params)


def _compile(model: Any, what: str, device: Any) -> None:
    """``torch.compile`` the decoder blocks (``layers``) or only their LoRA-free MLPs (``mlp``).

    DP's hooks sit on the LoRA layers: inside a compiled block they do not run (book-keeping then
    refuses to train, fail-closed), so under DP only the MLPs are compiled. On the CPU (the dry
    run) only the tracing is checked: inductor's C++ build takes minutes there.
    """
    import torch

    for name in ("recompile_limit", "cache_size_limit"):  # 30 blocks, one graph each
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    backend = "inductor" if device.type == "cuda" else "eager"
    for layer in model.base_model.model.model.layers:
        if what == "layers":
            layer.compile(backend=backend)
        else:
            layer.mlp.compile(backend=backend)


def _llm_cases(
    args: argparse.Namespace, cases: list[tuple[str, str, int, int, str | None, str | None]]
) -> tuple[Rows, dict[str, Any]]:
    """Each case ``(label, base_dtype, batch, tokens, clipping, compiled)``: tokens/s, peak memory.

    ``compiled``: ``None``, ``"layers"`` or ``"mlp"`` (see :func:`_compile`).
    """
    import torch

    from privet.common.modeling import stored_bytes

    device = torch.device(args.device)
    repeats = 1 if args.quick else 3
    rows: Rows = []
    details: dict[str, Any] = {}
    times: dict[str, float] = {}
    built: dict[tuple[str, str | None], Any] = {}
    for label, base_dtype, batch, tokens, clipping, compiled in cases:
        if args.quick:
            batch, tokens = min(batch, 2), min(tokens, 16)
        key = (base_dtype, compiled)
        if key not in built:
            built.clear()
            _reset_peak(device)
            model, vocab = _llama(args, base_dtype)
            if compiled:
                _compile(model, compiled, device)
            built[key] = (model, vocab)
        model, vocab = built[key]
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, vocab, (batch, tokens), generator=gen).to(device)
        entry: dict[str, Any] = {"batch": batch, "tokens": tokens, "base_dtype": base_dtype}
        entry["weights_mib"] = round(stored_bytes(model) / 2**20, 1)
        try:
            with _llm_step(model, ids, clipping) as step:
                before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
                t_first = time.perf_counter()
                step()  # first call: compilation, autotuning, allocator growth
                _sync(device)
                entry["first_step_s"] = round(time.perf_counter() - t_first, 2)
                after = [p.detach() for p in model.parameters() if p.requires_grad]
                # a figure counts only if the step trained every LoRA weight
                entry["all_weights_moved"] = all(
                    not torch.equal(a, b) for a, b in zip(before, after, strict=True)
                )
                del before, after
                _reset_peak(device)
                secs = benchlib.median(_time(step, device, repeats, warmup=not args.quick))
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            details[label] = entry
            rows.append(benchlib.row(f"{label}: failed", type(exc).__name__))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        tps = batch * tokens / secs
        entry |= {"seconds_per_step": secs, "tokens_per_s": tps, "peak_gib": _peak_gib(device)}
        details[label] = entry
        times[label] = secs
        goal = ">= 100,000" if clipping and base_dtype == "bfloat16" else ""
        ok = entry["all_weights_moved"]
        rows.append(
            benchlib.row(
                f"{label}: tokens/s" + ("" if ok else " (NOT every weight trained: invalid)"),
                tps,
                "tok/s",
                goal,
                (ok and tps >= 100_000) if goal else None,
            )
        )
        if entry["peak_gib"] is not None:
            rows.append(benchlib.row(f"{label}: peak memory", entry["peak_gib"], "GiB"))
    return rows, {**details, "times": times}


def stage_llm(args: argparse.Namespace) -> tuple[Rows, dict[str, Any]]:
    small = "135M LoRA fp32 16x256"
    big = "135M LoRA bf16-base 64x512"
    cases = [
        (f"{small} no DP", "float32", 16, 256, None, None),
        (f"{small} DP flat", "float32", 16, 256, "flat", None),
        (f"{small} DP ghost", "float32", 16, 256, "ghost", None),
        (f"{small} DP bookkeeping", "float32", 16, 256, "bookkeeping", None),
        (f"{big} no DP", "bfloat16", 64, 512, None, None),
        (f"{big} DP bookkeeping", "bfloat16", 64, 512, "bookkeeping", None),
        (f"{big} DP flat", "bfloat16", 64, 512, "flat", None),
    ]
    if args.quick:  # the dry run: every code path once, not every combination
        cases = [c for c in cases if c[1] == "float32" or c[4] in (None, "bookkeeping")]
    rows, details = _llm_cases(args, cases)
    t = details["times"]
    rows += _ratio_rows(
        "",
        t,
        [(f"{small} DP {c}", f"{small} no DP", 1.15) for c in ("flat", "ghost", "bookkeeping")]
        + [(f"{big} DP {c}", f"{big} no DP", 1.15) for c in ("flat", "bookkeeping")],
    )
    return rows, details


def stage_llm_compile(args: argparse.Namespace) -> tuple[Rows, dict[str, Any]]:
    big = "135M LoRA bf16-base 64x512"
    cases = [
        (f"{big} MLPs compiled no DP", "bfloat16", 64, 512, None, "mlp"),
        (f"{big} MLPs compiled DP bookkeeping", "bfloat16", 64, 512, "bookkeeping", "mlp"),
        (f"{big} blocks compiled no DP", "bfloat16", 64, 512, None, "layers"),
    ]
    rows, details = _llm_cases(args, cases)
    rows += _ratio_rows(
        "",
        details["times"],
        [
            (f"{big} MLPs compiled DP bookkeeping", f"{big} MLPs compiled no DP", 1.15),
            (f"{big} MLPs compiled DP bookkeeping", f"{big} blocks compiled no DP", None),
        ],
    )
    return rows, details


def stage_llm_quant(args: argparse.Namespace) -> tuple[Rows, dict[str, Any]]:
    """DP (book-keeping) on the 135M shape: fp32, bf16, int8 and NF4 bases side by side."""
    import torch

    if torch.device(args.device).type != "cuda":
        raise SkipStageError(
            "needs CUDA: model.base_quantization is refused on a CPU (tests/test_base_quantization.py "
            "runs the quantized path there)"
        )
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise SkipStageError(
            "torchao is not installed (carry its wheel, benchmarks/gpu_run.sh)"
        ) from None
    shape = "135M LoRA 32x512 DP bookkeeping"
    cases = [
        (f"{shape}, fp32 base", "float32", 32, 512, "bookkeeping", None),
        (f"{shape}, bf16 base", "bfloat16", 32, 512, "bookkeeping", None),
        (f"{shape}, int8 base", "bfloat16+int8", 32, 512, "bookkeeping", None),
        (f"{shape}, nf4 base", "bfloat16+nf4", 32, 512, "bookkeeping", None),
        ("135M LoRA 32x512 no DP, nf4 base", "bfloat16+nf4", 32, 512, None, None),
    ]
    rows, details = _llm_cases(args, cases)
    for q in ("int8", "nf4"):
        # the path a run takes: model.base_quantization through build_model, train() with 'auto'
        check = _privet_quant_step(args, q)
        details[f"privet path {q}"] = check
        ok = check.get("clipping") == "bookkeeping" and check.get("all_weights_moved") is True
        rows.append(
            benchlib.row(
                f"build_model + train, {q} base, clipping 'auto'",
                check.get("clipping", check.get("error", "?")),
                "",
                "bookkeeping, every LoRA weight trained",
                ok,
            )
        )
    for label, *_ in cases:
        mib = details.get(label, {}).get("weights_mib")
        if mib is not None:
            rows.append(benchlib.row(f"{label}: weights", mib, "MiB"))
    rows += _ratio_rows(
        "",
        details["times"],
        [(f"{shape}, {q} base", f"{shape}, bf16 base", None) for q in ("fp32", "int8", "nf4")]
        + [(f"{shape}, nf4 base", "135M LoRA 32x512 no DP, nf4 base", None)],
    )
    return rows, details


def stage_llm_profile(args: argparse.Namespace) -> tuple[Rows, dict[str, Any]]:
    """``torch.profiler`` tables of the fp32 16 x 256 step, without DP and with book-keeping."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from privet.client import bookkeeping

    device = torch.device(args.device)
    batch, tokens = (2, 16) if args.quick else (16, 256)
    steps = 1 if args.quick else 5
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # Mark book-keeping's own work (patched here, so the training code carries no profiler calls).
    originals = {n: getattr(bookkeeping, n) for n in ("_norm_sq", "_add_clipped_sum")}

    def marked(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any, **k: Any) -> Any:
            with record_function(f"bookkeeping{name}"):
                return fn(*a, **k)

        return run

    model, vocab = _llama(args, "float32")
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    rows: Rows = []
    details: dict[str, Any] = {"batch": batch, "tokens": tokens, "steps": steps}
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        for name, fn in originals.items():
            setattr(bookkeeping, name, marked(name, fn))
        for label, clipping in (("no DP", None), ("DP bookkeeping", "bookkeeping")):
            with _llm_step(model, ids, clipping) as step:
                step()  # warm-up: allocator growth, lazy initialisation
                _sync(device)
                with profile(activities=activities) as prof:
                    for _ in range(steps):
                        with record_function("step"):
                            step()
                    _sync(device)
            events = prof.key_averages()
            table = events.table(sort_by=sort, row_limit=25, max_name_column_width=60)
            (args.out / f"profile-{label.replace(' ', '-')}.txt").write_text(table + "\n")
            launches = sum(
                e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel")
            )
            syncs = sum(
                e.count
                for e in events
                if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync")
            )
            marks = [e for e in events if e.key == "step" or e.key.startswith("bookkeeping")]
            phases = {e.key: round(e.cpu_time_total / 1e3 / steps, 3) for e in marks}
            # on CUDA a mark's device time is that of the kernels launched inside it
            device_phases = {
                e.key: round(getattr(e, "device_time_total", 0.0) / 1e3 / steps, 3) for e in marks
            }
            top = [
                {
                    "op": e.key,
                    "calls_per_step": e.count / steps,
                    "self_device_ms_per_step": round(
                        getattr(e, "self_device_time_total", 0.0) / 1e3 / steps, 3
                    ),
                    "self_host_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
                }
                for e in sorted(events, key=lambda e: getattr(e, sort), reverse=True)[:15]
            ]
            details[label] = {
                "kernel_launches_per_step": launches / steps,
                "syncs_per_step": syncs / steps,
                "host_ms_per_step_by_phase": phases,
                "device_ms_per_step_by_phase": device_phases,
                "top_ops": top,
            }
            rows.append(benchlib.row(f"{label}: host ms per step", phases.get("step"), "ms"))
            if device.type == "cuda":
                rows.append(
                    benchlib.row(f"{label}: device ms per step", device_phases.get("step"), "ms")
                )
            rows.append(benchlib.row(f"{label}: kernel launches per step", launches / steps))
            rows.append(benchlib.row(f"{label}: host-device syncs per step", syncs / steps))
            for phase in ("bookkeeping_norm_sq", "bookkeeping_add_clipped_sum"):
                if phase in phases:
                    rows.append(
                        benchlib.row(f"{label}: {phase} host ms per step", phases[phase], "ms")
                    )
    finally:
        for name, fn in originals.items():
            setattr(bookkeeping, name, fn)
    return rows, details


def _privet_quant_step(args: argparse.Namespace, quant: str) -> dict[str, Any]:
    """One DP round step through privet's own path: a SmolLM2-shape folder with random weights and
    the tests' tiny BPE tokenizer, ``model.base_quantization = quant`` (bf16 compute), ``train``
    with ``privacy.clipping = 'auto'``; what ran and whether every LoRA weight moved."""
    import torch
    from transformers import LlamaForCausalLM

    from privet.client import DPSettings, train
    from privet.common.config import AdapterConfig, ModelConfig, TrainConfig
    from privet.common.tasks import CausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.llm_fixtures import sentiment_examples, tiny_llama_dir

    folder = Path(tempfile.gettempdir()) / f"privet-gpu-smol-{int(args.quick)}"
    if not (folder / "model.safetensors").is_file():
        tok = Path(tiny_llama_dir())
        shape = _smol_shape(quick=args.quick)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            LlamaForCausalLM(shape).save_pretrained(folder)
        for f in tok.iterdir():
            if "token" in f.name or f.name.endswith(".jinja"):
                shutil.copy(f, folder / f.name)
    task = CausalLM()
    out: dict[str, Any] = {}
    try:
        cfg = ModelConfig(
            name=str(folder),
            task="causal_lm",
            max_length=64,
            device="auto",  # the stage runs only where that is CUDA
            base_dtype="bfloat16",
            base_quantization=quant,  # type: ignore[arg-type]
        )
        built = task.build_model(cfg, AdapterConfig(top_layers=None), seed=0)
        device = next(p for p in built.model.parameters() if p.requires_grad).device
        out["device"] = str(device)
        data = task.tokenize(sentiment_examples(16), built.tokenizer, max_length=64)
        start = {
            n: p.detach().cpu().clone()
            for n, p in built.model.named_parameters()
            if p.requires_grad
        }
        dp = DPSettings(
            noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0, steps=1, clipping="auto"
        )
        res = train(
            built.model,
            data,
            TrainConfig(batch_size=16),
            dp=dp,
            pad_token_id=int(built.tokenizer.pad_token_id),
            device=device,
            task=task,
        )
        out["clipping"] = res.clipping
        out["all_weights_moved"] = all(not torch.equal(start[n], res.state[n]) for n in start)
        out["train_loss"] = res.train_loss
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return out


def _synthetic_csv(folder: Path, n: int) -> Path:
    import csv

    texts, labels = _synthetic_texts(n, 16, seed=3)
    path = folder / "synthetic.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels, strict=True))
    return path


def stage_federation(args: argparse.Namespace) -> tuple[Rows, dict[str, Any]]:
    """The demo recipe with 200 clients x 3 rounds, in process; counts the base models built."""
    import torch

    from privet.common.config import PrivetConfig
    from privet.common.modeling import pick_device as device_of
    from privet.common.tasks import Classification
    from privet.simulations import simulate
    from privet.simulations.inprocess import engine_lanes

    clients = args.clients or (4 if args.quick else 200)
    # under --out: a stage cut short by its limit still brings back metrics.jsonl (round times)
    out = args.out / "federation"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data: dict[str, Any] = {"num_clients": clients}
    kind = "vader"
    if not _vader_available():
        kind = "synthetic"
        data |= {"source": "files", "train_files": [_synthetic_csv(out, 20 * clients)]}
    if args.quick:
        data |= {"max_examples": 40 * clients} if kind == "vader" else {}
    overrides: dict[str, Any] = {
        "model": {"name": _minilm_source(args), "device": args.device}
        | ({"num_hidden_layers": 1} if args.quick else {}),
        "data": data,
        "simulation": {
            "engine": "inprocess",
            "output_dir": str(out),
            "run_name": "fed",
            "gpus_per_client": args.gpus_per_client,
        },
    }
    cfg = PrivetConfig.model_validate(overrides)
    counts = {"total": 0}
    lanes = engine_lanes(cfg) or [str(device_of(cfg.model.device))]

    # Every base model is built through the task: the clients' and the server's (in process they
    # share one per lane, common/model_pool.py).
    build = Classification.build_model

    def counting(self: Any, *a: Any, **k: Any) -> Any:
        counts["total"] += 1
        return build(self, *a, **k)

    Classification.build_model = counting  # type: ignore[method-assign]
    device = torch.device(args.device)
    _reset_peak(device)
    t0 = time.perf_counter()
    run_dir = simulate(cfg, observer=None)
    wall = time.perf_counter() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    last = lines[-1] if lines else {}
    acc = last.get("server_accuracy", last.get("accuracy"))
    rows = [
        benchlib.row(
            f"{clients} clients x {cfg.federation.rounds} rounds in process: wall",
            wall,
            "s",
            "< 120",
            wall < 120,
        ),
        benchlib.row(
            "federation: base models built (clients and server)",
            counts["total"],
            "",
            f"{len(lanes)} (one per lane)",
            counts["total"] == len(lanes),
        ),
        benchlib.row("federation: rounds only (no start-up)", summary.get("seconds"), "s"),
        benchlib.row("federation: final server accuracy", acc),
    ]
    peak = _peak_gib(device)
    if peak is not None:
        rows.append(benchlib.row("federation: peak GPU memory", peak, "GiB"))
    details = {
        "data": kind,
        "wall_s": wall,
        "summary": summary,
        "last_metrics": last,
        "models_built": counts,
        "lanes": lanes,
    }
    return rows, details


STAGE_FUNCS: dict[str, Callable[[argparse.Namespace], tuple[Rows, dict[str, Any]]]] = {
    "lora_cls": stage_lora_cls,
    "full_ft": stage_full_ft,
    "llm": stage_llm,
    "llm_compile": stage_llm_compile,
    "federation": stage_federation,
    "llm_quant": stage_llm_quant,
    "llm_profile": stage_llm_profile,
}


# ----------------------------------------------------------------------------- driver


def _run_one_stage(args: argparse.Namespace) -> None:
    """Child process: run ``args.stage`` and write ``stage-<name>.json``."""
    import torch

    name = args.stage
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu":
        torch.set_num_threads(2)
    t0 = time.perf_counter()
    try:
        rows, details = STAGE_FUNCS[name](args)
        status = "ok"
    except SkipStageError as why:
        rows, details, status = [benchlib.row(f"{name}: skipped", str(why))], {}, "skipped"
        details["skipped"] = str(why)
    except Exception:
        traceback.print_exc()
        rows, details, status = [benchlib.row(f"{name}: failed", "see the log")], {}, "failed"
        details["traceback"] = traceback.format_exc()[-4000:]
    doc = {
        "stage": name,
        "status": status,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
        "details": details,
    }
    (args.out / f"stage-{name}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    if status != "ok":
        raise SystemExit(1)


def _limits(args: argparse.Namespace) -> dict[str, int]:
    limits = {k: (q if args.quick else g) for k, (g, q) in STAGES.items()}
    for item in args.limit:
        name, _, secs = item.partition("=")
        if name not in STAGES or not secs.isdigit():
            raise SystemExit(f"--limit {item!r}: use STAGE=SECONDS with a stage of {list(STAGES)}")
        limits[name] = int(secs)
    return limits


def main() -> None:
    args = parser().parse_args()
    benchlib.check_device(args)
    if args.stage is not None:
        _run_one_stage(args)
        return
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"--stages: unknown {unknown}; choose from {list(STAGES)}")
    limits = _limits(args)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: Rows = []
    details: dict[str, Any] = {"stages": {}}
    child = [sys.executable, str(Path(__file__).resolve()), "--device", args.device]
    child += ["--out", str(args.out)] + (["--quick"] if args.quick else [])
    child += ["--minilm", args.minilm] if args.minilm else []
    child += ["--clients", str(args.clients)] if args.clients else []
    child += ["--gpus-per-client", str(args.gpus_per_client)]
    for name in stages:
        log = args.out / f"stage-{name}.log"
        t0 = time.perf_counter()
        print(f"== {name} (limit {limits[name]} s)", flush=True)
        with log.open("w") as fh:
            proc = subprocess.Popen(
                [*child, "--stage", name],
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                rc: int | str = proc.wait(timeout=limits[name])
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the stage and anything it started
                proc.wait()
                rc = "timed out"
        secs = round(time.perf_counter() - t0, 1)
        result = args.out / f"stage-{name}.json"
        if result.is_file():
            doc = json.loads(result.read_text())
            rows += doc["rows"]
            details["stages"][name] = {"status": doc["status"], "seconds": secs, "rc": rc}
            details[name] = doc["details"]
        else:
            rows.append(
                benchlib.row(f"{name}: no result", f"{rc} after {secs} s (limit {limits[name]} s)")
            )
            details["stages"][name] = {"status": str(rc), "seconds": secs}
        print(f"   {name}: {details['stages'][name]['status']} in {secs} s", flush=True)
        # rewritten after every stage: a run cut short still leaves what it measured
        benchlib.write_result(args.name, rows, details, args.out)


if __name__ == "__main__":
    main()
