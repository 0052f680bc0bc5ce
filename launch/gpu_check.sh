#!/usr/bin/env bash
# The GPU check: MFU of the generation training step at a ~1 B-class size in bf16, then text-to-image
# decode speed of star_jax against the PyTorch reference loop at the `3b` shape with random weights.
#
#   bash launch/gpu_check.sh          # on one GPU (sized for <= 8 minutes on one H100); needs a venv with
#                                     # the CUDA build of the pinned jax (README, Install) and [torch]
#   bash launch/gpu_check.sh --tiny   # the same two benchmarks at tiny sizes, on any device (a test runs it)
#
# Both parts are `python -m star_jax.bench` commands, printed before they run:
#   1. bench train --sizes 1b --notorch: the trainer's jitted generation step (frozen base, trainable
#      stack + adapter + head, AdamW), hidden 2048, 16 base + 4 stack layers, 576 image tokens; prints
#      tokens/s and MFU against the card's spec bf16 peak (and against a matmul measured in the run).
#   2. bench generate --sizes 3b: the compiled CFG decode loop against the PyTorch reference loop
#      (transformers Qwen2 layers) on the same random weights. The reference runs where
#      star_jax.bench.torch_reference runs it (torch on the host CPU, all cores: a weight-streaming
#      loop is fastest there with every core); at 3b a 64-token image keeps it inside the budget,
#      GPU_CHECK_TOKENS=576 times a full image.
# Environment: PYTHON (default .venv/bin/python when present, else python3), GPU_CHECK_TOKENS,
# GPU_CHECK_BATCH (train sequences per step, default 16).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tiny=0
for arg in "$@"; do
  case "$arg" in
    --tiny) tiny=1 ;;
    -h | --help)
      sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "gpu_check.sh: unknown argument '$arg' (known: --tiny, --help)" >&2
      exit 2
      ;;
  esac
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
if [ "$tiny" = 1 ]; then
  train=(--sizes tiny --repeats 1 --torch_threads 1)
  generate=(--sizes tiny --batch 1 --tokens "${GPU_CHECK_TOKENS:-4}" --prompt 8 --repeats 1 --torch_threads 1)
else
  train=(--sizes 1b --batch "${GPU_CHECK_BATCH:-16}" --repeats 5 --notorch)
  generate=(--sizes 3b --batch 4 --tokens "${GPU_CHECK_TOKENS:-64}" --repeats 2 --torch_threads "$(nproc)")
fi
"$PYTHON" - <<'EOF'
import jax
print(f"gpu_check: jax {jax.__version__}, backend {jax.default_backend()}, devices {[d.device_kind for d in jax.devices()]}")
EOF
start=$SECONDS
echo "+ python -m star_jax.bench train ${train[*]}"
"$PYTHON" -m star_jax.bench train "${train[@]}"
echo "+ python -m star_jax.bench generate ${generate[*]}"
"$PYTHON" -m star_jax.bench generate "${generate[@]}"
echo "gpu_check: done in $((SECONDS - start)) s"
