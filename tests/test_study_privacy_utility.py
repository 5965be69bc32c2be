"""The privacy-utility study's rows, table and outputs (no training: hand-made outcomes)."""

from __future__ import annotations

import json

import pytest
import typer

from privet.common.config import load_config
from privet.simulations.studies.privacy_utility import (
    COMMON,
    ROWS,
    UtilityRow,
    _fresh,
    table,
    write_outputs,
)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_every_row_is_a_valid_config_of_its_kind(row: UtilityRow) -> None:
    cfg = load_config(None, [*COMMON, *row.overrides])
    assert cfg.privacy.enabled == row.dp.startswith("sample-level")
    assert cfg.privacy.client_level.enabled == row.dp.startswith("client-level")
    if row.setting == "centralized":
        assert cfg.data.num_clients == 1
        assert cfg.data.max_examples == 6000  # the same samples as the 4-client federation


def test_the_centralized_row_takes_the_federations_optimizer_steps() -> None:
    # 4 clients x 0.5 epochs of a quarter of the data each, or 1 client x 0.5 epochs of all of it
    fed = load_config(None, [*COMMON, *_fresh(["nodp"])[0].overrides])
    central = load_config(None, [*COMMON, *_fresh(["central_nodp"])[0].overrides])
    assert fed.train.local_epochs == central.train.local_epochs
    assert fed.train.batch_size == central.train.batch_size
    assert fed.federation.rounds == central.federation.rounds


def test_unknown_rows_are_named() -> None:
    with pytest.raises(typer.BadParameter, match=r"unknown row\(s\) \['eps9'\]"):
        _fresh(["eps8", "eps9"])


def test_table_and_outputs(tmp_path) -> None:
    rows = [
        UtilityRow("eps8", "federated", "IID, 4 clients", "sample-level ε=8", [],
                   accuracy=[0.5, 0.6, 0.7, 0.8], epsilon=7.9971, noise=0.63125),
        UtilityRow("nodp", "federated", "IID, 4 clients", "none", [],
                   accuracy=[0.5, 0.65, 0.75, 0.85], epsilon=0.0),
        UtilityRow("clientlevel", "federated", "1,000 clients", "client-level ε=8", [],
                   accuracy=[0.5, 0.55], federation_epsilon=7.996, noise=0.5656),
    ]  # fmt: skip
    assert table(rows).splitlines() == [
        "| setting | partition | DP | noise | round 1 | round 2 | round 3 | final ε |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        "| federated | IID, 4 clients | sample-level ε=8 | σ = 0.631 | 60.00% | 70.00% | **80.00%**"
        " | 7.997 (per client, max) |",
        "| federated | IID, 4 clients | none | - | 65.00% | 75.00% | **85.00%** | - |",
        "| federated | 1,000 clients | client-level ε=8 | z = 0.566 | **55.00%** | - | - "
        "| 7.996 (federation) |",
    ]
    write_outputs(rows, out=tmp_path, extra=["train.seed=1"])
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [r["final"] for r in doc["rows"]] == [0.8, 0.85, 0.55]
    assert doc["extra"] == ["train.seed=1"]
    assert (tmp_path / "privacy-utility.png").stat().st_size > 10_000
    assert (tmp_path / "privacy-utility.md").read_text() == table(rows)
