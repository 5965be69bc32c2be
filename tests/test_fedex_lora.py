"""FedEx-LoRA (``aggregation.lora = "fedex"``): the server strategy and the client's fold, on hand-made matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

from privet.common.config import load_config
from privet.common.lora_residual import (
    RESIDUAL_RECORD,
    fold_residuals,
    folded_residuals,
    global_state,
    load_global_state,
    message_residuals,
    residual_key,
    split_residuals,
)
from privet.common.modeling import load_trainable_state
from privet.server.lora import FedExLoraAggregation
from privet.server.recording import RecordingStrategy
from privet.server.strategies import build_strategy
from privet.server.validation import make_reply_checks

from .conftest import tiny_model
from .flower_fakes import NodesGrid, arrays, reply, run_identity

QUERY = "base_model.model.bert.encoder.layer.0.attention.self.query"
KA, KB = f"{QUERY}.lora_A.default.weight", f"{QUERY}.lora_B.default.weight"


def _fedex(num_clients: int = 2) -> RecordingStrategy:
    cfg = load_config(None, ["adapter.freeze_a=false", "aggregation.lora='fedex'"])
    inner = build_strategy(cfg.federation, num_clients=num_clients, aggregation=cfg.aggregation)
    assert isinstance(inner, FedExLoraAggregation)
    # The way the ServerApp runs it: replies are validated against what the clients received.
    return RecordingStrategy(
        inner, client_names=["c0", "c1"], checks=make_reply_checks(max_update_norm=None)
    )


def _np(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in state.items()}


def test_two_rounds_accumulate_the_exact_residual_and_send_it_apart() -> None:
    s = _fedex()
    ka, kb, kr = (
        "q.lora_A.default.weight",
        "q.lora_B.default.weight",
        "q.fedex_residual.default.weight",
    )
    start = {ka: np.zeros((1, 2)), kb: np.zeros((2, 1)), "head": [0.0]}
    with run_identity():
        msgs = list(s.configure_train(1, arrays(start), ConfigRecord({}), NodesGrid([1, 2])))
        assert all(RESIDUAL_RECORD not in m.content.array_records for m in msgs)  # nothing yet
        r1 = {ka: [[1.0, 2.0]], kb: [[1.0], [0.0]], "head": [1.0]}
        r2 = {ka: [[3.0, 4.0]], kb: [[0.0], [1.0]], "head": [3.0]}
        out, metrics = s.aggregate_train(1, [reply(1, r1), reply(2, r2)])
        assert out is not None and metrics is not None and s.current.rejected == {}
        # means of A and B; residual = mean(B_i A_i) - B_avg A_avg (see test_lora_aggregation)
        assert out[ka].numpy().tolist() == [[2.0, 3.0]]
        assert out[kb].numpy().tolist() == [[0.5], [0.5]]
        assert out["head"].numpy().tolist() == [2.0]
        assert out[kr].numpy().tolist() == [[-0.5, -0.5], [0.5, 0.5]]
        assert out[kr].numpy().dtype == np.float32
        assert metrics["fedex-residual-bytes"] == 16

        msgs = list(s.configure_train(2, out, ConfigRecord({}), NodesGrid([1, 2])))
        for m in msgs:
            assert set(m.content.array_records["arrays"]) == {ka, kb, "head"}
            assert m.content.array_records[RESIDUAL_RECORD][kr].numpy().tolist() == [
                [-0.5, -0.5],
                [0.5, 0.5],
            ]
        assert s.current.bytes_sent == sum(
            r.count_bytes() for m in msgs for r in m.content.array_records.values()
        )
        # weights 1 : 3. mean(B_i A_i) = [[.25, .75], [.25, -.75]], B_avg A_avg = [[.25, .75],
        # [-.125, -.375]], so this round adds [[0, 0], [.375, -.375]] to the residual.
        q1 = {ka: [[1.0, 0.0]], kb: [[1.0], [1.0]], "head": [0.0]}
        q2 = {ka: [[0.0, 1.0]], kb: [[1.0], [-1.0]], "head": [4.0]}
        out2, _ = s.aggregate_train(2, [reply(1, q1, n=1), reply(2, q2, n=3)])
        assert out2 is not None and s.current.rejected == {}
        assert out2[kr].numpy().tolist() == [[-0.5, -0.5], [0.875, 0.125]]
        assert out2["head"].numpy().tolist() == [3.0]
        # The clients trained on W0 + R1 with their own A, B: the new global model is exactly
        # W0 + R1 + mean(B_i A_i), i.e. R2 + B_avg A_avg = R1 + mean(B_i A_i).
        total = out2[kr].numpy() + out2[kb].numpy() @ out2[ka].numpy()
        np.testing.assert_allclose(total, [[-0.25, 0.25], [0.75, -0.25]], atol=1e-7)

        evals = list(s.configure_evaluate(2, out2, ConfigRecord({}), NodesGrid([1, 2])))
        for m in evals:
            assert kr not in m.content.array_records["arrays"]
            assert RESIDUAL_RECORD in m.content.array_records


def test_strategy_and_client_fold_give_the_exact_mean_model() -> None:
    """Real MiniLM layer: server residual + the client's fold = W0 + scaling * mean(B_i A_i)."""
    server_model = tiny_model(freeze_a=False).model
    start = global_state(server_model)
    assert not split_residuals(start)[1]
    c1, c2 = _np(start), _np(start)
    for c in (c1, c2):
        c[KA], c[KB] = np.zeros((4, 384), np.float32), np.zeros((384, 4), np.float32)
    c1[KA][0, :2], c1[KB][0, 0] = [1.0, 2.0], 1.0
    c2[KA][0, :2], c2[KB][1, 0] = [3.0, 4.0], 1.0
    s = _fedex()
    with run_identity():
        list(s.configure_train(1, arrays(_np(start)), ConfigRecord({}), NodesGrid([1, 2])))
        out, metrics = s.aggregate_train(1, [reply(1, c1), reply(2, c2)])
        assert out is not None and metrics is not None
        # one full 384 x 384 float32 matrix per adapted layer (query and value)
        assert metrics["fedex-residual-bytes"] == 2 * 384 * 384 * 4
        (msg, _) = list(s.configure_train(2, out, ConfigRecord({}), NodesGrid([1, 2])))

    client = tiny_model(freeze_a=False).model
    layer = client.get_submodule(QUERY)
    w0 = layer.base_layer.weight.detach().clone()
    value = client.get_submodule(QUERY.replace("query", "value"))
    value_w0 = value.base_layer.weight.detach().clone()
    load_trainable_state(
        client,
        {
            k: torch.from_numpy(v.numpy().copy())
            for k, v in msg.content.array_records["arrays"].items()
        },
    )
    fold_residuals(client, message_residuals(msg.content))  # what the ClientApp does

    def effective() -> torch.Tensor:
        return layer.base_layer.weight.detach() + layer.get_delta_weight("default").detach()

    expected = torch.zeros(384, 384)
    expected[:2, :2] = torch.tensor([[0.5, 1.0], [1.5, 2.0]]) * 4.0  # scaling = alpha / r = 16 / 4
    torch.testing.assert_close(effective() - w0, expected, atol=2e-6, rtol=0)
    # (the naive product of means would have been [[1, 1.5], [1, 1.5]] * 4.) The value layer's
    # clients agreed (B = 0 at the start): its residual is zero and its base weight unchanged.
    assert torch.equal(value.base_layer.weight.detach(), value_w0)

    # Folding again replaces, never adds; no residuals restores the base weight.
    fold_residuals(client, message_residuals(msg.content))
    torch.testing.assert_close(effective() - w0, expected, atol=2e-6, rtol=0)
    fold_residuals(client, {})
    assert torch.equal(layer.base_layer.weight.detach(), w0)

    # The server's own copy (evaluation, checkpoints, resume) holds the same global model.
    state = {k: torch.from_numpy(v.numpy().copy()) for k, v in out.items()}
    load_global_state(server_model, state)
    server_layer = server_model.get_submodule(QUERY)
    torch.testing.assert_close(
        server_layer.base_layer.weight.detach()
        + server_layer.get_delta_weight("default").detach()
        - w0,
        expected,
        atol=2e-6,
        rtol=0,
    )
    # ... and gives it back whole, so a resumed run sends the same residuals on.
    again = global_state(server_model)
    assert set(again) == set(state)
    assert torch.equal(again[residual_key(KA)], state[residual_key(KA)])
    assert set(folded_residuals(server_model)) == {
        residual_key(KA),
        residual_key(KA).replace("query", "value"),
    }


def test_a_residual_for_a_layer_the_model_lacks_is_refused() -> None:
    from privet.common.errors import ModelError

    model = tiny_model(freeze_a=False).model
    with pytest.raises(ModelError, match="names no LoRA layer"):
        fold_residuals(model, {"nowhere.fedex_residual.default.weight": torch.zeros(2, 2)})
    with pytest.raises(ModelError, match="has shape"):
        fold_residuals(model, {residual_key(KA): torch.zeros(2, 2)})
