"""A frozen base held in bf16 with float32 adapters; every clipping variant agrees on LoRA."""

import numpy as np
import pytest
import torch

from privet.client import DPSettings, train
from privet.client.bookkeeping import BookKeepingClipper
from privet.common.config import AdapterConfig, ModelConfig, PrivetConfig, TrainConfig
from privet.common.data import Examples, TokenizedExamples
from privet.common.errors import ConfigError, PrivacyError
from privet.common.modeling import BuiltModel, build_model, frozen_fingerprint

from .test_ghost_clipping import TEXTS


def _model(base_dtype: str = "float32", **adapter: object) -> BuiltModel:
    return build_model(
        ModelConfig(num_hidden_layers=1, max_length=32, base_dtype=base_dtype),  # type: ignore[arg-type]
        AdapterConfig(**adapter),
        num_labels=2,
        seed=0,
    )


def _data(built: BuiltModel) -> TokenizedExamples:
    labels = np.array([i % 2 for i in range(len(TEXTS))], dtype=np.int64)
    return TokenizedExamples(Examples(texts=TEXTS, labels=labels), built.tokenizer, max_length=32)


def test_bf16_base_keeps_adapters_and_head_in_float32() -> None:
    built = _model("bfloat16")
    dtypes = {n: p.dtype for n, p in built.model.named_parameters()}
    for name in built.trainable_keys:
        assert dtypes[name] == torch.float32, name
    frozen_lora = [n for n in dtypes if "lora_A" in n]
    assert frozen_lora and all(dtypes[n] == torch.float32 for n in frozen_lora)
    base = [n for n in dtypes if "encoder.layer.0.attention.self.query.base_layer" in n]
    assert base and all(dtypes[n] == torch.bfloat16 for n in base)
    # the base holds half the bytes: all but the adapters and head are 2 bytes a weight
    fp32 = _model("float32")
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert size(built.model) < 0.55 * size(fp32.model)
    # the server checks the frozen adapter weights: the same fingerprint in either precision
    assert frozen_fingerprint(built.model) == frozen_fingerprint(fp32.model)


def test_bf16_base_trains_on_cpu_close_to_float32() -> None:
    """The same step from a bf16 base lands near the float32 one (only the base's rounding differs)."""
    cfg = TrainConfig(optimizer="sgd", momentum=0.0, lr=0.5, batch_size=8, local_epochs=1.0)
    out = {}
    for dtype in ("float32", "bfloat16"):
        built = _model(dtype)
        res = train(built.model, _data(built), cfg, dp=None, pad_token_id=0)
        assert np.isfinite(res.train_loss)
        out[dtype] = res
    assert abs(out["float32"].train_loss - out["bfloat16"].train_loss) < 0.05
    for k, v in out["float32"].state.items():
        assert out["bfloat16"].state[k].dtype == torch.float32
        torch.testing.assert_close(out["bfloat16"].state[k], v, rtol=0.1, atol=2e-2)


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_flat_ghost_and_bookkeeping_release_the_same_lora_update(base_dtype: str) -> None:
    """On LoRA (sequence inputs to the LoRA layers, 2-D to the head) the three clippings agree."""
    states = {}
    # ghost's two backward passes would round apart through a bf16 base: refused there (below)
    clippings = (
        ("flat", "ghost", "bookkeeping") if base_dtype == "float32" else ("flat", "bookkeeping")
    )
    for clipping in clippings:
        built = _model(base_dtype)
        cfg = TrainConfig(
            optimizer="sgd", momentum=0.0, lr=0.5, batch_size=8, physical_batch_size=3
        )
        dp = DPSettings(
            noise_multiplier=1e-12,  # the released update is the clipped sum itself
            max_grad_norm=0.05,
            sample_rate=1.0,
            steps=1,
            clipping=clipping,  # type: ignore[arg-type]
        )
        res = train(built.model, _data(built), cfg, dp=dp, pad_token_id=0)
        assert not any(m._forward_hooks for m in built.model.modules())
        states[clipping] = res.state
    for k in states["flat"]:
        for clipping in clippings[1:]:
            torch.testing.assert_close(states[clipping][k], states["flat"][k], rtol=1e-4, atol=1e-6)


def test_ghost_clipping_is_refused_on_a_bf16_base() -> None:
    built = _model("bfloat16")
    cfg = TrainConfig(batch_size=8)
    dp = DPSettings(
        noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0, steps=1, clipping="ghost"
    )
    with pytest.raises(PrivacyError, match="round apart"):
        train(built.model, _data(built), cfg, dp=dp, pad_token_id=0)
    assert not any(m._forward_hooks for m in built.model.modules() if m is not built.model)
    with pytest.raises((ConfigError, ValueError), match="ghost"):
        PrivetConfig.model_validate(
            {"model": {"base_dtype": "bfloat16"}, "privacy": {"clipping": "ghost"}}
        )


def test_bookkeeping_norms_stay_float32_on_a_bf16_base() -> None:
    built = _model("bfloat16")
    data = _data(built)
    clipper = BookKeepingClipper(built.model, max_grad_norm=1.0)
    from privet.common.data import collate

    batch = collate([data[i] for i in range(4)], 0)
    labels = batch.pop("labels")
    clipper.start_microbatch()
    logits = built.model(**batch).logits
    assert logits.dtype == torch.float32  # the head computes in float32
    loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    clipper.backward(loss)
    clipper.close()
    assert clipper.last_norms is not None and clipper.last_norms.dtype == torch.float32
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32
        for p in built.model.parameters()
        if p.requires_grad
    )


def test_bf16_base_with_full_fine_tuning_is_one_clear_error() -> None:
    with pytest.raises((ConfigError, ValueError), match="base_dtype"):
        PrivetConfig.model_validate(
            {"model": {"base_dtype": "bfloat16"}, "adapter": {"method": "full"}}
        )
    with pytest.raises((ConfigError, ValueError), match="base_dtype"):
        PrivetConfig.model_validate({"model": {"base_dtype": "float16"}})
