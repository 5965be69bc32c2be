from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from privet.common.config import DataConfig
from privet.common.data import (
    FederatedData,
    build_federated_data,
    cached_federated_data,
    load_client_data,
    load_server_test,
    num_clients,
)
from privet.common.errors import DataError


def write_csv(path: Path, n: int, *, labels: int = 3, users: int = 5) -> Path:
    rows = ["text,label,user"]
    rows += [f"text number {i},{i % labels},user{i % users}" for i in range(n)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def fingerprint(data: FederatedData) -> list[list[str]]:
    out = [[*c.train.texts, "|", *c.test.texts] for c in data.clients]
    return [*out, data.server_test.texts]


def all_texts(data: FederatedData) -> list[str]:
    texts = list(data.server_test.texts)
    for c in data.clients:
        texts += c.train.texts + c.test.texts
    return texts


def test_iid_files_exact_counts(tmp_path: Path) -> None:
    f = write_csv(tmp_path / "a.csv", 100)
    cfg = DataConfig(source="files", train_files=[f], num_clients=4, client_test_fraction=0.2)
    data = build_federated_data(cfg)
    # 10 held out for the server, 90 shared 23/23/22/22, each split 80/20 (rounded).
    assert len(data.server_test) == 10
    assert [len(c.train) + len(c.test) for c in data.clients] == [23, 23, 22, 22]
    assert [len(c.test) for c in data.clients] == [5, 5, 4, 4]
    assert [c.name for c in data.clients] == ["client-0", "client-1", "client-2", "client-3"]
    assert data.num_labels == 3
    assert sorted(all_texts(data)) == sorted(f"text number {i}" for i in range(100))


def test_deterministic_and_seeded(tmp_path: Path) -> None:
    f = write_csv(tmp_path / "a.csv", 60)
    cfg = DataConfig(source="files", train_files=[f], partition="dirichlet", alpha=1.0)
    assert fingerprint(build_federated_data(cfg)) == fingerprint(build_federated_data(cfg))
    other = cfg.model_copy(update={"seed": 1})
    assert fingerprint(build_federated_data(other)) != fingerprint(build_federated_data(cfg))


def test_test_file_and_natural_clients(tmp_path: Path) -> None:
    f1 = write_csv(tmp_path / "a.csv", 30)
    f2 = write_csv(tmp_path / "b.csv", 20)
    test = write_csv(tmp_path / "t.csv", 7)
    cfg = DataConfig(
        source="files",
        train_files=[f1, f2],
        test_file=test,
        partition="natural",
        client_column="user",
        client_test_fraction=0.0,
    )
    data = build_federated_data(cfg)
    assert len(data.server_test) == 7
    assert [c.name for c in data.clients] == [f"user{i}" for i in range(5)]
    assert [len(c.train) for c in data.clients] == [10, 10, 10, 10, 10]
    assert all(set(c.train.keys["client"]) == {c.name} for c in data.clients)


def test_max_examples(tmp_path: Path) -> None:
    f = write_csv(tmp_path / "a.csv", 500)
    cfg = DataConfig(source="files", train_files=[f], max_examples=50, num_clients=2)
    data = build_federated_data(cfg)
    assert len(all_texts(data)) == 50
    assert len(data.server_test) == 5


def test_num_labels_given_and_inferred(tmp_path: Path) -> None:
    f = write_csv(tmp_path / "a.csv", 40, labels=2)
    cfg = DataConfig(source="files", train_files=[f], num_clients=2)
    assert build_federated_data(cfg).num_labels == 2
    # A larger num_labels is the user's decision to keep classes the data does not show.
    cfg5 = cfg.model_copy(update={"num_labels": 5})
    assert build_federated_data(cfg5).num_labels == 5
    f3 = write_csv(tmp_path / "b.csv", 40, labels=4)
    bad = DataConfig(source="files", train_files=[f3], num_labels=2, num_clients=2)
    with pytest.raises(DataError, match="num_labels = 2"):
        build_federated_data(bad)


def test_too_few_examples(tmp_path: Path) -> None:
    f = write_csv(tmp_path / "a.csv", 12)
    cfg = DataConfig(source="files", train_files=[f], num_clients=20)
    with pytest.raises(DataError, match="fewer examples than clients"):
        build_federated_data(cfg)
    tiny = write_csv(tmp_path / "b.csv", 3)
    cfg = DataConfig(source="files", train_files=[tiny], num_clients=1)
    with pytest.raises(DataError, match="server test set"):
        build_federated_data(cfg)


def test_cached_helpers(tmp_path: Path) -> None:
    f = write_csv(tmp_path / "a.csv", 80)
    cfg = DataConfig(source="files", train_files=[f], num_clients=3)
    first = load_client_data(cfg, 1)
    # An equal (not identical) config hits the cache: same object back.
    assert load_client_data(DataConfig.model_validate(cfg.model_dump()), 1) is first
    assert cached_federated_data(cfg).clients[1] is first
    assert num_clients(cfg) == 3
    assert len(load_server_test(cfg)) == 8
    assert first.train.texts == build_federated_data(cfg).clients[1].train.texts
    with pytest.raises(DataError, match="out of range"):
        load_client_data(cfg, 3)
    natural = cfg.model_copy(update={"partition": "natural", "client_column": "user"})
    assert num_clients(natural) == 5


def test_labels_are_consistent(tmp_path: Path) -> None:
    f = write_csv(tmp_path / "a.csv", 90)
    data = build_federated_data(DataConfig(source="files", train_files=[f], num_clients=3))
    for c in data.clients:
        for text, label in zip(c.train.texts, c.train.labels, strict=True):
            assert int(text.rsplit(" ", 1)[1]) % 3 == label
        assert c.train.labels.dtype == np.int64


def write_rows(path: Path, labels: list[str]) -> Path:
    rows = ["text,label"] + [f"{path.stem} text {i},{label}" for i, label in enumerate(labels)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_named_labels_one_mapping(tmp_path: Path) -> None:
    f = write_rows(tmp_path / "a.csv", ["spam", "ham"] * 10)
    t = write_rows(tmp_path / "t.csv", ["ham", "spam", "eggs"])
    data = build_federated_data(DataConfig(source="files", train_files=[f], test_file=t))
    assert data.label_names == ("eggs", "ham", "spam") and data.num_labels == 3
    assert data.server_test.labels.tolist() == [1, 2, 0]
    given = DataConfig(
        source="files", train_files=[f], test_file=t, label_names=["spam", "ham", "eggs"]
    )
    assert build_federated_data(given).server_test.labels.tolist() == [1, 0, 2]


def test_by_file_one_client_per_file_in_file_order(tmp_path: Path) -> None:
    files = [
        write_rows(tmp_path / f"{name}.csv", ["0", "1"] * n)
        for name, n in [("zurich", 5), ("bern", 8), ("geneva", 6)]
    ]
    cfg = DataConfig(source="files", train_files=files, partition="by_file", client_test_fraction=0)
    data = build_federated_data(cfg)
    assert [c.name for c in data.clients] == ["zurich", "bern", "geneva"]
    assert num_clients(cfg) == 3
    for client in data.clients:
        assert {t.split(" ")[0] for t in client.train.texts} == {client.name}
    assert sum(len(c.train) for c in data.clients) + len(data.server_test) == 38


def test_one_class_and_label_gaps_refused(tmp_path: Path) -> None:
    one = write_rows(tmp_path / "one.csv", ["spam"] * 20)
    with pytest.raises(DataError, match=r"only one class \(label spam\).*Fix: add examples"):
        build_federated_data(DataConfig(source="files", train_files=[one]))
    gaps = write_rows(tmp_path / "gaps.csv", ["0", "1", "7"] * 10)
    with pytest.raises(DataError, match=r"classes 2, 3, 4, 5, 6 never occur.*8 outputs"):
        build_federated_data(DataConfig(source="files", train_files=[gaps]))
    # An explicit num_labels is the user's decision to keep the unused classes.
    kept = build_federated_data(DataConfig(source="files", train_files=[gaps], num_labels=8))
    assert kept.num_labels == 8
