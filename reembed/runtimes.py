"""Which runtime executes a model's transformer: torch (default) or OpenVINO on the CPU.

Measured on this project's 2-core AMD EPYC (``bench/bench_runtimes.py``): on one thread OpenVINO
runs MiniLM 1.16 × and mpnet 1.54 × as fast as torch, with vectors within 2e-7 of torch's (cosine
0.9999999; ``tests/integration/test_runtimes.py`` checks it, through real workers too). ONNX
Runtime (already installed with chromadb) gained at most 2 % and
sentence-transformers' own ONNX/OpenVINO backends need ``optimum``, whose releases pin
transformers below what sentence-transformers 6 needs; so this module converts the model itself.

Only the transformer's forward pass changes runtime. Tokenisation, length sorting, pooling and
normalisation stay sentence-transformers' own code, so both runtimes compute the same function.
The converted model is cached on disk per model fingerprint: converting mpnet takes ~17 s, loading
the cache about a second.
"""

from __future__ import annotations

import fcntl
import os
import types
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reembed.errors import ConfigError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

BACKENDS = ("torch", "openvino")
#: Inputs a transformer's forward may take from the tokenizer, in the order OpenVINO sees them.
TRANSFORMER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def parse_backend(value: str) -> str:
    """``REEMBED_BACKEND``, normalised.

    Raises:
        ConfigError: not one of ``BACKENDS``.
    """
    backend = value.strip().lower()
    if backend not in BACKENDS:
        raise ConfigError(f"REEMBED_BACKEND={value!r} is not a runtime: use {' or '.join(BACKENDS)}")
    return backend


def check_backend(backend: str, device: str) -> None:
    """Refuse a runtime that cannot run here, naming the fix.

    Raises:
        ConfigError: unknown backend, OpenVINO asked for on a GPU, or openvino not installed.
    """
    if parse_backend(backend) == "openvino":
        if device != "cpu":
            raise ConfigError(f"REEMBED_BACKEND=openvino runs on the CPU, not {device}: set REEMBED_DEVICE=cpu "
                              "or REEMBED_BACKEND=torch")
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise ConfigError("REEMBED_BACKEND=openvino needs the openvino package: pip install 'reembed[openvino]' "
                              "or set REEMBED_BACKEND=torch") from None


def openvino_cache(data_dir: Path, fingerprint: str) -> Path:
    """Where a model's converted OpenVINO files live: one directory per model fingerprint."""
    return data_dir / "cache" / "openvino" / fingerprint.split(":", 1)[-1]


def transformer_module(model: SentenceTransformer) -> Any | None:
    """The model's first module when it is a text transformer producing token embeddings; None for
    anything else (a static embedding table has no transformer to speed up)."""
    first = model[0]
    config = getattr(first, "modality_config", {}).get("text", {})
    if (type(first).__name__ != "Transformer" or getattr(first, "module_output_name", None) != "token_embeddings"
            or config.get("method") != "forward"):
        return None
    return first


def use_openvino(model: SentenceTransformer, cache_dir: Path, threads: int) -> bool:
    """Run ``model``'s transformer with OpenVINO from now on (fp32, ``threads`` threads, no pinning).

    Returns:
        False when the model has no transformer module (it keeps running with torch).
    """
    module = transformer_module(model)
    if module is None:
        return False
    import openvino as ov
    import torch

    names = [n for n in TRANSFORMER_INPUTS if n in model.tokenize(["reembed"])]
    xml = _converted(model, module, names, cache_dir)
    compiled = ov.Core().compile_model(str(xml), "CPU", {
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        # f32 explicitly: on CPUs with bf16 units OpenVINO would otherwise compute in bf16.
        "INFERENCE_PRECISION_HINT": "f32",
        # Several worker processes share the machine and each pins on its own: two could pin to one core.
        "ENABLE_CPU_PINNING": False,
    })

    def forward(self: Any, features: dict[str, Any], **_: Any) -> dict[str, Any]:
        hidden = compiled([features[n].numpy() for n in names])[0]
        features[self.module_output_name] = torch.from_numpy(hidden)
        return features

    module.forward = types.MethodType(forward, module)
    return True


def _converted(model: SentenceTransformer, module: Any, names: list[str], cache_dir: Path) -> Path:
    """The OpenVINO IR of the transformer, converted once per fingerprint (one converter at a time:
    worker processes start together), written under a temporary name and renamed into place."""
    import openvino as ov
    import torch

    xml = cache_dir / "model.xml"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if xml.exists() and xml.with_suffix(".bin").exists():
            return xml
        inner = module.model if hasattr(module, "model") else module.auto_model

        class LastHidden(torch.nn.Module):
            """The transformer as a function of tensors only, returning its last hidden state."""

            def __init__(self) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
                hidden: torch.Tensor = self.inner(**dict(zip(names, tensors, strict=True))).last_hidden_state
                return hidden

        example = model.tokenize(["reembed converts this model once", "and caches it"])
        with warnings.catch_warnings():  # tracer warnings about shapes: noise in a worker's JSON log
            warnings.simplefilter("ignore")
            converted = ov.convert_model(LastHidden().eval(), example_input=tuple(example[n] for n in names))
        staging = cache_dir / f".model.{os.getpid()}.xml"
        ov.save_model(converted, str(staging), compress_to_fp16=False)  # fp16 weights would change the vectors
        staging.with_suffix(".bin").replace(xml.with_suffix(".bin"))
        staging.replace(xml)
    return xml
