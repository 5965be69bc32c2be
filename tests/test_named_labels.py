"""A real (tiny, in-process) run on per-site CSV files whose labels are names: one client per file,
the mapping recorded in the run directory and carried into the export's ``id2label``."""

from __future__ import annotations

import json
from pathlib import Path

from privet.common.config import load_config
from privet.simulations.export import export_run
from privet.simulations.run import simulate


def _site(path: Path, n: int) -> Path:
    rows = ["text,label"]
    rows += [
        f"win a prize now {i},spam" if i % 2 else f"see you at lunch {i},ham" for i in range(n)
    ]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_named_labels_by_file_end_to_end(tmp_path: Path) -> None:
    files = [_site(tmp_path / "bern.csv", 24), _site(tmp_path / "aarau.csv", 20)]
    listed = ", ".join(f"'{f}'" for f in files)
    cfg = load_config(
        None,
        [
            "model.num_hidden_layers=1",
            "model.max_length=16",
            "data.source='files'",
            f"data.train_files=[{listed}]",
            "data.partition='by_file'",
            "data.server_test_fraction=0.2",
            "federation.rounds=1",
            "train.batch_size=8",
            "privacy.enabled=false",
            "simulation.engine='inprocess'",
            f"simulation.output_dir='{tmp_path / 'runs'}'",
            "simulation.run_name='names'",
        ],
    )
    run_dir = simulate(cfg)
    assert json.loads((run_dir / "labels.json").read_text()) == {
        "num_labels": 2,
        "label_names": ["ham", "spam"],
    }
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = rounds[-1]
    assert set(trained["clients_trained"]) == {"bern", "aarau"}, trained
    out = export_run(run_dir, out=tmp_path / "model")
    config = json.loads((out.out / "config.json").read_text())
    assert config["id2label"] == {"0": "ham", "1": "spam"}
