"""The embedded annotator: a GGUF model run in-process by llama.cpp, answering by label scoring.

Label scoring reads the log-probability of each label's tokens right after the prompt (summed over
a label's tokens) instead of letting the model write free text, so every answer is a label of the
set and comes with a score per label. The model's KV cache is reused for the longest prefix shared
with the previous sequence: the instructions of every prompt are identical, and the tokens of
different labels share the prompt, so an item costs roughly its own tokens plus its labels' tokens.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import llama_cpp
import numpy as np

from freeal.errors import FreeALError
from freeal.llm.base import Generation, LabelScores, Message
from freeal.llm.native import ExtraBuffers, checked_extra_buffers, load_llama


def default_threads() -> int:
    """The cores this process may use: llama.cpp slows down badly when threads outnumber cores."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class LlamaCppAnnotator:
    """Label scoring with a local GGUF model through ``llama-cpp-python``.

    Parameters are plain: ``model_path`` (a GGUF file), ``n_threads`` (default: the usable cores),
    ``n_ctx`` (longest prompt in tokens), ``name`` (shown in the cache identity instead of the path,
    e.g. the registry name plus the file's sha256). ``extra_buffers`` (``auto``: off on CPUs with
    AMX, where they crash) is checked in a child process before the model loads here, so a build
    that crashes on this CPU is one clear error, not a segfault (:mod:`freeal.llm.native`).
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_threads: int | None = None,
        n_ctx: int = 4096,
        n_batch: int = 512,
        name: str | None = None,
        extra_buffers: ExtraBuffers = "auto",
    ) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        path = Path(model_path)
        if not path.is_file():
            raise FreeALError(f"{path}: GGUF model file not found")
        self.model_path = path
        self.n_threads = n_threads or default_threads()
        self.extra_buffers = checked_extra_buffers(path, extra_buffers, identity=name or "")
        self.llm = load_llama(
            path,
            extra_buffers=self.extra_buffers,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads,
            logits_all=False,
        )
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise FreeALError(f"{path}: the GGUF file has no chat template (tokenizer.chat_template)")
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(self.llm.token_eos()),
            bos_token=self._token_text(self.llm.token_bos()),
            add_generation_prompt=True,
        )
        self._n_vocab = self.llm.n_vocab()
        self.identity = f"llamacpp:{name or path.name}"
        self.supports_grammar = True
        self._label_tokens: dict[str, list[int]] = {}

    def _token_text(self, token: int) -> str:
        return (
            self.llm.detokenize([token], special=True).decode("utf-8", errors="ignore") if token >= 0 else ""
        )

    def render(self, messages: list[Message]) -> list[int]:
        """The prompt's tokens under the model's own chat template, ending where the answer starts."""
        text = self._formatter(messages=messages).prompt  # type: ignore[arg-type]  # same dict shape
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def label_tokens(self, label: str) -> list[int]:
        if label not in self._label_tokens:
            self._label_tokens[label] = self.llm.tokenize(label.encode("utf-8"), add_bos=False, special=False)
        return self._label_tokens[label]

    def _next_logprobs(self, tokens: list[int]) -> tuple[np.ndarray, int]:
        """Log-probabilities of the token after ``tokens``, and how many tokens had to be evaluated.

        The model's state is moved to ``tokens`` by keeping the longest prefix it already holds
        (its KV cache) and evaluating only the rest; at least one token is evaluated so that fresh
        logits exist for the last position.
        """
        llm = self.llm
        held = llm.input_ids[: llm.n_tokens]
        limit = min(len(held), len(tokens) - 1)
        same = np.asarray(held[:limit]) == np.asarray(tokens[:limit])
        keep = int(limit if same.all() else np.argmin(same))
        llm.n_tokens = keep
        llm.eval(tokens[keep:])
        raw = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # the last evaluated position
        logits = np.ctypeslib.as_array(raw, shape=(self._n_vocab,)).astype(np.float64)
        top = logits.max()
        return logits - (top + np.log(np.exp(logits - top).sum())), len(tokens) - keep

    def score(self, messages: list[Message], labels: Sequence[str]) -> LabelScores:
        prompt = self.render(messages)
        longest = max(len(self.label_tokens(lab)) for lab in labels)
        if len(prompt) + longest > self.llm.n_ctx():
            raise FreeALError(
                f"a prompt of {len(prompt)} tokens does not fit the model's context of {self.llm.n_ctx()} "
                "tokens; raise n_ctx or shorten the texts"
            )
        memo: dict[tuple[int, ...], np.ndarray] = {}
        evaluated = 0
        scores = []
        for label in labels:
            target = self.label_tokens(label)
            total = 0.0
            for k, token in enumerate(target):
                key = tuple(target[:k])
                if key not in memo:
                    memo[key], cost = self._next_logprobs(prompt + target[:k])
                    evaluated += cost
                total += float(memo[key][token])
            scores.append(total)
        best = int(np.argmax(scores))
        return LabelScores(
            label=labels[best], scores=scores, prompt_tokens=len(prompt), evaluated_tokens=evaluated
        )

    def score_many(
        self, prompts: Sequence[list[Message]], labels: Sequence[str]
    ) -> Iterator[tuple[int, LabelScores]]:
        for i, messages in enumerate(prompts):
            yield i, self.score(messages, labels)

    def generate_many(
        self,
        prompts: Sequence[list[Message]],
        *,
        max_tokens: int,
        temperature: float,
        seed: int,
        grammars: Sequence[str] | None = None,
    ) -> Iterator[tuple[int, Generation]]:
        """Sampled chat answers under the model's own chat template; the same prompt and seed give the
        same answer, so a resumed run that lost its cache would write the same demonstrations.
        With ``grammars``, llama.cpp samples only tokens the prompt's grammar allows."""
        for i, messages in enumerate(prompts):
            grammar = (
                llama_cpp.LlamaGrammar.from_string(grammars[i], verbose=False)
                if grammars is not None
                else None
            )
            # llama.cpp keeps the longest prefix it already holds: count only what it must evaluate
            prompt = self.render(messages)
            held = np.asarray(self.llm.input_ids[: self.llm.n_tokens])
            limit = min(len(held), len(prompt) - 1)
            same = held[:limit] == np.asarray(prompt[:limit])
            kept = int(limit if same.all() else np.argmin(same))
            out = self.llm.create_chat_completion(
                messages=list(messages),  # type: ignore[arg-type]
                max_tokens=max_tokens,
                temperature=temperature,
                seed=seed,
                grammar=grammar,
            )
            usage = out.get("usage") or {}  # type: ignore[union-attr]
            yield (
                i,
                Generation(
                    text=out["choices"][0]["message"].get("content") or "",  # type: ignore[index]
                    prompt_tokens=int(usage.get("prompt_tokens", 0)),
                    completion_tokens=int(usage.get("completion_tokens", 0)),
                    evaluated_tokens=len(prompt) - kept,
                ),
            )
