"""The package layout, the import rules between roles, and each package's public surface."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {
    "common": "privet.common",
    "client": "privet.client",
    "server": "privet.server",
    "simulations": "privet.simulations",
}


def _imports(folder: str) -> set[str]:
    names: set[str] = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
    return names


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("common", ("privet.client", "privet.server", "privet.simulations")),
        ("client", ("privet.server", "privet.simulations")),
        ("server", ("privet.client", "privet.simulations")),
    ],
)
def test_layers_point_one_way(folder: str, forbidden: tuple[str, ...]) -> None:
    bad = {m for m in _imports(folder) if m.startswith(forbidden)}
    assert not bad, f"{folder}/ imports {bad}"


def test_no_bare_folder_imports() -> None:
    for folder in FOLDERS:
        bad = {m for m in _imports(folder) if m.split(".")[0] in FOLDERS}
        assert not bad, f"{folder}/ imports {bad}; use privet.<name>"


def test_training_code_imports_no_flower() -> None:
    code = (
        "import sys, privet.client.training, privet.client.privacy, privet.client; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'flwr'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_every_subpackage_is_installed() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert listed == found


PUBLIC = {
    "privet.common": [
        "AdapterConfig",
        "AggregationConfig",
        "BudgetExhaustedError",
        "BuiltModel",
        "ConfigError",
        "DataConfig",
        "DataError",
        "FaultsConfig",
        "FederationConfig",
        "ModelConfig",
        "ModelError",
        "PrivacyConfig",
        "PrivacyError",
        "PrivetConfig",
        "PrivetError",
        "SimulationConfig",
        "TrainConfig",
        "UpdateError",
        "build_model",
        "config_reference",
        "dump_config",
        "load_config",
        "load_trainable_state",
        "trainable_state",
    ],
    "privet.client": [
        "DPSettings",
        "DataSource",
        "EvalResult",
        "Participant",
        "ParticipantStatus",
        "RoundPrivacy",
        "SitePolicy",
        "TrainResult",
        "evaluate",
        "ledger_path",
        "make_client_app",
        "plan_round",
        "plan_steps",
        "record_round",
        "to_examples",
        "train",
    ],
    "privet.server": [
        "RecordingStrategy",
        "RoundObserver",
        "RoundRecord",
        "build_strategy",
        "create_run_dir",
        "load_checkpoint",
        "make_reply_checks",
        "make_server_app",
        "read_metrics",
        "run_rounds",
        "save_checkpoint",
    ],
    "privet.simulations": ["simulate"],
    "privet.simulations.studies": [
        "run_privacy_utility_study",
        "run_robustness_study",
        "study_app",
    ],
}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_public_surface_is_pinned(package: str) -> None:
    module = __import__(package, fromlist=["__all__"])
    assert sorted(module.__all__) == sorted(PUBLIC[package])
    for name in module.__all__:
        assert getattr(module, name) is not None
