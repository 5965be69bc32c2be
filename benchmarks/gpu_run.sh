#!/usr/bin/env bash
# The GPU suite on a bare GPU machine (../shared/GPU.md): no network, no venv, torch/transformers/peft
# already installed. Carried beside the tree: .whl/ (wheels for Python 3.12; .whl/optional/ only
# installed when the machine lacks the module) and .gpu/ (the MiniLM folder, the VADER cache).
#
#   OUT=/some/dir bash benchmarks/gpu_run.sh [gpu_suite.py options]
#
# Everything goes under $OUT: env.txt (versions, GPU), gpu/ (the suite's JSON and per-stage logs).
#
# .whl/ holds, besides ../shared/GPU.md's list, torchao for the llm_quant stage
# (model.base_quantization): `pip download --no-deps --only-binary=:all: --python-version 3.12
# --implementation cp --platform manylinux_2_28_x86_64 -d .whl torchao==0.18.0` (3.4 MB; its
# optional CUDA kernels are not used). Without it llm_quant reports itself skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the results}
mkdir -p "$OUT"
SITE=$PWD/.site
rm -rf "$SITE" && mkdir -p "$SITE/privet"
python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl 2>&1 | tail -3
# optional wheels: only for modules this machine does not have (never shadow its own scipy)
for mod in scipy opt_einsum pathspec prompt_toolkit wcwidth shellingham; do
  if ! python3 -c "import $mod" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/optional/"$mod"-*.whl 2>&1 | tail -3
  fi
done
# privet itself, as the installed package layout (privet.common -> common/, ...) without a build
for pkg in common client server simulations; do ln -s "$PWD/$pkg" "$SITE/privet/$pkg"; done
export PYTHONPATH=$SITE
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 TOKENIZERS_PARALLELISM=false
[ -d .gpu/cache ] && export PRIVET_CACHE_DIR=$PWD/.gpu/cache
MINILM=()
[ -d .gpu/minilm ] && MINILM=(--minilm .gpu/minilm)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import privet.common; print('privet from', privet.common.__file__)" 2>&1
  python3 -c "import torch, transformers, peft, flwr, opacus, pydantic, scipy; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available()); \
import importlib.util as u; print('torchao', u.find_spec('torchao') is not None); \
print('transformers', transformers.__version__, 'peft', peft.__version__, 'flwr', flwr.__version__, \
'opacus', opacus.__version__, 'pydantic', pydantic.__version__, 'scipy', scipy.__version__)" 2>&1
} > "$OUT/env.txt"
cat "$OUT/env.txt"
# DEVICE=cpu with --quick: the same steps as a dry run on a machine without a GPU
mkdir -p "$OUT/gpu"
# NAME=gpu-quant (with --stages llm_quant): the result file is gpu/$NAME.json
NAME=${NAME:-gpu}
python3 benchmarks/gpu_suite.py --device "${DEVICE:-cuda}" --out "$OUT/gpu" --name "$NAME" \
  ${MINILM[@]+"${MINILM[@]}"} "$@" > "$OUT/gpu/suite.log" 2>&1
rc=$?
grep -e '^==' -e '^   ' "$OUT/gpu/suite.log"
# the figures, one line each (the rich tables are in suite.log)
python3 - "$OUT/gpu/$NAME.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
for r in doc["rows"]:
    v = r["value"]
    v = f"{v:.4g}" if isinstance(v, float) else v
    met = {True: "yes", False: "NO", None: ""}[r["met"]]
    print(f"{r['metric']} | {v} {r['unit']} | {r['goal']} {met}".rstrip())
PY
exit $rc
