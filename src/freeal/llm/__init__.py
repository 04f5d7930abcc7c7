"""LLM annotators: backends that score labels, the prompts they see, and the on-disk call cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

from freeal.config import LLMConfig, cache_root
from freeal.extras import require
from freeal.llm.base import Annotator, LabelScores, Message
from freeal.llm.cache import CachedAnnotator, CallCache, Ledger

if TYPE_CHECKING:
    from freeal.llm.openai_compat import OpenAICompatAnnotator

__all__ = [
    "Annotator",
    "CachedAnnotator",
    "CallCache",
    "LabelScores",
    "Ledger",
    "Message",
    "annotator_identity",
    "make_annotator",
]


def annotator_identity(cfg: LLMConfig) -> str:
    """The identity the configured backend would have (model file, server URL actually used,
    scoring mode), without loading a model or opening a connection: part of a run's fingerprint."""
    if cfg.backend == "llamacpp":
        from freeal.llm.models import resolve_model

        return f"llamacpp:{resolve_model(cfg.model)[1]}"
    return _openai_annotator(cfg).identity


def _openai_annotator(cfg: LLMConfig) -> OpenAICompatAnnotator:
    from freeal.llm.openai_compat import EndpointSpec, OpenAICompatAnnotator

    return OpenAICompatAnnotator(
        model=cfg.model,
        base_url=cfg.base_url,
        api_key_env=cfg.api_key_env,
        endpoints=[EndpointSpec(**e.model_dump()) for e in cfg.endpoints] if cfg.endpoints else None,
        max_concurrency=cfg.max_concurrency,
        requests_per_minute=cfg.requests_per_minute,
        tokens_per_minute=cfg.tokens_per_minute,
        max_retries=cfg.max_retries,
        timeout=cfg.timeout,
        allow_plain_http=cfg.allow_plain_http,
    )


def make_annotator(cfg: LLMConfig) -> CachedAnnotator:
    """The configured backend behind the on-disk cache (loading the model if it is embedded)."""
    if cfg.backend == "llamacpp":
        require("llama_cpp", what="the embedded LLM (backend: llamacpp)")
        from freeal.llm.llamacpp import LlamaCppAnnotator
        from freeal.llm.models import resolve_model

        path, name = resolve_model(cfg.model)
        inner: Annotator = LlamaCppAnnotator(
            path,
            n_threads=cfg.n_threads,
            n_ctx=cfg.n_ctx,
            batch_tokens=cfg.batch_tokens,
            name=name,
            extra_buffers=cfg.extra_buffers,
        )
    else:
        inner = _openai_annotator(cfg)
    return CachedAnnotator(inner, CallCache(cfg.cache_path or cache_root() / "llm-cache.sqlite"))
