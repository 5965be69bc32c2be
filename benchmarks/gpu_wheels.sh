#!/usr/bin/env bash
# Fill .whl/ with the wheels benchmarks/gpu_run.sh installs on a bare GPU machine (Python 3.12,
# nothing downloadable there; ../shared/GPU.md). Run it here, where PyPI is reachable, then carry
# .whl (it must fit the 64 MiB carry limit with the tree: about 20 MB).
#
#   bash benchmarks/gpu_wheels.sh          # then: run(command="OUT=$OUT bash benchmarks/gpu_run.sh ...",
#                                          #           carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
mkdir -p .whl
dl() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_24_x86_64 --platform any -d .whl "$@"
}
# what the GPU machine lacks (../shared/GPU.md), pinned as privet is tested
dl flwr==1.41.0 opacus==1.6.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types \
  typing-inspection platformdirs tomli tomli-w cryptography==50.0.2 cffi==2.1.1 pycparser \
  pycryptodome==3.24.1 grpcio-health-checking iterators==0.0.2 typer==0.20.1
# model.base_quantization (the llm_quant stage): torchao, 3.4 MB, built for torch 2.11
dl torchao==0.18.0
# privet itself is not a wheel here: gpu_run.sh links the carried tree in, so it is never stale
du -sh .whl
