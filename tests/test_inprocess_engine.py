"""The in-process engine needs none of Flower's simulation extras (a GPU machine may lack them)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# Runs in a fresh interpreter: importing ray, fastapi, uvicorn or sqlalchemy fails there, as on a
# machine where `flwr[simulation]` is not installed.
SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = ("ray", "fastapi", "uvicorn", "sqlalchemy")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked for this test: {name}")
            return None

    sys.meta_path.insert(0, Block())
    from privet.common.config import load_config
    from privet.simulations import simulate

    cfg = load_config(None, [
        "model.num_hidden_layers=1", "model.max_length=32", "data.max_examples=200",
        "data.num_clients=3", "federation.rounds=2", "federation.fraction_evaluate=0",
        "train.batch_size=16", "simulation.engine='inprocess'",
        f"simulation.output_dir='{sys.argv[1]}'", "simulation.run_name='noextras'",
    ])
    run_dir = simulate(cfg, preflight=False)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"run_dir": str(run_dir), "loaded": loaded}))
    """
)


def test_inprocess_federation_runs_without_flower_simulation_extras(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    lines = (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [0, 1, 2]
