#!/usr/bin/env bash
# One call on a lent GPU machine: install the carried wheels, run the CUDA tests, then the GPU SAE benchmark.
#
#   (here)  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl <pure-python deps>
#           mkdir -p .tok/interp-cache/tokenizers && cp -r ~/.cache/interp/tokenizers/smollm2-135m .tok/interp-cache/tokenizers/
#   (there) bash benchmarks/gpu_session.sh [tests|bench|all|next] [extra benchmark args]
#
# next: the opt-in kernels prepared blind (INTERP_TRITON_TOPK=lanes, INTERP_TRITON_FUSED=1): their
#       CUDA tests, their parts at batch 4096 and 65536, and the 768 x 32k step at batch 65536 with
#       each switch on and off (about 6 min). Flip the defaults only on what this measures.
#
# The machine's image has torch + Triton but not transformer-lens and a few pure-Python deps; the
# project itself runs from the checkout (PYTHONPATH). Logs go to $OUT when set.
set -uo pipefail
what=${1:-all}
shift || true
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD:$PWD/tests" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export INTERP_CACHE="$PWD/.tok/interp-cache"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
rc=0
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_sae_kernels.py tests/test_sae_step.py 2>&1 | tee "$OUT/cuda_tests.log"
  rc=${PIPESTATUS[0]}
fi
if [[ $what == bench || $what == all ]]; then
  python3 benchmarks/cuda_parts.py --d-in 768 --latents 32768 --batch 4096 2>&1 | tee "$OUT/parts.log"
  big="--device cuda --d-in 768 --latents 32768 --steps 30 --warmup 3 --skip dense"
  python3 benchmarks/sae_train.py $big --profile "$@" 2>&1 | tee "$OUT/bench_768.log"
  for v in INTERP_TRITON=0; do
    echo "== $v"; env $v python3 benchmarks/sae_train.py $big --skip dense sparsify "$@" 2>&1 | tail -2
  done 2>&1 | tee "$OUT/variants.log"
  python3 benchmarks/sae_train.py $big --batch 16384 --steps 10 "$@" 2>&1 | tee "$OUT/bench_768_b16k.log"
  # eai-sparsify's default step: 32 sequences x 2048 tokens
  python3 benchmarks/sae_train.py $big --batch 65536 --steps 5 --warmup 2 "$@" 2>&1 | tee "$OUT/bench_768_b64k.log"
  python3 benchmarks/sae_train.py --device cuda --latents 4096 16384 --steps 30 --warmup 3 "$@" 2>&1 | tee "$OUT/bench_576.log"
fi
if [[ $what == next ]]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "lane_group or latent_backward or fused_cuda_step" 2>&1 | tee "$OUT/next_tests.log"
  rc=${PIPESTATUS[0]}
  for b in 4096 65536; do
    python3 benchmarks/cuda_parts.py --d-in 768 --latents 32768 --batch $b 2>&1 | tee "$OUT/next_parts_$b.log"
  done
  big="--device cuda --d-in 768 --latents 32768 --batch 65536 --steps 5 --warmup 2"
  python3 benchmarks/sae_train.py $big --skip dense "$@" 2>&1 | tee "$OUT/next_base.log"
  for v in INTERP_TRITON_TOPK=lanes INTERP_TRITON_FUSED=1 "INTERP_TRITON_TOPK=lanes INTERP_TRITON_FUSED=1"; do
    echo "== $v"; env $v python3 benchmarks/sae_train.py $big --skip dense sparsify "$@" 2>&1 | tail -2
  done 2>&1 | tee "$OUT/next_variants.log"
fi
exit $rc
