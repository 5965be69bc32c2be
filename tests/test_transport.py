"""Transport encodings (float32/float16/int8): exact bounds, deltas, and the ClientApp round trip."""

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from privet.common.arrays import check_update, state_to_arrayrecord
from privet.common.config import load_config
from privet.common.errors import ConfigError, UpdateError
from privet.common.transport import decode_state, encode_state, read_arrays, write_arrays
from privet.server.transport import TransportGrid

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, st.integers(1, 40), elements=finite))
def test_int8_error_is_at_most_half_a_step(values: np.ndarray) -> None:
    x = torch.from_numpy(values)
    record = encode_state({"w": x}, "int8")
    assert record["w"].dtype == "int8"
    back = decode_state(record, "int8")["w"]
    peak = float(x.abs().max())
    step = peak / 127
    assert back.dtype == torch.float32
    if step < torch.finfo(torch.float32).tiny:  # no representable scale: zeros travel
        assert float(back.abs().max()) == 0.0 and float((back - x).abs().max()) == peak
    else:
        assert float((back - x).abs().max()) <= step / 2 + 1e-6 * step


def test_int8_of_a_subnormal_tensor_is_zeros() -> None:
    # hypothesis found this: 1e-45 / 127 is not a float32, so no scale can carry it
    x = torch.tensor([1.4e-45, 0.0, -1.4e-45], dtype=torch.float32)
    back = decode_state(encode_state({"w": x}, "int8"), "int8")["w"]
    assert torch.equal(back, torch.zeros(3))


def test_float32_is_exact_and_float16_halves_the_bytes() -> None:
    state = {"a": torch.randn(512, 16), "b": torch.randn(16)}
    assert all(
        torch.equal(decode_state(encode_state(state, "float32"), "float32")[k], state[k])
        for k in state
    )
    b32 = encode_state(state, "float32").count_bytes()
    b16 = encode_state(state, "float16").count_bytes()
    b8 = encode_state(state, "int8").count_bytes()
    assert b16 < 0.55 * b32 and b8 < 0.3 * b32
    half = decode_state(encode_state(state, "float16"), "float16")
    torch.testing.assert_close(half["a"], state["a"], rtol=1e-3, atol=1e-4)


def test_a_small_update_survives_int8_because_the_update_travels() -> None:
    weights = {"w": torch.full((100,), 10.0)}
    new = {"w": weights["w"] + 1e-3 * torch.arange(100, dtype=torch.float32) / 100}
    content = RecordDict()
    write_arrays(content, new, "int8", reference=weights)
    got = read_arrays(content, reference=weights)["w"]
    # quantising the weights themselves (step 10/127 = 0.08) would erase this update entirely
    torch.testing.assert_close(got - weights["w"], new["w"] - weights["w"], rtol=0, atol=1e-5)
    with pytest.raises(UpdateError, match="unknown"):
        read_arrays(content)


def test_wrong_dtype_for_the_encoding_is_refused() -> None:
    content = RecordDict({"arrays": state_to_arrayrecord({"w": torch.ones(3)})})
    content["transport"] = ConfigRecord({"encoding": "int8", "delta": False})
    with pytest.raises(UpdateError, match="int8"):
        read_arrays(content)


def test_config_names_the_field_for_an_unknown_encoding() -> None:
    with pytest.raises(ConfigError, match=r"federation\.transport"):
        load_config(None, ["federation.transport=int4"])


def _seen(msg: Message) -> tuple[set[str], bool, int]:
    """What travels: the dtypes of the arrays, whether they are an update, their bytes."""
    arrs: ArrayRecord = msg.content.array_records["arrays"]
    meta = msg.content.config_records["transport"]
    dtypes = {a.dtype for k, a in arrs.items() if not k.endswith("#scale")}
    return dtypes, bool(meta["delta"]), arrs.count_bytes()


class _LoopbackGrid:
    """Delivers each message to a ClientApp in this process (no Flower engine)."""

    owns_delivery = True

    def __init__(self, client_app, wire: list[tuple[set[str], bool, int]]) -> None:
        self.client_app = client_app
        self.wire = wire

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.wire.append(_seen(msg))
            ctx = Context(
                run_id=1,
                node_id=msg.metadata.dst_node_id,
                node_config={"partition-id": 0},
                state=RecordDict(),
                run_config={},
            )
            reply = self.client_app(msg, ctx)
            self.wire.append(_seen(reply))
            replies.append(reply)
        return replies


@pytest.mark.parametrize("encoding", ["float16", "int8"])
def test_client_app_round_trip_through_the_transport_grid(
    encoding: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from privet.client import make_client_app
    from privet.common.data import cached_federated_data
    from privet.common.modeling import build_model, frozen_fingerprint, trainable_state

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what a SuperLink sets for a real run
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    cfg = load_config(
        None,
        [
            "model.num_hidden_layers=1",
            "model.max_length=32",
            "data.max_examples=400",
            "data.num_clients=2",
            "privacy.enabled=false",
            "train.local_epochs=0.2",
            f"federation.transport={encoding}",
        ],
    )
    fed = cached_federated_data(cfg.data)
    built = build_model(cfg.model, cfg.adapter, num_labels=fed.num_labels, seed=cfg.train.seed)
    start = trainable_state(built.model)
    wire: list[tuple[set[str], bool, int]] = []
    grid = TransportGrid(_LoopbackGrid(make_client_app(cfg, state_dir=tmp_path), wire), encoding)  # type: ignore[arg-type]
    # One content object addressed to two nodes, as Flower's strategies build them.
    shared = RecordDict(
        {
            "arrays": state_to_arrayrecord(start),
            "config": ConfigRecord(
                {
                    "server-round": 1,
                    "total-rounds": 1,
                    "fingerprint": frozen_fingerprint(built.model),
                }
            ),
        }
    )
    msgs = [Message(shared, dst_node_id=n, message_type="train") for n in (7, 8)]
    replies = list(grid.send_and_receive(msgs))
    assert not any(r.has_error() for r in replies), [
        r.error.reason for r in replies if r.has_error()
    ]
    # on the wire: the encoding's dtype both ways, the reply an update, for both nodes alike
    want = {"float16": "float16", "int8": "int8"}[encoding]
    assert [w[:2] for w in wire] == [({want}, False), ({want}, True)] * 2
    assert wire[0][2] == wire[2][2]
    sent_bytes, got_bytes = grid.take_byte_counts()
    assert (sent_bytes, got_bytes) == (wire[0][2] + wire[2][2], wire[1][2] + wire[3][2])
    for reply in replies:
        state = {
            k: torch.from_numpy(np.array(v.numpy()))
            for k, v in reply.content.array_records["arrays"].items()
        }
        check_update(state, start, who="client")
        # a client that trained from the true weights moves them by a training step, no more
        assert max(float((state[k] - start[k]).abs().max()) for k in start) < 1.0
        assert any(not torch.allclose(state[k], start[k]) for k in start)
        assert "transport" not in reply.content.config_records


def test_the_round_loop_lets_an_encoding_grid_deliver_its_own_messages() -> None:
    # TransportGrid encodes in its own send_and_receive; the loop's push/pull path would bypass it.
    from privet.server.loop import send_and_receive

    class _Delivering:
        owns_delivery = True

        def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
            return [f"reply to {m}" for m in messages]

        def push_messages(self, messages):  # type: ignore[no-untyped-def]
            raise AssertionError("the loop must not push past the grid's own delivery")

    assert send_and_receive(_Delivering(), ["a", "b"], timeout=1.0) == ["reply to a", "reply to b"]  # type: ignore[arg-type]
    assert TransportGrid.owns_delivery is True
