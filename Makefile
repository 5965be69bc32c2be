# privet: two commands on a fresh machine.
#   make demo   creates .venv, installs, runs the default federation (DP on, MiniLM, VADER sentiment)
#   make test   same set-up, then ruff, ruff format --check, mypy --strict, pytest
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.privet-installed
# torch is installed first and pinned. On an ordinary Linux machine PyPI's torch==2.13.0 is the CUDA
# build (about 20 extra nvidia-* packages, gigabytes); a CPU-only machine can take the CPU build from
# PyTorch's index without editing this file:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export FLWR_TELEMETRY_ENABLED ?= 0
export PYTHONUNBUFFERED ?= 1

.PHONY: install demo test lint types pytest clean bench mutants

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]" --config-settings editable_mode=strict
	touch $(STAMP)

install: $(STAMP)
	@# strict editable installs list files at install time: refresh so new modules are found
	@$(PY) -m pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict >/dev/null 2>&1 || true
	@# `privet server` puts nginx in front of Flower's SuperLink (only the Fleet API is public)
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || echo "note: \`privet server\` needs nginx: apt-get install nginx-light"

demo: install
	$(VENV)/bin/privet simulate $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

types: install
	$(VENV)/bin/mypy

# Two workers: half the suite waits on processes (SuperLink polls, Ray start-up), not on the CPU.
# Each module stays on one worker (tests/conftest.py); PYTEST_ARGS="-n 0" runs them in one process.
PYTEST_ARGS ?=
pytest: install
	$(VENV)/bin/pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

test: lint types pytest

# Mutation testing of the privacy-critical code (docs/testing.md), not part of `make test`: mutmut
# mutates MUTANT_MODULES in a scratch copy laid out as privet/... (.mutants/tree) and runs, per mutant,
# the tests that call the mutated function (tests/mutation.py maps modules to tests; MUTANT_TESTS=
# "tests/test_x.py" overrides). On two shared cores: mechanism 1-4 min, ledger ~30, accountant ~1 h.
# Clipping, noise and client-level aggregation: MUTANT_MODULES="client/bookkeeping.py
# client/training.py client/client_level.py server/privacy.py common/privacy/federation.py";
# the privacy report's writer: MUTANT_MODULES="server/rundir/privacy_report.py".
MUTANT_MODULES ?= common/privacy/mechanism.py common/privacy/ledger.py common/privacy/accounting.py
mutants: install
	nice -n 10 $(PY) tests/mutation.py $(MUTANT_MODULES)

# Benchmarks (docs/benchmarks.md): each writes benchmarks/results/<name>.json; the report prints
# one table and writes it into docs/benchmarks.md. BENCH_ARGS="--device cuda" on a GPU machine.
BENCHES    ?= bench_dp bench_federation bench_flower bench_comm bench_scale bench_secagg
BENCH_ARGS ?=
# With --device cuda: the GPU suite (benchmarks/gpu_suite.py: every figure of issue 15, each stage
# under its own time limit) into benchmarks/results/gpu/, and its own section of docs/benchmarks.md.
bench: install
ifneq (,$(findstring cuda,$(BENCH_ARGS)))
	$(PY) benchmarks/gpu_suite.py $(BENCH_ARGS)
	$(PY) benchmarks/report.py --gpu --write-docs
else
	@for b in $(BENCHES); do echo "== $$b"; $(PY) benchmarks/$$b.py $(BENCH_ARGS) || exit 1; done
	$(PY) benchmarks/report.py --write-docs
endif

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
