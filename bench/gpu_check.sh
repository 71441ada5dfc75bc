#!/usr/bin/env bash
# The GPU checks in one short call on a machine with torch + CUDA and transformers, but no weights,
# no network and no pydantic or PyYAML (the device tool's image): the step's MFU for a
# Llama-3.2-1B-shaped model under FSDP2 at batch 32 x 256 tokens (target >= 35%), and for a
# SmolLM2-135M-shaped one at the default batch of 8 pairs, eager and with compiled blocks
# (target >= 25%). Random weights; the tiny model's tokenizer, built on the spot.
#
#   bash bench/gpu_check.sh --wheels     # here, online: the wheels it may need, in .whl/ (ignored)
#   bash bench/gpu_check.sh              # there (carrying .whl/); rows in $OUT (default outputs/gpu)
#
# A dry run on CPU, small: DEVICE=cpu BIG_SHAPE=smollm2-135m BIG_BATCH=1 LENGTH=32 STEPS=1 \
#   SMALL_BATCH=1 bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if [[ "${1:-}" == "--wheels" ]]; then
  for version in 3.10 3.11 3.12 3.13; do
    "$PY" -m pip download -q --only-binary=:all: --platform manylinux2014_x86_64 \
      --python-version "$version" -d .whl pydantic pyyaml
  done
  ls .whl
  exit 0
fi

# what the library imports beyond torch and transformers (scipy and scikit-learn are in the image)
missing=$("$PY" - <<'EOF'
import importlib.util
needed = {"pydantic": "pydantic", "yaml": "pyyaml", "scipy": "scipy", "sklearn": "scikit-learn"}
print(" ".join(package for module, package in needed.items() if importlib.util.find_spec(module) is None))
EOF
)
if [[ -n "${missing// }" ]]; then
  "$PY" -m pip install -q --no-index --find-links .whl $missing \
    || { echo "error: $missing missing and not installable from .whl (bench/gpu_check.sh --wheels)" >&2; exit 2; }
fi

DEVICE=${DEVICE:-cuda}
OUT=${OUT:-outputs/gpu}
STEPS=${STEPS:-10}
mkdir -p "$OUT"
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

run() {  # name, then bench/step.py's arguments
  local name=$1; shift
  echo "== $name"
  "$PY" bench/step.py --models tiny --random-init --device "$DEVICE" --methods pdu --steps "$STEPS" \
    --json "$OUT/$name.json" "$@"
}
run big --shape "${BIG_SHAPE:-llama3.2-1b}" --fsdp --batch-size "${BIG_BATCH:-32}" --length "${LENGTH:-256}" \
  --paths fused+split+bf16
run small --shape smollm2-135m --batch-size "${SMALL_BATCH:-8}" --paths fused+split+bf16 fused+split+bf16+compile
run small_fsdp --shape smollm2-135m --fsdp --batch-size "${SMALL_BATCH:-8}" --paths fused+split+bf16
