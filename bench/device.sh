#!/bin/bash
# GPU benchmark runs on a lent device (carry .whl: pyzmq, msgpack, safetensors, tokenizers,
# jinja2, markupsafe, pytest and its deps), results and logs under $OUT.
#   bash bench/device.sh tests layer e2e    # 2+ GPUs: GPU tests, afd-bench layer, e2e
#   bash bench/device.sh sweep              # 4 or 8 GPUs: afd-bench sweep (the ratio sweep)
#   (e2e-timing: e2e without the LLM correctness runs; e2e-fp8-timing: the same with e4m3
#   experts and attention projections, as --quantization fp8 --fp8-attention serves them;
#   e2e-fp8-correctness: their greedy tokens disaggregated over NCCL against colocated)
# Each part has its own time limit, so a hang in one still leaves the others' results.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TRITON_INTERPRET=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L; python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.device_count())'
GPUS=$(nvidia-smi -L | wc -l)
TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o -i -E 'h100|h200' | tr A-Z a-z)
for part in "$@"; do
  case $part in
    tests) timeout 240 python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m gpu tests/ 2>&1 | tee "$OUT/tests.log"
           timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_transport_nccl.py 2>&1 | tee -a "$OUT/tests.log" ;;
    layer) timeout 300 python3 -m afd.bench.cli layer --out "$OUT/layer_$TAG.json" \
             --profile "$OUT/profile_$TAG.json" --profile-fp8 "$OUT/profile_fp8_$TAG.json" \
             2>&1 | tee "$OUT/layer.log" ;;
    e2e) timeout 400 python3 -m afd.bench.cli e2e --out "$OUT/e2e_${TAG}x2.json" 2>&1 | tee "$OUT/e2e.log" ;;
    e2e-timing) timeout 300 python3 -m afd.bench.cli e2e --skip-correctness \
             --out "$OUT/e2e_timing_${TAG}x2.json" 2>&1 | tee "$OUT/e2e.log" ;;
    e2e-fp8-timing) timeout 330 python3 -m afd.bench.cli e2e --fp8 --skip-correctness \
             --out "$OUT/e2e_fp8_timing_${TAG}x2.json" 2>&1 | tee "$OUT/e2e.log" ;;
    e2e-fp8-correctness) timeout 200 python3 -m afd.bench.cli e2e --fp8 --skip-timing \
             --out "$OUT/e2e_fp8_correctness_${TAG}x2.json" 2>&1 | tee "$OUT/e2e.log" ;;
    sweep) timeout 540 python3 -m afd.bench.cli sweep --gpus "$GPUS" --layers 4 --context 4096 \
             --batches 64,128,256,512,1024,2048,3072 --micro-batches 1,2,3 --tpot-ms 100,200,400,800 \
             --profile bench/results/profile_$TAG.json --out "$OUT/sweep_${TAG}x$GPUS.json" 2>&1 | tee "$OUT/sweep.log" ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
