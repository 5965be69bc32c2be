"""A frozen base stored quantized (torchao int8 / NF4) under fp32 LoRA adapters: refusals and the CPU path.

The quantized base is for CUDA and refused elsewhere; the tests below that train through it bypass
only that device refusal (``_quantized_base_refusal``), on a tiny Llama: torchao's int8 and NF4
weights dequantize with plain torch ops, so the same code runs on the CPU, slowly.
"""

from __future__ import annotations

import sys

import pytest
import torch

import privet.common.modeling as modeling
from privet.client import DPSettings, train
from privet.common.config import AdapterConfig, ModelConfig, PrivetConfig, TrainConfig
from privet.common.errors import ConfigError, PrivacyError
from privet.common.modeling import BuiltModel, frozen_fingerprint, stored_bytes
from privet.common.tasks import CausalLM

from .llm_fixtures import sentiment_examples, tiny_llama_dir

TASK = CausalLM()
NEEDS_CUDA = (
    "model.base_quantization = {q!r} needs a CUDA GPU (it saves GPU memory; on a CPU every "
    "product would dequantize the weights, slowly); on CPU use model.base_dtype = 'bfloat16' "
    "and model.base_quantization = 'none'"
)


def _validate(**sections: dict[str, object]) -> str:
    with pytest.raises(ValueError) as info:
        PrivetConfig.model_validate(sections)
    return str(info.value)


@pytest.mark.parametrize("q", ["int8", "nf4"])
def test_a_quantized_base_on_a_cpu_device_is_one_clear_config_error(q: str) -> None:
    msg = _validate(model={"base_quantization": q, "device": "cpu"})
    assert NEEDS_CUDA.format(q=q) in msg


def test_a_quantized_base_with_full_fine_tuning_is_refused() -> None:
    msg = _validate(model={"base_quantization": "nf4"}, adapter={"method": "full"})
    assert (
        "model.base_quantization = 'nf4' stores the frozen base quantized, and quantized weights "
        "cannot train, but adapter.method = 'full' trains the base; use adapter.method = 'lora' "
        "or model.base_quantization = 'none'"
    ) in msg


def test_ghost_clipping_over_a_bf16_quantized_base_is_refused() -> None:
    msg = _validate(
        model={"base_quantization": "int8", "base_dtype": "bfloat16"},
        privacy={"clipping": "ghost"},
    )
    assert "privacy.clipping = 'ghost' with model.base_dtype = 'bfloat16'" in msg


def test_unknown_quantization_is_refused() -> None:
    msg = _validate(model={"base_quantization": "int4"})
    assert "base_quantization" in msg and "'none', 'int8' or 'nf4'" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_building_a_quantized_base_without_cuda_is_refused_before_loading() -> None:
    cfg = ModelConfig(name="/no/such/folder", base_quantization="int8")  # device 'auto'
    with pytest.raises(ConfigError) as info:
        modeling.build_model(cfg, AdapterConfig(), num_labels=2)
    assert str(info.value) == NEEDS_CUDA.format(q="int8")


def test_a_missing_torchao_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(modeling, "_quantized_base_refusal", lambda cfg: None)
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    cfg = ModelConfig(name="/no/such/folder", base_quantization="nf4")
    with pytest.raises(ConfigError) as info:
        modeling.build_model(cfg, AdapterConfig(), num_labels=2)
    assert str(info.value) == (
        "model.base_quantization = 'nf4' needs the torchao package, which is not installed. "
        "Fix: pip install 'privet[gpu]' (or pip install torchao), or set "
        "model.base_quantization = 'none'"
    )


# --- the quantized path itself, on the CPU (device refusal bypassed) ------------------------------


def _built(monkeypatch: pytest.MonkeyPatch, q: str = "none", dtype: str = "float32") -> BuiltModel:
    pytest.importorskip("torchao", reason="torchao (pip install 'privet[gpu]') is not installed")
    monkeypatch.setattr(modeling, "_quantized_base_refusal", lambda cfg: None)
    cfg = ModelConfig(
        name=tiny_llama_dir(),
        task="causal_lm",
        max_length=48,
        base_quantization=q,  # type: ignore[arg-type]
        base_dtype=dtype,  # type: ignore[arg-type]
    )
    built = TASK.build_model(cfg, AdapterConfig(top_layers=None, freeze_a=False), seed=0)
    # LoRA's B starts at zero, which leaves A without gradient: move B so that both have one.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for n, p in built.model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return built


@pytest.mark.parametrize(("q", "kind"), [("int8", "Int8Tensor"), ("nf4", "NF4Tensor")])
def test_the_base_linears_are_quantized_and_the_adapters_stay_float32(
    monkeypatch: pytest.MonkeyPatch, q: str, kind: str
) -> None:
    plain = _built(monkeypatch)
    built = _built(monkeypatch, q)
    inner = built.model.get_base_model()
    layer = inner.model.layers[0]
    for lin in (layer.self_attn.q_proj.base_layer, layer.self_attn.o_proj, layer.mlp.down_proj):
        assert type(lin.weight.data).__name__ == kind and not lin.weight.requires_grad
    # the tied LM head shares the (unquantized) embedding; norms and embeddings are untouched
    assert inner.lm_head.weight is inner.model.embed_tokens.weight
    assert type(inner.lm_head.weight.data) is torch.Tensor
    assert built.trainable_keys == plain.trainable_keys
    for n, p in built.model.named_parameters():
        if "lora_" in n:
            assert type(p.data) is torch.Tensor and p.dtype == torch.float32, n
    # the server's check of the frozen adapter weights does not see the base's storage
    assert frozen_fingerprint(built.model) == frozen_fingerprint(plain.model)
    linears = sum(
        m.weight.numel()
        for n, m in plain.model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and "lora_" not in n
        and m is not plain.model.get_base_model().lm_head
    )
    saved = stored_bytes(plain.model) - stored_bytes(built.model)
    # int8: 3 of every 4 bytes of a float32 weight, less 5 a row (scale, zero point; the rows
    # here are 32 wide); NF4: 7 of every 8, less its scales
    assert saved > (0.7 if q == "int8" else 0.82) * 4 * linears


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("q", ["int8", "nf4"])
def test_dp_clippings_agree_and_every_lora_weight_trains_through_a_quantized_base(
    monkeypatch: pytest.MonkeyPatch, q: str, dtype: str
) -> None:
    """flat and book-keeping (and ghost over a float32-computing base) release the same update."""
    clippings = ("flat", "bookkeeping", "ghost") if dtype == "float32" else ("flat", "bookkeeping")
    states = {}
    for clipping in clippings:
        built = _built(monkeypatch, q, dtype)
        data = TASK.tokenize(sentiment_examples(6), built.tokenizer, max_length=48)
        start = {
            n: p.detach().clone() for n, p in built.model.named_parameters() if p.requires_grad
        }
        cfg = TrainConfig(
            optimizer="sgd", momentum=0.0, lr=1.0, batch_size=len(data), physical_batch_size=3
        )
        dp = DPSettings(
            noise_multiplier=1e-12,  # the released update is the clipped sum itself
            max_grad_norm=0.01,
            sample_rate=1.0,
            steps=1,
            clipping=clipping,  # type: ignore[arg-type]
        )
        out = train(
            built.model, data, cfg, dp=dp, pad_token_id=int(built.tokenizer.pad_token_id), task=TASK
        )
        assert out.clipping == clipping
        moved = [n for n in start if not torch.equal(start[n], out.state[n])]
        assert moved == list(start), "every LoRA weight (A and B) must train"
        assert all(t.dtype == torch.float32 for t in out.state.values())
        states[clipping] = out.state
    for clipping in clippings[1:]:
        for k, v in states["flat"].items():
            torch.testing.assert_close(states[clipping][k], v, rtol=1e-4, atol=2e-5)


# --- on a GPU: the SmolLM2-135M shape -------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a quantized base needs a CUDA GPU")
@pytest.mark.parametrize("q", ["int8", "nf4"])
def test_smollm2_shape_quantized_takes_a_dp_step_on_cuda(tmp_path: object, q: str) -> None:
    pytest.importorskip("torchao", reason="torchao (pip install 'privet[gpu]') is not installed")
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(str(tmp_path)) / "smol"
    shape = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(shape).save_pretrained(folder)
    tok_src = Path(tiny_llama_dir())
    for f in tok_src.iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            (folder / f.name).write_bytes(f.read_bytes())
    cfg = ModelConfig(
        name=str(folder),
        task="causal_lm",
        base_quantization=q,
        base_dtype="bfloat16",  # type: ignore[arg-type]
    )
    built = TASK.build_model(cfg, AdapterConfig(top_layers=None), seed=0)
    assert next(built.model.parameters()).device.type == "cuda"
    data = TASK.tokenize(sentiment_examples(8), built.tokenizer, max_length=48)
    start = {
        n: p.detach().cpu().clone() for n, p in built.model.named_parameters() if p.requires_grad
    }
    dp = DPSettings(
        noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0, steps=1, clipping="auto"
    )
    out = train(
        built.model,
        data,
        TrainConfig(batch_size=8),
        dp=dp,
        pad_token_id=int(built.tokenizer.pad_token_id),
        task=TASK,
    )
    assert out.clipping == "bookkeeping"
    assert all(not torch.equal(start[n], out.state[n]) for n in start)


@pytest.mark.parametrize("q", ["int8", "nf4"])
def test_ghost_is_refused_at_training_time_over_a_bf16_quantized_base(
    monkeypatch: pytest.MonkeyPatch, q: str
) -> None:
    """A caller that skips the config's rule still cannot run ghost clipping through bf16."""
    built = _built(monkeypatch, q, "bfloat16")
    data = TASK.tokenize(sentiment_examples(4), built.tokenizer, max_length=48)
    dp = DPSettings(
        noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0, steps=1, clipping="ghost"
    )
    with pytest.raises(PrivacyError, match="would round apart"):
        train(
            built.model,
            data,
            TrainConfig(batch_size=4),
            dp=dp,
            pad_token_id=int(built.tokenizer.pad_token_id),
            task=TASK,
        )
