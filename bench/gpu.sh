#!/usr/bin/env bash
# jpeft against HF PEFT on one GPU, in bfloat16, on a machine without network access:
#
#   bash bench/gpu.sh [OUT]        # results in OUT (default: $OUT, else bench/results)
#
# It installs nothing from the network. It needs a python3 with CUDA builds of jax and
# torch, and transformers, peft, optax, orbax-checkpoint, safetensors and ml_dtypes (the
# lent GPU machines' image has them); wheels in .whl/ beside the tree (e.g. bitsandbytes,
# for the QLoRA row) go into a private folder first. The models are random weights of
# SmolLM2-135M's and TinyLlama-1.1B's shapes, built with transformers (the SmolLM2 GGUF
# package is larger than what travels to such a machine). Both frameworks compute in
# bfloat16: jpeft's attention through jax.nn.dot_product_attention (cuDNN where it
# applies), HF's through torch SDPA. About 8 minutes on an H100; each run is bounded.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results}}
python=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/jpeft-bench-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/jpeft-bench-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX's peak is what it used, not a 75% pool
export TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$python" - <<'PY' || exit 1
import jax, torch
print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__)
if jax.default_backend() != "gpu" or not torch.cuda.is_available():
    raise SystemExit("bench/gpu.sh: JAX or torch sees no GPU here; nothing was measured")
PY

variants=lora
if "$python" -c "import bitsandbytes" 2>/dev/null; then variants=lora,qlora; fi
common=(--device gpu --jpeft-dtype bfloat16 --hf-dtype bfloat16 --qlora-compute bfloat16
        --steps 10 --warmup 3 --out "$out" --tag gpu)
status=0
timeout 180 "$python" -m bench.compare --model smollm2-shape --variants "$variants,long" \
  "${common[@]}" || status=1
timeout 300 "$python" -m bench.compare --model tinyllama --variants "$variants" \
  --batch 4 --seq 512 "${common[@]}" || status=1
exit $status
