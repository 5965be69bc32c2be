import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from privet.common.arrays import arrayrecord_to_state, check_update, state_to_arrayrecord
from privet.common.config import AdapterConfig, ModelConfig
from privet.common.errors import ModelError, UpdateError
from privet.common.modeling import (
    build_model,
    frozen_fingerprint,
    load_trainable_state,
    resolve_model_path,
    trainable_state,
)

from .conftest import tiny_model


def test_only_adapter_b_and_head_train_under_ffa(tiny) -> None:
    keys = tiny.trainable_keys
    assert keys, "something must train"
    assert all(("lora_B" in k) or ("classifier" in k and "modules_to_save" in k) for k in keys), (
        keys
    )
    # one layer, query and value -> two B matrices, plus head weight and bias
    assert sum("lora_B" in k for k in keys) == 2
    assert sum("classifier" in k for k in keys) == 2


def test_trainable_a_when_ffa_is_off() -> None:
    built = tiny_model(freeze_a=False)
    assert sum("lora_A" in k for k in built.trainable_keys) == 2


def test_state_round_trips_bit_for_bit_through_arrayrecord(tiny) -> None:
    state = trainable_state(tiny.model)
    for v in state.values():
        v.add_(torch.randn_like(v))  # non-trivial values
    back = arrayrecord_to_state(state_to_arrayrecord(state))
    assert list(back) == list(state)
    for k in state:
        assert back[k].dtype == state[k].dtype
        assert torch.equal(back[k], state[k])
        assert np.array_equal(back[k].numpy().view(np.uint8), state[k].numpy().view(np.uint8))


def test_bfloat16_is_cast_for_transport() -> None:
    rec = state_to_arrayrecord({"w": torch.ones(2, 2, dtype=torch.bfloat16)})
    assert arrayrecord_to_state(rec)["w"].dtype == torch.float32


def test_no_frozen_base_weight_enters_a_message(tiny) -> None:
    state = trainable_state(tiny.model)
    record = state_to_arrayrecord(state)
    content = RecordDict({"arrays": record, "config": ConfigRecord({"x": 1})})
    sent: set[str] = set()
    for rec in content.array_records.values():
        sent |= set(rec.keys())
    frozen = {n for n, p in tiny.model.named_parameters() if not p.requires_grad}
    assert sent and not (sent & frozen)
    assert not any("embeddings" in k or "attention.self.query.base_layer" in k for k in sent)
    # about 0.1% of the model travels
    total = sum(p.numel() for p in tiny.model.parameters())
    assert sum(v.numel() for v in state.values()) < 0.01 * total


def test_load_trainable_state_sets_values_and_rejects_mismatch(tiny) -> None:
    state = {k: torch.full_like(v, 0.5) for k, v in trainable_state(tiny.model).items()}
    load_trainable_state(tiny.model, state)
    assert all(torch.equal(v, state[k]) for k, v in trainable_state(tiny.model).items())
    bad = dict(state)
    key = next(iter(bad))
    bad[key] = torch.zeros(3)
    with pytest.raises(ModelError, match="shape"):
        load_trainable_state(tiny.model, bad)
    with pytest.raises(ModelError, match="missing"):
        load_trainable_state(tiny.model, {})


def test_same_seed_same_frozen_weights_different_seed_differs() -> None:
    a, b = tiny_model(), tiny_model()
    assert frozen_fingerprint(a.model) == frozen_fingerprint(b.model)
    c = build_model(ModelConfig(num_hidden_layers=1), AdapterConfig(), num_labels=2, seed=5)
    assert frozen_fingerprint(c.model) != frozen_fingerprint(a.model)


def test_check_update_rejects_bad_updates() -> None:
    ref = {"w": torch.zeros(2, 3)}
    check_update({"w": torch.ones(2, 3)}, ref, who="c1")
    with pytest.raises(UpdateError, match="c1: w has shape"):
        check_update({"w": torch.ones(3, 2)}, ref, who="c1")
    with pytest.raises(UpdateError, match="NaN"):
        check_update({"w": torch.tensor([[float("nan")] * 3] * 2)}, ref, who="c1")
    with pytest.raises(UpdateError, match="keys"):
        check_update({"v": torch.ones(2, 3)}, ref, who="c1")
    with pytest.raises(UpdateError, match="dtype"):
        check_update({"w": torch.ones(2, 3, dtype=torch.float64)}, ref, who="c1")


def test_model_names_resolve_or_fail_clearly(tmp_path) -> None:
    assert resolve_model_path("embedded:all-MiniLM-L6-v2").endswith("model")
    with pytest.raises(ModelError, match="not an embedded model"):
        resolve_model_path("embedded:gpt-7")
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path("./no/such/folder")
    # An uncached hub name with the hub out of reach: one error before any retry.
    with pytest.raises(ModelError, match="not in the Hugging Face cache.*Fix: download it once"):
        resolve_model_path("someorg/some-model")


def test_hub_name_offline_gives_one_clear_error() -> None:
    with pytest.raises(ModelError, match="model.name 'someorg/not-a-model' is not a local folder"):
        build_model(ModelConfig(name="someorg/not-a-model"), AdapterConfig(), num_labels=2)


def test_bad_target_modules_are_explained() -> None:
    with pytest.raises(ModelError, match="target_modules"):
        build_model(
            ModelConfig(num_hidden_layers=1), AdapterConfig(target_modules=["nope"]), num_labels=2
        )


def test_arrayrecord_type(tiny) -> None:
    assert isinstance(state_to_arrayrecord(trainable_state(tiny.model)), ArrayRecord)


def test_mean_pooling_ignores_padding_and_is_the_default_for_sentence_transformers(tiny) -> None:
    from privet.common.modeling import MaskedMeanPooler

    poolers = [m for n, m in tiny.model.named_modules() if n.endswith("pooler")]
    assert len(poolers) == 1 and isinstance(poolers[0], MaskedMeanPooler)
    tiny.model.eval()
    ids = torch.tensor([[101, 2307, 3185, 102, 0, 0], [101, 2307, 2307, 3185, 2307, 102]])
    mask = (ids > 0).long()
    with torch.no_grad():
        padded = tiny.model(input_ids=ids, attention_mask=mask).logits[0]
        alone = tiny.model(input_ids=ids[:1, :4], attention_mask=mask[:1, :4]).logits[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-6)
    own = build_model(
        ModelConfig(num_hidden_layers=1, pooling="model"), AdapterConfig(), num_labels=2
    )
    assert not any(isinstance(m, MaskedMeanPooler) for m in own.model.modules())
