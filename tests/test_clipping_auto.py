"""privacy.clipping = 'auto': book-keeping on CUDA when it covers every trainable layer, else flat."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

import privet.client.app as client_app
from privet.client import DPSettings, SitePolicy, train
from privet.client.policy import SitePrivacy, apply_policy
from privet.client.training import resolve_clipping
from privet.common.config import (
    AdapterConfig,
    ModelConfig,
    PrivetConfig,
    TrainConfig,
    load_config,
)
from privet.common.data import Examples, TokenizedExamples
from privet.common.errors import PrivacyError
from privet.common.modeling import build_model
from privet.common.protocol import CLIPPING, CLIPPING_CODES
from privet.server import RecordingStrategy
from privet.server.rundir.html_report import write_report

from .flower_fakes import NodesGrid, arrays, reply, run_identity
from .rundirs import RECORDS, make_run
from .test_ghost_clipping import TEXTS

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


def _lora() -> torch.nn.Module:
    built = build_model(
        ModelConfig(num_hidden_layers=1, max_length=32), AdapterConfig(), num_labels=2, seed=0
    )
    return built.model


def test_auto_is_the_default_and_a_site_accepts_it() -> None:
    assert PrivetConfig().privacy.clipping == "auto"
    assert "auto" in SitePolicy().privacy.clipping


def test_auto_resolves_by_device_and_coverage() -> None:
    model = _lora()
    assert resolve_clipping("auto", model=model, device=CPU) == "flat"
    assert resolve_clipping("auto", model=model, device=CUDA) == "bookkeeping"
    # a trainable layer book-keeping does not cover (a convolution): flat, on CUDA too
    conv = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Conv1d(4, 4, 1))
    assert resolve_clipping("auto", model=conv, device=CUDA) == "flat"
    conv[1].requires_grad_(False)  # frozen: nothing left uncovered
    assert resolve_clipping("auto", model=conv, device=CUDA) == "bookkeeping"
    # an explicit choice is kept as it is, wherever it runs
    for kind in ("flat", "ghost", "bookkeeping"):
        assert resolve_clipping(kind, model=conv, device=CPU) == kind
    with pytest.raises(ValueError, match="unknown clipping 'fast'"):
        resolve_clipping("fast", model=model, device=CPU)


def _data(built_tokenizer: object) -> TokenizedExamples:
    labels = np.array([i % 2 for i in range(len(TEXTS))], dtype=np.int64)
    return TokenizedExamples(Examples(texts=TEXTS, labels=labels), built_tokenizer, max_length=32)


def test_auto_on_a_cpu_trains_exactly_as_flat() -> None:
    """CPU behaviour is what it was before 'auto' existed: the same bytes, and the report says flat."""
    out = {}
    for clipping in ("flat", "auto"):
        built = build_model(
            ModelConfig(num_hidden_layers=1, max_length=32), AdapterConfig(), num_labels=2, seed=0
        )
        cfg = TrainConfig(batch_size=8, physical_batch_size=3)
        dp = DPSettings(
            noise_multiplier=1.0,
            max_grad_norm=0.5,
            sample_rate=0.5,
            steps=2,
            clipping=clipping,  # type: ignore[arg-type]
        )
        out[clipping] = train(built.model, _data(built.tokenizer), cfg, dp=dp, pad_token_id=0)
    assert out["auto"].clipping == out["flat"].clipping == "flat"
    for k, v in out["flat"].state.items():
        assert torch.equal(out["auto"].state[k], v), k
    assert out["auto"].train_loss == out["flat"].train_loss
    built = build_model(
        ModelConfig(num_hidden_layers=1, max_length=32), AdapterConfig(), num_labels=2, seed=0
    )
    plain = train(
        built.model, _data(built.tokenizer), TrainConfig(batch_size=8), dp=None, pad_token_id=0
    )
    assert plain.clipping is None


def test_the_client_logs_its_resolution_once(caplog: pytest.LogCaptureFixture) -> None:
    client_app._clipping_logged.discard("site-a")
    with caplog.at_level(logging.INFO, logger="privet"):
        for _ in range(3):
            client_app._log_clipping("auto", "bookkeeping", "site-a", CUDA)
        client_app._log_clipping("flat", "flat", "site-b", CPU)  # asked for: nothing to say
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "client site-a: privacy.clipping = 'auto' runs bookkeeping clipping "
        "(CUDA, every trainable layer covered)"
    ]


def test_each_round_records_the_clipping_every_client_ran() -> None:
    with run_identity():
        s = RecordingStrategy(
            FedAvg(min_train_nodes=1, min_available_nodes=1),
            client_names=["client-0", "client-1", "client-2"],
        )
        sent = {"a": [0.0, 0.0]}
        list(s.configure_train(1, arrays(sent), ConfigRecord({}), NodesGrid(range(1, 4))))
        s.aggregate_train(
            1,
            [
                reply(
                    1,
                    {"a": [1.0, 1.0]},
                    partition=0,
                    extra={CLIPPING: CLIPPING_CODES["bookkeeping"]},
                ),
                reply(2, {"a": [1.0, 1.0]}, partition=1, extra={CLIPPING: CLIPPING_CODES["flat"]}),
                reply(3, {"a": [1.0, 1.0]}, partition=2, extra={CLIPPING: 0}),  # no DP
            ],
        )
    assert s.current.clipping_per_client == {"client-0": "bookkeeping", "client-1": "flat"}
    assert s.current.as_json()["clipping_per_client"] == {
        "client-0": "bookkeeping",
        "client-1": "flat",
    }


def test_the_report_states_what_auto_resolved_to(tmp_path: Path) -> None:
    records = [dict(r) for r in RECORDS]
    records[1]["clipping_per_client"] = {"client-0": "bookkeeping", "client-1": "flat"}
    records[2]["clipping_per_client"] = {"client-0": "bookkeeping"}
    run_dir, _ = make_run(tmp_path, records=records, adapter=False)
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert (
        "Per-example clipping: privacy.clipping = &#x27;auto&#x27;; the clients ran "
        "bookkeeping (1 client), flat (1 client)."
    ) in page
    # a run directory written before the record existed says what was asked for
    old, _ = make_run(tmp_path / "old", records=RECORDS, adapter=False)
    assert "Per-example clipping: privacy.clipping = &#x27;auto&#x27;." in write_report(
        old
    ).read_text(encoding="utf-8")


def test_a_site_that_does_not_list_auto_runs_it_as_flat_or_refuses_it() -> None:
    cfg = load_config(None, ["model.num_hidden_layers=1", "privacy.target_epsilon=5"])
    assert cfg.privacy.clipping == "auto"
    own = SitePolicy(privacy=SitePrivacy(target_epsilon=6, clipping=("flat", "ghost")))
    site_cfg, _ = apply_policy(cfg, own)
    assert site_cfg.privacy.clipping == "flat"  # the site's own choice among what it allows
    site_cfg, _ = apply_policy(cfg, SitePolicy(privacy=SitePrivacy(target_epsilon=6)))
    assert site_cfg.privacy.clipping == "auto"  # the default site lists 'auto': kept
    strict = SitePolicy(privacy=SitePrivacy(target_epsilon=6, clipping=("bookkeeping",)))
    with pytest.raises(PrivacyError, match=r"privacy.clipping = 'auto'"):
        apply_policy(cfg, strict)
