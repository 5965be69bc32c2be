"""How far can a top-layer adapter take the LLM sentiment preset? A study on cached features.

The CPU-sized sentiment preset (``examples/llm_sentiment.toml``) does not beat the base model's
zero-shot exact match. This script separates what the frozen model's features allow from what
the preset's training budget allows, at a small fraction of a real run's cost:

1. One forward pass per chat through the embedded SmolLM2-135M-Instruct (privet's own model
   loading, VADER instruction data and tokenization, at ``model.max_length``) keeps two vectors at
   the last prompt position: the top layer's input and its attention output (``o_proj``'s input).
   The answer token's logits depend on nothing else once the layers below are frozen.
2. A linear probe, L2-regularized logistic regression on the top layer's input: the accuracy a
   readout of the frozen features reaches without DP.
3. A federation of a LoRA adapter on ``o_proj`` or ``down_proj`` of the top layer, recomputed
   exactly at the answer position through the real top-layer modules, final norm and LM head, so
   tens of epochs cost minutes. Loss: cross-entropy of the answer token over the whole
   vocabulary, as privet's (the end token after it is left out), or over the answers only. With DP: per-example clipping
   and Gaussian noise with privet's noise calibration (``calibrate_noise``) for ε over all planned
   steps, Poisson sampling, Adam (or SGD with momentum) restarted each round, FedAvg of A and B.

This is a study tool, not privet's training path, which runs every layer for every chat; the
cache is exact only for an adapter on these top-layer modules. Results are in docs/llm.md.

    python benchmarks/llm_sentiment_ceiling.py --examples 9000
    python benchmarks/llm_sentiment_ceiling.py --examples 9000 --lora down --r 8 \
        --epochs 10 --no-dp
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import grad, vmap

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

from privet.common.config import load_config  # noqa: E402
from privet.common.data.examples import GenerationExamples  # noqa: E402
from privet.common.data.vader import VADER_ANSWERS, load_vader_instructions  # noqa: E402
from privet.common.downloads import resolve_cache_dir  # noqa: E402
from privet.common.modeling import build_model  # noqa: E402
from privet.common.privacy import calibrate_noise  # noqa: E402
from privet.common.tasks import CausalLM  # noqa: E402

PRESET = Path(__file__).resolve().parents[1] / "examples" / "llm_sentiment.toml"
WIDTH = {"o": (576, 576), "down": (1536, 576), "head": (576, 2)}  # (in, out) of what trains


def top_of(model: torch.nn.Module) -> Any:
    """The Llama decoder under PEFT's wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache(model: Any, tokenizer: Any, n: int, max_length: int) -> dict[str, np.ndarray]:
    """Top-layer input and attention output at each chat's last prompt position."""
    rows = load_vader_instructions()
    pick = np.random.default_rng(0).permutation(len(rows.targets))[:n]
    sub = GenerationExamples(
        targets=[rows.targets[i] for i in pick],
        prompts=[rows.prompts[i] for i in pick],
        keys={},
        answer_choices=rows.answer_choices,
    )
    data = CausalLM().tokenize(sub, tokenizer, max_length=max_length)
    prompts = []
    for i in range(n):
        ids, labels = data[i]
        prompts.append(ids[: next(j for j, t in enumerate(labels) if t != -100)])
    layer = top_of(model).model.layers[-1]
    seen: dict[str, torch.Tensor] = {}

    def keep_input(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    hooks = [
        layer.register_forward_pre_hook(keep_input, with_kwargs=True),
        layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, a: seen.update(a=a[0])),
    ]
    out = {k: np.zeros((n, 576), np.float32) for k in ("x", "a")}
    order = np.argsort([len(p) for p in prompts])
    start = time.time()
    with torch.no_grad():
        for k in range(0, n, 16):
            batch = order[k : k + 16]
            width = max(len(prompts[r]) for r in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, r in enumerate(batch):
                ids[j, : len(prompts[r])] = torch.tensor(prompts[r])
                mask[j, : len(prompts[r])] = 1
            model(input_ids=ids, attention_mask=mask)
            for j, r in enumerate(batch):
                for key in out:
                    out[key][r] = seen[key][j, len(prompts[r]) - 1].float().numpy()
            print(f"cached {min(k + 16, n)}/{n} chats, {time.time() - start:.0f} s", flush=True)
    for h in hooks:
        h.remove()
    label = np.array([VADER_ANSWERS.index(t.strip()) for t in sub.targets], dtype=np.int64)
    return {**out, "y": label}


def probe(x: torch.Tensor, y: torch.Tensor, n_test: int, l2: float) -> float:
    """Test accuracy of L2 logistic regression on standardized features (LBFGS)."""
    train, test = slice(n_test, None), slice(0, n_test)
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    z = (x - mu) / sd
    w = torch.zeros(z.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logit = z[train] @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y[train].float())
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        return float(((z[test] @ w + b > 0).long() == y[test]).float().mean())


def federate(
    model: Any, tokenizer: Any, feats: dict[str, torch.Tensor], a: argparse.Namespace
) -> None:
    """Federated LoRA on one top-layer projection, exact at the answer position."""
    base = top_of(model)
    layer, norm, head = base.model.layers[-1], base.model.norm, base.lm_head.weight.detach()
    for p in base.parameters():
        p.requires_grad_(False)
    answer = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in VADER_ANSWERS]
    x, att, y = feats["x"], feats["a"], feats["y"]
    target = torch.tensor(answer)[y]
    d_in, d_out = WIDTH[a.lora]
    gen = torch.Generator().manual_seed(a.seed)
    a0 = (torch.rand(a.r, d_in, generator=gen) * 2 - 1) / math.sqrt(d_in)  # PEFT-like A init
    scale = a.alpha / a.r
    mlp = layer.mlp

    if a.lora == "head":
        # The top layer is frozen too, so each chat's normed final state z is fixed: compute it
        # once, with the logits of the answers and the log-sum-exp of every other token.
        with torch.no_grad():
            h = x + layer.self_attn.o_proj(att)
            zz = layer.post_attention_layernorm(h)
            z_all = norm(h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(zz)) * mlp.up_proj(zz)))
            others = torch.ones(head.shape[0], dtype=torch.bool)
            others[answer] = False
            rest = torch.cat(
                [
                    torch.logsumexp(z_all[i : i + 500] @ head[others].T, 1)
                    for i in range(0, len(y), 500)
                ]
            )
            x, att = z_all, torch.cat([z_all @ head[answer].T, rest[:, None]], 1)
            if a.center == "train":
                # The readout trains on z - mean(z); the answers' base logits stay the model's.
                x = z_all - z_all[a.test :].mean(0)

    def logits(p: dict[str, torch.Tensor], xx: torch.Tensor, aa: torch.Tensor) -> torch.Tensor:
        if a.lora == "head":  # [answers' logits with the trained rows, the others' log-sum-exp]
            return torch.cat([aa[:, :2] + xx @ p["B"].T, aa[:, 2:]], 1)

        def delta(v: torch.Tensor) -> torch.Tensor:
            return (v @ p.get("A", a0).T) @ p["B"].T * scale

        h = xx + layer.self_attn.o_proj(aa) + (delta(aa) if a.lora == "o" else 0)
        z = layer.post_attention_layernorm(h)
        inner = mlp.act_fn(mlp.gate_proj(z)) * mlp.up_proj(z)
        out = h + mlp.down_proj(inner) + (delta(inner) if a.lora == "down" else 0)
        return torch.as_tensor(norm(out) @ head.T)

    def loss(
        p: dict[str, torch.Tensor], xx: torch.Tensor, aa: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        lg = logits(p, xx[None], aa[None])
        if a.lora == "head":  # the last column stands for every other token at once
            t2 = (t == answer[1]).long()[None]
            return torch.nn.functional.cross_entropy(lg if a.loss == "vocab" else lg[:, :2], t2)
        if a.loss == "choices":  # a verbaliser: softmax over the answers only
            return torch.nn.functional.cross_entropy(lg[:, answer], (t == answer[1]).long()[None])
        return torch.nn.functional.cross_entropy(lg, t[None])

    def accuracy(p: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            lg = logits(p, x[: a.test], att[: a.test])
            lg = lg[:, :2] if a.lora == "head" else lg[:, answer]
            return float((lg.argmax(1) == y[: a.test]).float().mean())

    params = {"B": torch.zeros(d_out, a.r)} | ({} if a.freeze_a else {"A": a0.clone()})
    if a.lora == "head":
        params = {"B": torch.zeros(2, d_in)}
    train_idx = torch.arange(a.test, len(y))
    per_client = len(train_idx) // a.clients
    q = a.batch_size / per_client
    steps = max(1, round(a.epochs / q))
    sigma = (
        calibrate_noise(
            target_epsilon=a.epsilon,
            delta=1e-5,
            sample_rate=q,
            steps=steps * a.rounds,
            accountant="rdp",
        )
        if a.dp
        else 0.0
    )
    per_example = vmap(grad(loss), in_dims=(None, 0, 0, 0))
    noise = torch.Generator().manual_seed(a.seed + 1)
    report = {
        "lora": a.lora,
        "loss": a.loss,
        "r": a.r,
        "weights": sum(v.numel() for v in params.values()),
    }
    report |= {"per_client": per_client, "steps_per_round": steps, "sigma": round(sigma, 4)}
    report |= {"center": a.center} if a.lora == "head" else {}
    accs = [accuracy(params)]
    for _ in range(a.rounds):
        replies = []
        for c in range(a.clients):
            mine = train_idx[c * per_client : (c + 1) * per_client]
            local = {k: v.clone().requires_grad_(True) for k, v in params.items()}
            feats, back = x, None
            if a.lora == "head" and a.center == "basis":
                # privet's adapter.readout_center: the client's direction u from its chats' unit
                # states plus noise, and the readout trained in the basis M = P + u u^T / s.
                unit = x[mine] / x[mine].norm(dim=1, keepdim=True)
                noisy = unit.sum(0) + (a.center_noise if a.dp else 0.0) * torch.randn(
                    x.shape[1], generator=noise
                )
                u = noisy / noisy.norm()
                d = x.shape[1]
                m = math.sqrt(
                    max(float(noisy.norm()) ** 2 - (a.center_noise**2 * d if a.dp else 0), 0)
                )
                m = min(m / len(mine), 0.999999)
                sc = a.center_scale or min(max(m / math.sqrt(1 - m * m), 1.0), 1e6)
                report["scale"] = round(sc, 3)
                feats = x + (x @ u)[:, None] * (1 / sc - 1) * u
                with torch.no_grad():
                    local["B"] += (sc - 1) * (local["B"] @ u)[:, None] * u

                def back(t: torch.Tensor, u: torch.Tensor = u, sc: float = sc) -> torch.Tensor:
                    return t + (1 / sc - 1) * (t @ u)[:, None] * u

            opt = (
                torch.optim.Adam(local.values(), lr=a.lr)
                if a.optimizer == "adam"
                else torch.optim.SGD(local.values(), lr=a.lr, momentum=0.9)
            )
            for _ in range(steps):
                batch = mine[torch.rand(len(mine), generator=noise) < q]
                total = {k: torch.zeros_like(v) for k, v in local.items()}
                if len(batch):
                    g = per_example(
                        {k: v.detach() for k, v in local.items()},
                        feats[batch],
                        att[batch],
                        target[batch],
                    )
                    norms = torch.sqrt(sum((g[k].flatten(1) ** 2).sum(1) for k in g))
                    f = (a.clip / (norms + 1e-6)).clamp(max=1.0) if a.dp else torch.ones_like(norms)
                    total = {k: (g[k] * f.view(-1, *[1] * (g[k].dim() - 1))).sum(0) for k in g}
                for k, v in local.items():
                    v.grad = (
                        total[k] + sigma * a.clip * torch.randn(v.shape, generator=noise)
                    ) / a.batch_size
                opt.step()
            reply = {k: v.detach() for k, v in local.items()}
            if back is not None:
                reply["B"] = back(reply["B"])
            replies.append(reply)
        params = {k: torch.stack([r[k] for r in replies]).mean(0) for k in params}
        accs.append(accuracy(params))
    print(json.dumps(report | {"dp": a.dp, "exact_match_by_round": [round(v, 4) for v in accs]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=3000, help="chats to cache (a seeded sample)")
    ap.add_argument(
        "--test", type=int, default=1000, help="the first N cached chats are the test set"
    )
    ap.add_argument(
        "--train",
        type=int,
        default=None,
        help="train on the N cached chats after the test set (default: all)",
    )
    ap.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="npz file, reused if it exists (default: sentiment-ceiling-N.npz in privet's cache dir)",
    )
    ap.add_argument("--lora", choices=sorted(WIDTH), default=None, help="also run a federation")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=8.0)
    ap.add_argument("--freeze-a", action="store_true", help="FFA-LoRA: train B only")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument(
        "--loss",
        choices=("vocab", "choices"),
        default="vocab",
        help="choices: over the answers only",
    )
    ap.add_argument(
        "--optimizer", choices=("adam", "sgd"), default="adam", help="sgd: momentum 0.9"
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=float, default=0.5, help="local epochs per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--dp", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument(
        "--center",
        choices=("none", "train", "basis"),
        default="none",
        help="--lora head only; train: the readout reads the final state minus the training "
        "chats' mean (what a DP estimate of the mean would give; not private as is)",
    )
    ap.add_argument(
        "--center-noise", type=float, default=10.0, help="--center basis: the direction's noise"
    )
    ap.add_argument(
        "--center-scale",
        type=float,
        default=0.0,
        help="--center basis: s of the basis (0: from the released sum, as privet does)",
    )
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(PRESET)
    built = build_model(cfg.model, cfg.adapter, num_labels=2, seed=0)
    model, tokenizer = built.model.eval(), built.tokenizer
    if a.cache is None:
        a.cache = resolve_cache_dir() / "studies" / f"sentiment-ceiling-{a.examples}.npz"
    if a.cache.exists():
        raw = dict(np.load(a.cache))
    else:
        raw = cache(model, tokenizer, a.examples, cfg.model.max_length)
        a.cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(a.cache, **raw)
    keep = len(raw["y"]) if a.train is None else a.test + a.train
    feats = {k: torch.from_numpy(v[:keep]) for k, v in raw.items()}
    if a.lora is None:
        for l2 in (1e-3, 1e-2, 3e-2):
            acc = probe(feats["x"], feats["y"], a.test, l2)
            print(
                json.dumps(
                    {
                        "probe": "top-layer input",
                        "l2": l2,
                        "train": len(feats["y"]) - a.test,
                        "test_accuracy": round(acc, 4),
                    }
                )
            )
    else:
        federate(model, tokenizer, feats, a)


if __name__ == "__main__":
    main()
