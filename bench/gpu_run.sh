#!/usr/bin/env bash
# The prepared GPU run (issue 6): on a lent GPU machine, from the repository root, with `.whl`
# (the wheels reembed needs beyond that machine's image) and `.gpu/models` (model configs and
# tokenizers) carried. Writes $OUT/gpu.json, $OUT/BENCHMARKS.md and $OUT/run.log.
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export REEMBED_TEST_SHARED="$PWD/.gpu/shared"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, sentence_transformers, chromadb, celery; print(torch.__version__, sentence_transformers.__version__, chromadb.__version__, celery.__version__, torch.cuda.get_device_name(0))"
python3 bench/gpu_models.py .gpu/models /tmp/gpu-models
python3 bench/bench_migration.py --device cuda --docs "${DOCS:-20000}" --workers "${WORKERS:-1,2}" \
  --models /tmp/gpu-models/all-MiniLM-L6-v2,/tmp/gpu-models/all-mpnet-base-v2 --scale "" \
  --section "GPU (architectures with random weights, see bench/gpu_models.py)" --json-out "$OUT/gpu.json" 2>&1 | tee "$OUT/run.log"
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
