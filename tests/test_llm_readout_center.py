"""The centered answer readout (``adapter.readout_center``): training across one private direction.

The readout's input is almost all one direction that every chat shares. Each client releases that
direction once (the sum of its chats' unit final states, plus Gaussian noise, charged to its
ledger), and trains its readout in a basis where that direction's share of each state is scaled
down, while the model stays the plain readout ``A h``. On the tiny random Llama of
``llm_fixtures``: the basis, the fast step through it, the hand-computed clipped sum, the release
and its charge, a federation, and the refusals.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from privet.client import DPSettings, train
from privet.client.privacy import plan_round, readout_direction, record_round
from privet.common.config import (
    AdapterConfig,
    ModelConfig,
    PrivacyConfig,
    TrainConfig,
    load_config,
)
from privet.common.errors import BudgetExhaustedError, ConfigError
from privet.common.modeling import (
    BuiltModel,
    ReadoutBasis,
    centered_readout,
    readout_basis,
    readout_scale,
)
from privet.common.privacy import epsilon_from_history, open_ledger, readout_center_minimum
from privet.common.tasks import TRUNK_STATES, CausalLM, ReadoutHead

from .inprocess_runs import simulate_causal_lm
from .llm_fixtures import plain_examples, released_clipped_sum, sentiment_examples, tiny_llama_dir

CPU = torch.device("cpu")
TASK = CausalLM()
ANSWERS = ["negative", "positive"]
HEAD_A = "base_model.model.lm_head.lora_A.default.weight"


def _built() -> BuiltModel:
    cfg = ModelConfig(name=tiny_llama_dir(), task="causal_lm", max_length=48)
    adapter = AdapterConfig(top_layers=0, readout_tokens=ANSWERS, readout_center=True)
    return TASK.build_model(cfg, adapter, seed=0)


def _unit(seed: int, width: int = 32) -> torch.Tensor:
    u = torch.randn(width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return u / u.norm()


def _a(built: BuiltModel) -> torch.nn.Parameter:
    return built.model.get_parameter(HEAD_A)


def _slot(built: BuiltModel) -> ReadoutBasis:
    slot = built.model.get_base_model().lm_head.lora_dropout["default"]
    assert isinstance(slot, ReadoutBasis)
    return slot


def _m(u: torch.Tensor, s: float) -> torch.Tensor:
    """The basis ``M = I + (1 / s - 1) u u^T`` (symmetric)."""
    return torch.eye(len(u), dtype=torch.float64) + (1 / s - 1) * torch.outer(u, u)


def test_the_basis_changes_the_coordinates_not_the_model() -> None:
    built = _built()
    u, s = _unit(1), 4.0
    a = _a(built)
    with torch.no_grad():  # a received readout with a share along u, as a global mean has
        a.copy_(torch.randn(a.shape, generator=torch.Generator().manual_seed(4)))
    start = a.detach().clone().double()
    ids = built.tokenizer("a lovely film", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = built.model(input_ids=ids).logits
        with built.model.disable_adapter():
            base = built.model(input_ids=ids).logits
    assert float((plain - base).abs().max()) > 1e-3  # the readout does move its rows
    with centered_readout(built.model, u, s):
        assert torch.allclose(_slot(built).direction.double(), u, atol=1e-7)
        with torch.no_grad():  # set, not training: the plain readout
            torch.testing.assert_close(built.model(input_ids=ids).logits, plain)
        with readout_basis(built.model):
            # The weight holds A M^-1, the slot maps h to M h: the same model.
            inverse = start + (s - 1) * (start @ u)[:, None] * u[None, :]
            torch.testing.assert_close(a.detach().double(), inverse, rtol=1e-5, atol=1e-6)
            with torch.no_grad():
                inside = built.model(input_ids=ids).logits
            torch.testing.assert_close(inside, plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.detach().double(), start, rtol=1e-5, atol=1e-6)
    assert float(_slot(built).direction.abs().sum()) == 0.0
    with (
        pytest.raises(RuntimeError, match="boom"),
        centered_readout(built.model, u, s),
        readout_basis(built.model),
    ):
        raise RuntimeError("boom")
    assert not _slot(built).active and float(_slot(built).direction.abs().sum()) == 0.0
    torch.testing.assert_close(a.detach().double(), start, rtol=1e-5, atol=1e-6)


def test_scale_one_trains_the_plain_readout_and_a_large_scale_keeps_the_bias() -> None:
    data_examples = sentiment_examples(24)
    dp = DPSettings(noise_multiplier=0.8, max_grad_norm=1.0, sample_rate=0.25, steps=5)
    cfg = TrainConfig(batch_size=6, lr=0.05, local_epochs=1.0)
    u = _unit(1)

    def trained(scale: float | None) -> torch.Tensor:
        TRUNK_STATES.clear()
        built = _built()
        data = TASK.tokenize(data_examples, built.tokenizer, max_length=48)
        pad = int(built.tokenizer.pad_token_id)
        with centered_readout(built.model, None if scale is None else u, scale or 1.0):
            out = train(built.model, data, cfg, dp=dp, pad_token_id=pad, task=TASK, device=CPU)
        assert not _slot(built).active
        torch.testing.assert_close(out.state[HEAD_A], _a(built).detach())  # A, not A M^-1
        return out.state[HEAD_A].double()

    plain = trained(None)
    torch.testing.assert_close(trained(1.0), plain, rtol=1e-5, atol=1e-6)  # M = I
    # At s = 1e4 the steps along u are 1e4 times shorter: A's share along u hardly moves.
    far = trained(1e4)
    assert float((far @ u).abs().max()) < 1e-3 * float(far.norm())
    assert float((plain @ u).abs().max()) > 1e-2 * float(plain.norm())


def test_the_basis_scale_splits_the_clipping_norm_evenly() -> None:
    assert readout_scale(0.6) == 1.0  # 0.6 / 0.8 = 0.75: never below 1
    assert readout_scale(0.8) == pytest.approx(0.8 / 0.6)
    assert readout_scale(0.98) == pytest.approx(0.98 / math.sqrt(1 - 0.98**2))
    assert readout_scale(1.5) == readout_scale(1.0) > 1e5  # every state on u: finite, large


def test_the_fast_step_reads_the_basis_as_the_whole_head_does() -> None:
    from privet.common.data import GenerationExamples

    TRUNK_STATES.clear()
    built = _built()
    u = _unit(3)
    data = TASK.tokenize(
        GenerationExamples(
            targets=sentiment_examples(4).targets + plain_examples(2).targets,
            prompts=sentiment_examples(4).prompts + plain_examples(2).prompts,
        ),
        built.tokenizer,
        max_length=48,
    )
    batch = TASK.collate([data[i] for i in range(len(data))], int(built.tokenizer.pad_token_id))
    a = _a(built)
    with torch.no_grad():
        a.copy_(torch.randn(a.shape, generator=torch.Generator().manual_seed(6)))
    with centered_readout(built.model, u, 5.0), readout_basis(built.model):
        assert ReadoutHead.of(built.model.get_base_model().lm_head) is not None
        for _ in range(2):  # cold, then warm (kept states and fixed part)
            got = TASK.per_example_loss(built.model, dict(batch), device=CPU, mixed_precision="off")
            keep = batch["logits_to_keep"]
            logits = built.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits[:, :-1]
            labels = batch["labels"].index_select(1, keep)[:, 1:]
            ce = torch.nn.functional.cross_entropy(
                logits.index_select(1, keep[:-1]).transpose(1, 2).float(),
                labels,
                ignore_index=-100,
                reduction="none",
            )
            expected = ce.sum(dim=1) / (labels != -100).sum(dim=1).clamp(min=1)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            for i in range(len(data)):
                (g,) = torch.autograd.grad(got[i], [a], retain_graph=True)
                (e,) = torch.autograd.grad(expected[i], [a], retain_graph=True)
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("clipping", ["flat", "ghost", "bookkeeping"])
def test_clipping_a_centered_readout_releases_the_hand_computed_clipped_sum(clipping: str) -> None:
    built = _built()
    u = _unit(4)
    data = TASK.tokenize(sentiment_examples(6), built.tokenizer, max_length=48)
    a = _a(built)
    pad = int(built.tokenizer.pad_token_id)
    s = 6.0
    with centered_readout(built.model, u, s):
        grads = []
        with readout_basis(built.model):
            for i in range(len(data)):  # each example alone, by autograd, in the basis
                batch = TASK.collate([data[i]], pad)
                loss = TASK.per_example_loss(built.model, batch, device=CPU, mixed_precision="off")
                grads.append(torch.autograd.grad(loss[0], [a])[0])
        plain = []
        for i in range(len(data)):  # the same examples in the model's own coordinates
            batch = TASK.collate([data[i]], pad)
            loss = TASK.per_example_loss(built.model, batch, device=CPU, mixed_precision="off")
            plain.append(torch.autograd.grad(loss[0], [a])[0])
        m = _m(u, s)
        for g, p in zip(grads, plain, strict=True):  # g (M h)^T = (g h^T) M
            torch.testing.assert_close(g.double(), p.double() @ m, rtol=1e-4, atol=1e-7)
        norms = [float(g.norm()) for g in grads]
        clip = float(np.median(norms))
        expected = sum(g * min(1.0, clip / (n + 1e-6)) for g, n in zip(grads, norms, strict=True))
        assert isinstance(expected, torch.Tensor)
        out = released_clipped_sum(built, data, TASK, clip=clip, clipping=clipping)
    # One SGD step from 0 in the basis: A' = -sum / n, and the weights released are A = A' M.
    released = -out.state[HEAD_A].double() * len(data)
    torch.testing.assert_close(released, expected.double() @ m, rtol=1e-4, atol=1e-6)


def test_the_states_direction_sums_one_unit_vector_per_chat() -> None:
    TRUNK_STATES.clear()
    built = _built()
    pad = int(built.tokenizer.pad_token_id)
    data = TASK.tokenize(sentiment_examples(10), built.tokenizer, max_length=48)
    told: list[tuple[int, int]] = []
    total = TASK.state_directions(
        built.model,
        data,
        pad_token_id=pad,
        device=CPU,
        batch_size=4,
        on_batch=lambda done, n: told.append((done, n)),
    )
    assert told == [(4, 10), (8, 10), (10, 10)]
    # By hand: each chat's final state at the position before its answer, as a unit vector.
    expected = torch.zeros(32, dtype=torch.float64)
    decoder = built.model.get_base_model().get_decoder()
    for i in range(len(data)):
        ids, labels = data[i]
        first = next(j for j, lab in enumerate(labels) if lab != -100) - 1
        with torch.no_grad():
            h = decoder(input_ids=torch.tensor([ids])).last_hidden_state[0, first].double()
        expected += h / h.norm()
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    assert float(total.norm()) <= len(data)  # sensitivity 1 per chat


def _privacy(**over: object) -> PrivacyConfig:
    return PrivacyConfig(**{"target_epsilon": 8.0, "readout_center_noise": 2.0, **over})


def test_the_direction_is_released_once_charged_and_calibrated_against(tmp_path: Path) -> None:
    total = 500 * _unit(7) + torch.randn(32, generator=torch.Generator().manual_seed(8))
    calls: list[int] = []

    def measure() -> torch.Tensor:
        calls.append(1)
        return total

    common = {
        "num_examples": 500,
        "hidden": 32,
        "key": "model-a",
        "measure": measure,
        "state_dir": tmp_path,
        "client_id": "c0",
        "server_round": 1,
        "seed": 11,
    }
    got = readout_direction(privacy=_privacy(), **common)  # type: ignore[arg-type]
    assert got is not None and calls == [1]
    u, scale = got
    assert abs(float(u.norm()) - 1.0) < 1e-12
    exact = total / total.norm()
    # Noised: std 2 per coordinate on a sum of norm about 500 moves it by about 2 * sqrt(32) / 500.
    angle = math.acos(min(1.0, float(u @ exact)))
    assert 1e-4 < angle < 0.1, angle
    ledger = open_ledger(
        tmp_path / "ledger-c0.json",
        client_id="c0",
        accountant="rdp",
        delta=1e-5,
        budget_epsilon=8.0,
    )
    (entry,) = ledger.entries
    assert (entry.kind, entry.noise_multiplier, entry.sample_rate, entry.steps) == (
        "readout-direction",
        2.0,
        1.0,
        1,
    )
    opacus = RDPAccountant()
    opacus.history = [(2.0, 1.0, 1)]
    assert ledger.epsilon() == pytest.approx(opacus.get_epsilon(delta=1e-5), rel=1e-12)
    # Asked again (a later round, a restart): the kept direction, measured and charged no more.
    # The scale from the same release: |sum| less the noise's share, over n, about 1 here.
    assert scale == pytest.approx(readout_scale(float(total.norm()) / 500), rel=0.02)
    again = readout_direction(privacy=_privacy(), **common)  # type: ignore[arg-type]
    assert again is not None and torch.equal(again[0], u) and again[1] == scale and calls == [1]
    # The first round's DP-SGD calibration counts the release: ε over all rounds is the target.
    train_cfg = TrainConfig(batch_size=50, local_epochs=1.0)
    plan = plan_round(
        privacy=_privacy(),
        train=train_cfg,
        num_examples=500,
        total_rounds=3,
        state_dir=tmp_path,
        client_id="c0",
    )
    assert plan.dp is not None
    with_center = epsilon_from_history(
        [(2.0, 1.0, 1), (plan.dp.noise_multiplier, 0.1, 30)], delta=1e-5, accountant="rdp"
    )
    alone = epsilon_from_history(
        [(plan.dp.noise_multiplier, 0.1, 30)], delta=1e-5, accountant="rdp"
    )
    assert alone < with_center <= 8.0 + 1e-9 and with_center > 7.9
    # The round's own entry is its first attempt: the release is not a redo of round 1.
    from privet.client import TrainResult

    result = TrainResult(
        state={}, num_examples=500, steps=10, train_loss=0.0, examples_seen=0, seconds=0.0
    )
    record_round(plan, server_round=1, result=result)
    assert plan.ledger is not None and plan.ledger.entries[-1].attempt == 1


def test_a_site_floor_raises_the_release_noise_and_a_spent_budget_refuses_it(
    tmp_path: Path,
) -> None:
    common = {
        "num_examples": 5000,
        "hidden": 32,
        "key": "m",
        "measure": lambda: 4000 * _unit(9),
        "server_round": 1,
        "seed": 1,
    }
    readout_direction(
        privacy=_privacy(), state_dir=tmp_path, client_id="a", min_noise_multiplier=3.0, **common
    )  # type: ignore[arg-type]
    ledger = open_ledger(
        tmp_path / "ledger-a.json", client_id="a", accountant="rdp", delta=1e-5, budget_epsilon=8.0
    )
    assert ledger.entries[0].noise_multiplier == 3.0
    # A budget the release alone would pass: refused, nothing kept, nothing recorded.
    tight = _privacy(target_epsilon=0.1, readout_center_noise=1.0)
    with pytest.raises(BudgetExhaustedError):
        readout_direction(privacy=tight, state_dir=tmp_path, client_id="b", **common)  # type: ignore[arg-type]
    assert (
        not (tmp_path / "ledger-b.json").exists()
        or not open_ledger(
            tmp_path / "ledger-b.json",
            client_id="b",
            accountant="rdp",
            delta=1e-5,
            budget_epsilon=0.1,
        ).entries
    )


def test_too_few_examples_release_nothing_and_without_dp_the_direction_is_exact(
    tmp_path: Path,
) -> None:
    assert readout_center_minimum(2.0, 32) == math.ceil(8 * math.sqrt(32))  # 46
    total = 30 * _unit(10)
    common = {
        "num_examples": 45,
        "hidden": 32,
        "key": "m",
        "measure": lambda: total,
        "state_dir": tmp_path,
        "server_round": 1,
    }
    few = readout_direction(privacy=_privacy(), client_id="few", **common)  # type: ignore[arg-type]
    assert few is None and not (tmp_path / "ledger-few.json").exists()
    exact = readout_direction(privacy=PrivacyConfig(enabled=False), client_id="nodp", **common)  # type: ignore[arg-type]
    assert exact is not None
    torch.testing.assert_close(exact[0], _unit(10))
    assert exact[1] == readout_scale(30 / 45)


def test_refusals_name_the_field_and_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"readout_center.*top_layers = 0"):
        load_config(None, ["adapter.readout_center=true"])
    with pytest.raises(ConfigError, match=r"readout_center.*top_layers = 0"):
        load_config(
            None,
            [
                "model.task='causal_lm'",
                "adapter.readout_tokens=['negative','positive']",
                "adapter.top_layers=1",
                "adapter.readout_center=true",
            ],
        )
    with pytest.raises(ConfigError, match="readout_center_noise"):
        load_config(None, ["privacy.readout_center_noise=0.5"])


def test_a_centered_federation_charges_each_client_once_and_plans_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_basis: list[float] = []
    forward = ReadoutBasis.forward

    def watched(self: ReadoutBasis, x: torch.Tensor) -> torch.Tensor:
        if self.active:
            in_basis.append(float(self.scale))
        return forward(self, x)

    monkeypatch.setattr(ReadoutBasis, "forward", watched)
    extra = [
        "adapter.top_layers=0",
        "adapter.readout_tokens=['negative','positive']",
        "adapter.readout_center=true",
        "privacy.readout_center_noise=1.0",  # the tiny model is 32 wide: 23 chats suffice
        "federation.rounds=2",
        "federation.fraction_evaluate=0.0",
        "train.local_epochs=3.0",
        "train.lr=0.1",
    ]
    run = simulate_causal_lm(tmp_path, "centered", extra)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["server_loss"] for r in recs]
    # The tiny model's states all but lie on one direction (scale in the hundreds), so the bias
    # toward the answers moves slowly; it still moves, and round 0 is the base model.
    assert losses[0] > losses[1] > losses[2] and losses[2] < 0.75 * losses[0], losses
    report = json.loads((run / "privacy.json").read_text())["sample_level"]
    assert report["readout_direction"]["noise_multiplier"] == 1.0
    # The clients trained in their bases (each with the scale it released), and only then.
    assert in_basis and min(in_basis) > 1.0
    ledgers = sorted(run.rglob("ledger-*.json"))
    assert len(ledgers) == 3
    for path in ledgers:
        raw = json.loads(path.read_text())
        kinds = [e["kind"] for e in raw["entries"]]
        assert kinds == ["readout-direction", "dp-sgd", "dp-sgd"], kinds
        (kept,) = raw["readout_directions"].values()
        assert abs(float(np.linalg.norm(kept["direction"])) - 1.0) < 1e-9 and kept["scale"] >= 1
        history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in raw["entries"]]
        opacus = RDPAccountant()
        opacus.history = history
        spent = opacus.get_epsilon(delta=1e-5)
        name = raw["client_id"]
        assert recs[-1]["epsilon_per_client"][name] == pytest.approx(spent, rel=1e-9)
        assert 7.9 < spent <= 8.0 + 1e-6  # calibrated over the release and both rounds


def test_the_plan_counts_the_release_in_each_clients_epsilon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from privet.simulations.plan import make_plan

    from .inprocess_runs import causal_lm_recipe

    over = [
        *causal_lm_recipe(monkeypatch),
        "data.num_clients=3",
        "train.batch_size=16",
        "adapter.top_layers=0",
        "adapter.readout_tokens=['negative','positive']",
        "adapter.readout_center=true",
        "privacy.readout_center_noise=1.0",
        "federation.rounds=2",
    ]
    plan = make_plan(load_config(None, over), with_model=False)
    assert any("readout_center" in n and "at least 23" in n for n in plan.notes), plan.notes
    for client in plan.clients:  # 60 chats each, at least the 23 a 32-wide model needs
        assert client.noise_multiplier is not None and client.epsilon_planned is not None
        history = [
            (1.0, 1.0, 1),
            (client.noise_multiplier, client.sample_rate, 2 * client.steps_per_round),
        ]
        spent = epsilon_from_history(history, delta=1e-5, accountant="rdp")
        assert client.epsilon_planned == pytest.approx(spent, rel=1e-12)
        assert 7.9 < spent <= 8.0 + 1e-9
    plain = make_plan(load_config(None, [*over, "adapter.readout_center=false"]), with_model=False)
    assert all(  # without the release the same ε needs less noise
        c.noise_multiplier is not None and c.noise_multiplier < p.noise_multiplier  # type: ignore[operator]
        for c, p in zip(plain.clients, plan.clients, strict=True)
    )


def test_a_delta_the_data_makes_meaningless_refuses_the_release_first(tmp_path: Path) -> None:
    from privet.common.errors import PrivacyError

    calls: list[int] = []

    def measure() -> torch.Tensor:
        calls.append(1)
        return 4000 * _unit(9)

    with pytest.raises(PrivacyError, match=r"privacy.delta = 0.001 is not below 1 / n"):
        readout_direction(
            privacy=_privacy(delta=1e-3),
            num_examples=5000,
            hidden=32,
            key="m",
            measure=measure,
            state_dir=tmp_path,
            client_id="d",
            server_round=1,
        )
    assert calls == [] and not (tmp_path / "ledger-d.json").exists()
