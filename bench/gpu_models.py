"""Give carried model architectures seeded random weights (for the GPU run only).

The lent GPU machine is reached by a 64 MiB transfer and no network, so MiniLM's 90 MB and
mpnet's 420 MB of weights cannot travel. Their configs and tokenizers (a few hundred kB) do.
Speed depends on the architecture, the sequence lengths and the precision, not on the values of
the weights, so these models measure throughput faithfully; their embeddings are meaningless,
which is why the GPU figures in BENCHMARKS.md are throughput only.

Usage: ``python bench/gpu_models.py SRC_DIR DST_DIR`` (each subdirectory of SRC_DIR is a model).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel


def materialise(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.from_pretrained(src))
    model.save_pretrained(dst, safe_serialization=True)
    (dst / "2_Normalize").mkdir(exist_ok=True)


if __name__ == "__main__":
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    for directory in sorted(p for p in source.iterdir() if p.is_dir()):
        materialise(directory, target / directory.name)
        print("materialised", target / directory.name)
