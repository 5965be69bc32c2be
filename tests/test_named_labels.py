"""A real (tiny, in-process) run on per-site CSV files whose labels are names: one client per file,
the mapping recorded in the run directory and carried into the export's ``id2label``."""

from __future__ import annotations

import json
from pathlib import Path

from privet.common.config import load_config
from privet.server.rundir.export import export_run
from privet.server.rundir.report import round_progress
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
    # The clients' progress files, which the console polls inside a round.
    progress = run_dir / "clients" / "progress"
    assert round_progress(progress, 1) == "2 of 2 clients done"
    steps = json.loads((progress / "bern.json").read_text())
    assert steps["done"] and steps["round"] == 1 and steps["step"] == steps["steps"] > 0
    out = export_run(run_dir, out=tmp_path / "model")
    config = json.loads((out.out / "config.json").read_text())
    assert config["id2label"] == {"0": "ham", "1": "spam"}


def test_round_progress_line(tmp_path: Path) -> None:
    def put(name: str, **rec: object) -> None:
        (tmp_path / f"{name}.json").write_text(json.dumps(rec))

    assert round_progress(tmp_path, 2) == ""
    put("client-0", round=2, step=40, steps=40, done=True)
    put("client-1", round=2, step=12, steps=40, done=False)
    put("client-2", round=1, step=40, steps=40, done=True)  # last round's file: not counted
    (tmp_path / "client-3.json").write_text('{"round": 2, "st')  # half-written: skipped
    assert round_progress(tmp_path, 2) == "1 of 2 clients done, client-1 12/40 steps"
    # Before training, a centered readout counts the examples it has measured.
    put("client-4", round=2, step=300, steps=4318, done=False, unit="examples measured")
    assert round_progress(tmp_path, 2) == (
        "1 of 3 clients done, client-1 12/40 steps, client-4 300/4318 examples measured"
    )
