"""LLM annotators: backends that score labels, the prompts they see, and the on-disk call cache."""

from __future__ import annotations

from freeal.config import LLMConfig, cache_root
from freeal.llm.base import Annotator, LabelScores, Message
from freeal.llm.cache import CachedAnnotator, CallCache, Ledger

__all__ = ["Annotator", "CachedAnnotator", "CallCache", "LabelScores", "Ledger", "Message", "make_annotator"]


def make_annotator(cfg: LLMConfig) -> CachedAnnotator:
    """The configured backend behind the on-disk cache (loading the model if it is embedded)."""
    if cfg.backend == "llamacpp":
        from freeal.llm.llamacpp import LlamaCppAnnotator
        from freeal.llm.models import resolve_model

        path, name = resolve_model(cfg.model)
        inner: Annotator = LlamaCppAnnotator(path, n_threads=cfg.n_threads, n_ctx=cfg.n_ctx, name=name)
    else:
        from freeal.llm.openai_compat import OpenAICompatAnnotator

        inner = OpenAICompatAnnotator(
            model=cfg.model,
            base_url=cfg.base_url,
            api_key_env=cfg.api_key_env,
            max_concurrency=cfg.max_concurrency,
            requests_per_minute=cfg.requests_per_minute,
            tokens_per_minute=cfg.tokens_per_minute,
            max_retries=cfg.max_retries,
            timeout=cfg.timeout,
        )
    return CachedAnnotator(inner, CallCache(cfg.cache_path or cache_root() / "llm-cache.sqlite"))
