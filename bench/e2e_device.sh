#!/bin/bash
# One call on nvidia-h200-x2 (carry .whl): transport tests (gloo + NCCL), afd-bench layer,
# afd-bench e2e; results and logs under $OUT. Each part has its own time limit so a hang in
# one still leaves the others' results.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L; python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.device_count())'
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_transport_nccl.py 2>&1 | tee "$OUT/tests.log"
timeout 150 python3 -m afd.bench.cli layer --out "$OUT/layer_h200.json" \
  --profile "$OUT/profile_h200.json" 2>&1 | tee "$OUT/layer.log"
timeout 240 python3 -m afd.bench.cli e2e --out "$OUT/e2e_h200x2.json" 2>&1 | tee "$OUT/e2e.log"
