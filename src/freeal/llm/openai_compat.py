"""Annotator backend for any OpenAI-compatible chat-completions server.

Works against OpenAI itself, vLLM, the llama.cpp server and Ollama: all speak
``POST {base_url}/chat/completions``. Requests go out with :mod:`httpx` from a pool of threads
(``max_concurrency`` per endpoint) and are retried with :mod:`tenacity`; the caller receives the
answers one by one as they complete. (The ``openai`` SDK was tried: it returns a plain string for a
garbled 200 answer and always sends an ``Authorization`` header, where local servers need none.)
"""

from __future__ import annotations

import email.utils
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import tenacity

from freeal.errors import FreeALError
from freeal.llm.base import Generation, LabelScores, Message

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: Name prefix of the threads that send requests.
WORKER_THREADS = "freeal-openai-compat"

#: How far below the least likely listed token a label absent from ``top_logprobs`` is put (nats).
#: The server lists the ``top_logprobs`` most likely first tokens, so an absent label is less likely
#: than all of them; 5 nats (~150x less likely than the last listed token) keeps it clearly last
#: without the ``-inf`` that would break softmax-based calibration downstream.
FLOOR_MARGIN = 5.0

#: Characters stripped around an answer or a token before comparing it with label names.
_EDGE_CHARS = " \t\r\n\"'`*_“”‘’«»"
#: Characters additionally stripped at the end of an answer (trailing punctuation).
_TRAILING_CHARS = _EDGE_CHARS + ".,;:!?)]}>"


# --------------------------------------------------------------------------------------------------
# Parsing and scoring (pure functions, no I/O)


def _norm(text: str) -> str:
    return text.strip(_EDGE_CHARS).lower()


def parse_label(answer: str, labels: Sequence[str]) -> str | None:
    """Strict parse of a free-text answer into one label, or ``None``.

    The answer, stripped of surrounding whitespace, quotes and markdown emphasis and of trailing
    punctuation, lowercased, must either equal a label (case-insensitive) or start with a label name
    followed by a non-alphanumeric character ("Sports - the text is about ..."). When several labels
    start the answer they are nested prefixes of one another ("World" / "World News"), and the
    longest one is taken, which is the only reading of the text.
    """
    text = answer.strip(_EDGE_CHARS).rstrip(_TRAILING_CHARS).lower()
    if not text:
        return None
    lowered = [label.lower() for label in labels]
    for label, low in zip(labels, lowered, strict=True):
        if text == low:
            return label
    starts = [
        (len(low), label)
        for label, low in zip(labels, lowered, strict=True)
        if low and text.startswith(low) and not text[len(low)].isalnum()
    ]
    if not starts:
        return None
    return max(starts)[1]


def first_token_candidates(choice: dict[str, Any]) -> list[tuple[str, float]] | None:
    """``(token, logprob)`` alternatives for the first meaningful completion token, or ``None``.

    Reads ``choices[i].logprobs.content[j].top_logprobs`` (OpenAI, vLLM, llama.cpp format). Leading
    positions whose chosen token is only whitespace, a quote or markdown (``"``, ``**``) are skipped:
    the label is decided at the first token that carries text. ``None`` when the server returned no
    usable logprobs (e.g. Ollama, or a server that ignores ``logprobs``).
    """
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return None
    content = logprobs.get("content")
    if not isinstance(content, list) or not content:
        return None
    for position in content:
        if not isinstance(position, dict):
            return None
        chosen = position.get("token")
        if isinstance(chosen, str) and not chosen.strip(_EDGE_CHARS):
            continue  # whitespace / quote / markdown before the answer proper
        top = position.get("top_logprobs") or [position]
        out: list[tuple[str, float]] = []
        for entry in top:
            if not isinstance(entry, dict):
                continue
            token, lp = entry.get("token"), entry.get("logprob")
            if isinstance(token, str) and isinstance(lp, (int, float)) and math.isfinite(lp):
                out.append((token, float(lp)))
        return out or None
    return None


def label_scores_from_top(
    candidates: Sequence[tuple[str, float]], labels: Sequence[str]
) -> list[float] | None:
    """Per-label log-scores from the first token's alternatives, or ``None`` if no label matches.

    A token matches a label when the token, stripped of whitespace/quotes and lowercased, is a
    non-empty prefix of the lowercased label ("Spor" and " sports" both match "Sports"). Each label
    gets the log-probability of its best matching token; a label with no matching token gets
    ``min(listed log-probs) - FLOOR_MARGIN`` (see :data:`FLOOR_MARGIN`).
    """
    if not candidates:
        return None
    floor = min(lp for _, lp in candidates) - FLOOR_MARGIN
    lowered = [label.lower() for label in labels]
    scores: list[float | None] = [None] * len(labels)
    for token, lp in candidates:
        norm = _norm(token)
        if not norm:
            continue
        for i, low in enumerate(lowered):
            if low.startswith(norm) and (scores[i] is None or lp > scores[i]):  # type: ignore[operator]
                scores[i] = lp
    if all(s is None for s in scores):
        return None
    return [floor if s is None else s for s in scores]


def _ranked(
    answer: str, candidates: Sequence[tuple[str, float]] | None, labels: Sequence[str]
) -> tuple[str | None, list[float] | None, list[str]]:
    """The parsed text answer, the first token's label scores, and the labels tied at the top."""
    parsed = parse_label(answer, labels)
    scores = label_scores_from_top(candidates, labels) if candidates else None
    if scores is None:
        return parsed, None, []
    best = max(scores)
    return parsed, scores, [labels[i] for i, s in enumerate(scores) if s == best]


def interpret(
    answer: str, candidates: Sequence[tuple[str, float]] | None, labels: Sequence[str]
) -> tuple[str | None, list[float] | None]:
    """Label and scores for one server answer (see :class:`OpenAICompatAnnotator`)."""
    parsed, scores, tied = _ranked(answer, candidates, labels)
    if scores is None:
        return parsed, None
    # Several labels can share a first token ("S" for "Sports"/"Sci/Tech"): the text breaks the tie.
    return (parsed if parsed in tied else tied[0]), scores


def decided_by_first_token(
    answer: str, candidates: Sequence[tuple[str, float]] | None, labels: Sequence[str]
) -> bool:
    """Whether the first answer token's alternatives name one best label, so that the rest of the
    answer is not needed (a tie between labels that share the token needs the text to break it)."""
    parsed, scores, tied = _ranked(answer, candidates, labels)
    return scores is not None and (len(tied) == 1 or parsed in tied)


def reask_message(labels: Sequence[str]) -> Message:
    return {"role": "user", "content": "Answer with exactly one of: " + ", ".join(labels) + "."}


# --------------------------------------------------------------------------------------------------
# Rate limiting


class _TokenBucket:
    """Thread-safe token bucket: ``rate`` units per second, bursts of at most ``capacity``.

    A request larger than the capacity waits for a full bucket and then drives it negative (debt), so
    the long-run rate stays right. The state lives on the annotator, so it also spans ``score_many``
    calls; only short critical sections hold the lock (never while sleeping).
    """

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0
        # One second's worth (at least one unit): providers enforce per-minute limits over short
        # windows, so a full minute's burst would be refused anyway.
        self.capacity = max(1.0, self.rate)
        self._level = self.capacity
        self._updated = time.monotonic()
        self._lock = threading.Lock()

    def _refill(self, now: float) -> None:
        self._level = min(self.capacity, self._level + (now - self._updated) * self.rate)
        self._updated = now

    def try_take(self, cost: float) -> float:
        """Take ``cost`` units and return 0, or return the seconds to wait before trying again."""
        with self._lock:
            self._refill(time.monotonic())
            need = min(cost, self.capacity)
            if self._level >= need:
                self._level -= cost
                return 0.0
            return (need - self._level) / self.rate

    def adjust(self, extra: float) -> None:
        """Charge ``extra`` more units (negative: refund) once the real cost is known."""
        with self._lock:
            self._refill(time.monotonic())
            self._level = min(self.capacity, self._level - extra)

    def acquire(self, cost: float) -> None:
        while (wait := self.try_take(cost)) > 0:
            time.sleep(wait)


@dataclass(frozen=True)
class EndpointSpec:
    """One server, the environment variable holding its key, and its own limits, for
    ``OpenAICompatAnnotator(endpoints=...)``: each server or key has its own quota, so each may be
    bounded apart. A limit left ``None`` is the annotator-wide one."""

    base_url: str
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int | None = None
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None


@dataclass
class _Endpoint:
    """One server + key (persistent across runs). The key itself is never stored here."""

    base_url: str
    api_key_env: str
    max_concurrency: int  # requests in flight at once, per score_many/generate_many call
    requests: _TokenBucket | None = None
    tokens: _TokenBucket | None = None
    cooldown_until: float = 0.0  # time.monotonic() before which no request is sent (after a 429)
    failures: int = 0  # failed requests in a row (no answer, or 5xx): how long it stays benched

    def failed(self, base: float, most: float) -> None:
        """Bench the endpoint for ``base``·2^(failures in a row), at most ``most`` seconds: the
        retried request, and the next ones, go to the others meanwhile (a server that died is asked
        again now and then, and takes work once it answers)."""
        self.failures += 1
        bench = min(most, base * 2.0 ** (self.failures - 1))
        self.cooldown_until = max(self.cooldown_until, time.monotonic() + bench)


@dataclass
class _RunEndpoint:
    """Per-call state of an endpoint: the key read for this call, its HTTP client, its concurrency
    bound and how many requests it has in flight (to pick the least busy)."""

    ep: _Endpoint
    key: str | None
    client: httpx.Client
    slots: threading.BoundedSemaphore
    active: int = 0


class _RetryableError(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Completion:
    text: str
    candidates: list[tuple[str, float]] | None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _clean_url(url: str) -> str:
    """``url`` without trailing slash and without any ``user:password@`` part."""
    parts = urlsplit(url.strip())
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), parts.query, parts.fragment))


def _exposes_key(url: str) -> bool:
    """Whether a request to ``url`` would carry a key in clear text beyond this machine."""
    parts = urlsplit(url.strip())
    if parts.scheme != "http":
        return False
    host = (parts.hostname or "").lower()
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return True


def _parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds asked for by ``retry-after-ms`` (OpenAI) or ``Retry-After`` (seconds or HTTP date)."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _server_message(response: httpx.Response) -> str:
    """The error message a server put in its body (OpenAI ``{"error": {"message": ...}}`` and kin)."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return text[:300] if text else "(empty body)"
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return str(err)[:300]
    return json.dumps(body)[:300]


# --------------------------------------------------------------------------------------------------
# The annotator


class OpenAICompatAnnotator:
    """Label prompts with a chat model behind an OpenAI-compatible ``/chat/completions`` endpoint.

    Why constrained answers: FreeAL feeds the LLM's labels to a small model and to demonstration
    selection, so every answer must be one of the task's labels or an explicit abstention, never
    free text that a later step would have to guess at. Hence:

    1. The model is asked greedily (``temperature=0``) with ``logprobs`` and ``top_logprobs=20``,
       for ``score_tokens`` (1) answer tokens only: a server writes an answer token by token, and
       the label is read from the first one (a second token costs llama-server one more decode
       step: 0.45 against 0.38 s per text on 2 CPU threads, BENCHMARKS issue 13). Only when that
       does not decide (no logprobs, no label among the first token's alternatives, or a tie the
       text must break) is the whole answer asked (``max_tokens``, 16); a server that ignores
       ``logprobs`` gets whole questions from then on. When the server returns logprobs, each
       label is scored by the best log-probability among the first answer token's alternatives
       whose text (stripped, case-insensitive) is a prefix of the label; labels absent from the
       list get ``min(listed) - 5`` (:data:`FLOOR_MARGIN`). The label is the argmax, i.e. the
       model's answer restricted to the label set (ties between labels sharing a first token are
       broken by the text answer). These scores are comparable to the log-probabilities of the
       llama.cpp backend and feed calibration.
    2. Without logprobs (Ollama, ``use_logprobs=False``) or when no listed token starts a label,
       ``scores`` is ``None`` and the label comes from a strict parse of the text answer
       (:func:`parse_label`: the answer is a label, or starts with one).
    3. If neither gives a label, the model is asked once more (its answer plus "Answer with exactly
       one of: a, b, c."). If that fails too the answer is an abstention: ``label=None``.

    Transport: several ``endpoints`` (server, key env var) can be used in parallel, each with its
    own ``max_concurrency`` bound and ``requests_per_minute`` / ``tokens_per_minute`` token buckets
    (tokens estimated as characters/4 until the server's ``usage`` gives the real ratio); an
    :class:`EndpointSpec` sets an endpoint's own values, else the annotator-wide ones apply. Each
    request goes to the least busy endpoint (fewest requests in flight per slot, round-robin among
    equals), so a faster server, which frees its slots sooner, takes more of the work. An endpoint
    that fails (no answer, a timeout, 5xx) is benched for ``backoff_base``·2^(failures in a row)
    seconds, at most ``backoff_max``: its request is retried on the others, and it is tried again
    once the bench time is over.
    429, 5xx, timeouts, connection errors and unparseable bodies are retried up to ``max_retries`` times with
    exponential backoff and jitter from ``backoff_base`` seconds (capped at ``backoff_max``),
    honouring ``Retry-After``; other 4xx raise :class:`FreeALError` with the status and the
    server's message. API keys are read from the named environment variables at the start of each
    ``score_many`` call and appear nowhere else (not in ``identity``, ``repr``, logs or errors).
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        *,
        endpoints: Sequence[EndpointSpec | Sequence[str]] | None = None,
        max_concurrency: int = 8,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        max_retries: int = 5,
        timeout: float = 60.0,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        temperature: float = 0.0,
        max_tokens: int = 16,
        score_tokens: int = 1,
        use_logprobs: bool = True,
        top_logprobs: int = 20,
        allow_plain_http: bool = False,
    ) -> None:
        if not model or not isinstance(model, str):
            raise FreeALError("OpenAI-compatible annotator: 'model' must be a non-empty model name.")
        if endpoints is not None and base_url is not None:
            raise FreeALError("OpenAI-compatible annotator: give either 'base_url' or 'endpoints', not both.")
        if endpoints is not None:
            specs: list[EndpointSpec] = []
            for entry in endpoints:
                if isinstance(entry, EndpointSpec):
                    specs.append(entry)
                elif isinstance(entry, str) or len(entry) != 2:
                    raise FreeALError(
                        "OpenAI-compatible annotator: each endpoint must be an EndpointSpec or a pair "
                        f"(base_url, api_key_env), got {entry!r}."
                    )
                else:
                    specs.append(EndpointSpec(str(entry[0]), str(entry[1])))
            if not specs:
                raise FreeALError("OpenAI-compatible annotator: 'endpoints' is empty.")
        else:
            url = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
            specs = [EndpointSpec(url, api_key_env)]
        counts: list[tuple[str, object, int]] = [
            ("max_concurrency", max_concurrency, 1),
            ("max_tokens", max_tokens, 1),
            ("score_tokens", score_tokens, 1),
            ("top_logprobs", top_logprobs, 1),
            ("max_retries", max_retries, 0),
        ]
        rates: list[tuple[str, float | None]] = [
            ("requests_per_minute", requests_per_minute),
            ("tokens_per_minute", tokens_per_minute),
        ]
        for spec in specs:
            shown = _clean_url(spec.base_url)
            if not urlsplit(spec.base_url.strip()).scheme.startswith("http"):
                raise FreeALError(f"OpenAI-compatible annotator: base URL {shown!r} is not http(s).")
            if not spec.api_key_env:
                raise FreeALError(
                    "OpenAI-compatible annotator: api_key_env must name an environment variable."
                )
            if spec.max_concurrency is not None:
                counts.append((f"max_concurrency of {shown}", spec.max_concurrency, 1))
            rates += [
                (f"requests_per_minute of {shown}", spec.requests_per_minute),
                (f"tokens_per_minute of {shown}", spec.tokens_per_minute),
            ]
        for name, value, low in counts:
            if not isinstance(value, int) or value < low:
                raise FreeALError(
                    f"OpenAI-compatible annotator: {name} must be an integer >= {low}, got {value!r}."
                )
        for name, rate in rates:
            if rate is not None and not rate > 0:
                raise FreeALError(f"OpenAI-compatible annotator: {name} must be positive, got {rate!r}.")
        if not timeout > 0 or backoff_base < 0 or backoff_max < 0:
            raise FreeALError(
                "OpenAI-compatible annotator: timeout must be positive and backoff non-negative."
            )

        self.model = model
        self.max_concurrency = max_concurrency
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.max_retries = max_retries
        self.timeout = float(timeout)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.temperature = float(temperature)
        self.max_tokens = max_tokens
        self.score_tokens = min(score_tokens, max_tokens)
        self.use_logprobs = use_logprobs
        # set once a server answers without logprobs: from then on every answer is asked in full
        self.logprobs_ignored = False
        self.top_logprobs = top_logprobs
        self.allow_plain_http = allow_plain_http
        self._endpoints: list[_Endpoint] = []
        for spec in specs:  # (validated above: a limit that is set is positive, so `or` only fills None)
            rpm = spec.requests_per_minute or requests_per_minute
            tpm = spec.tokens_per_minute or tokens_per_minute
            self._endpoints.append(
                _Endpoint(
                    base_url=spec.base_url.strip().rstrip("/"),
                    api_key_env=spec.api_key_env,
                    max_concurrency=spec.max_concurrency or max_concurrency,
                    requests=_TokenBucket(rpm) if rpm else None,
                    tokens=_TokenBucket(tpm) if tpm else None,
                )
            )
        self._rr = 0  # round-robin cursor among equally busy endpoints
        # Observed prompt characters and tokens, to turn characters into a token estimate.
        self._stats_lock = threading.Lock()
        self._chars_seen = 0
        self._prompt_tokens_seen = 0

        mode = (
            f"logprobs{top_logprobs}-prefix+parse" if use_logprobs else "parse"
        ) + f",t={self.temperature:g},max_tokens={max_tokens}"
        # Not ``score_tokens``: the label comes from the first token's alternatives whatever the
        # count, and whatever they leave undecided is asked in full, so the count changes the cost
        # of an answer, never the answer, and cached answers stay valid when it changes.
        urls = ",".join(sorted({_clean_url(ep.base_url) for ep in self._endpoints}))
        self.identity = f"openai:{model}@{urls}:{mode}"
        self.supports_grammar = False

    @property
    def base_urls(self) -> list[str]:
        return [_clean_url(ep.base_url) for ep in self._endpoints]

    def __repr__(self) -> str:
        envs = ",".join(ep.api_key_env for ep in self._endpoints)
        return (
            f"OpenAICompatAnnotator(model={self.model!r}, base_urls={self.base_urls!r}, "
            f"api_key_env={envs!r}, max_concurrency={self.max_concurrency}, use_logprobs={self.use_logprobs})"
        )

    # ---------------------------------------------------------------------------------------------
    # Synchronous entry point

    def score_many(
        self, prompts: Sequence[list[Message]], labels: Sequence[str]
    ) -> Iterator[tuple[int, LabelScores]]:
        """Answer every prompt; yield ``(index, answer)`` as each completes, in completion order.

        Closing the iterator early (or an error) drops the queued requests, ends those in flight
        and waits for the worker threads before returning.
        """
        labels = [str(label) for label in labels]
        if not labels:
            raise FreeALError("OpenAI-compatible annotator: no labels to choose from.")
        lowered = [label.lower() for label in labels]
        if len(set(lowered)) != len(lowered) or any(not low.strip() for low in lowered):
            raise FreeALError(
                f"OpenAI-compatible annotator: labels must be non-empty and distinct ignoring case: {labels}."
            )
        return self._stream(prompts, labels, None)

    def generate_many(
        self,
        prompts: Sequence[list[Message]],
        *,
        max_tokens: int,
        temperature: float,
        seed: int,
        grammars: Sequence[str] | None = None,
    ) -> Iterator[tuple[int, Generation]]:
        """Free-text answers (sampled, no logprobs), with the same transport, limits and retries.
        Grammars are a llama.cpp feature: callers ask servers for JSON and parse it instead."""
        if grammars is not None:
            raise FreeALError("OpenAI-compatible annotator: grammar-constrained answers are not supported")
        sampling = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        return self._stream(prompts, [], sampling)

    def _stream(
        self, prompts: Sequence[list[Message]], labels: list[str], sampling: dict[str, Any] | None
    ) -> Iterator[tuple[int, Any]]:
        """Answer ``prompts`` on a pool of threads, each endpoint's ``max_concurrency``; yield each
        answer as it completes. Closing early (or an error) closes the HTTP clients, which ends the
        requests in flight, and waits for the threads."""
        if not prompts:
            return
        keys = {ep.api_key_env: (os.environ.get(ep.api_key_env) or None) for ep in self._endpoints}
        for ep in self._endpoints:
            if keys[ep.api_key_env] and not self.allow_plain_http and _exposes_key(ep.base_url):
                raise FreeALError(
                    f"OpenAI-compatible annotator: refusing to send the API key in {ep.api_key_env} over "
                    f"plain http to {_clean_url(ep.base_url)} (not this machine); use https, or set "
                    "llm.allow_plain_http: true if that network is trusted"
                )
        run = _Run(
            self,
            [
                _RunEndpoint(
                    ep=ep,
                    key=keys[ep.api_key_env],
                    client=httpx.Client(
                        timeout=httpx.Timeout(self.timeout),
                        limits=httpx.Limits(
                            max_connections=ep.max_concurrency, max_keepalive_connections=ep.max_concurrency
                        ),
                    ),
                    slots=threading.BoundedSemaphore(ep.max_concurrency),
                )
                for ep in self._endpoints
            ],
            labels,
            sampling,
        )
        workers = min(len(prompts), sum(ep.max_concurrency for ep in self._endpoints))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=WORKER_THREADS)
        queued = iter(enumerate(prompts))
        try:
            # A few requests per worker queued at a time, not all of them: a million submitted at
            # once would hold a future and its answer each until the last one is read.
            pending = {pool.submit(run.answer, list(p)): i for i, p in itertools.islice(queued, 4 * workers)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    i = pending.pop(future)
                    for j, p in itertools.islice(queued, 1):
                        pending[pool.submit(run.answer, list(p))] = j
                    yield i, future.result()
        finally:
            run.stopped = True
            for endpoint in run.endpoints:
                endpoint.client.close()
            pool.shutdown(wait=True, cancel_futures=True)

    # ---------------------------------------------------------------------------------------------
    # Helpers used by the run

    def _estimate_tokens(self, messages: Sequence[Message]) -> float:
        chars = sum(len(m.get("content") or "") for m in messages)
        with self._stats_lock:
            ratio = self._prompt_tokens_seen / self._chars_seen if self._chars_seen else 0.25
        return chars * ratio + self.max_tokens

    def _observe(self, messages: Sequence[Message], prompt_tokens: int) -> None:
        if prompt_tokens <= 0:
            return
        chars = sum(len(m.get("content") or "") for m in messages)
        with self._stats_lock:
            self._chars_seen += chars
            self._prompt_tokens_seen += prompt_tokens

    def _backoff(self, attempt: int) -> float:
        delay = min(self.backoff_max, self.backoff_base * (2.0**attempt))
        return delay * (0.5 + 0.5 * random.random())

    def _request_body(self, messages: Sequence[Message], max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": list(messages),
            "temperature": self.temperature,
            "max_tokens": max_tokens,
            "n": 1,
            "stream": False,
        }
        if self.use_logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs
        return body


class _Stopped(Exception):
    """The caller closed the stream: a request still queued is not sent."""


class _Run:
    """One ``score_many``/``generate_many`` call: the endpoints with this call's keys and clients,
    and how one prompt is answered (run by the pool's threads)."""

    def __init__(
        self,
        owner: OpenAICompatAnnotator,
        endpoints: list[_RunEndpoint],
        labels: list[str],
        sampling: dict[str, Any] | None,
    ) -> None:
        self.owner = owner
        self.endpoints = endpoints
        self.labels = labels
        self.sampling = sampling  # set: write free text with these settings instead of scoring labels
        self.stopped = False
        self._lock = threading.Lock()

    def _scrub(self, text: str) -> str:
        for endpoint in self.endpoints:
            if endpoint.key:
                text = text.replace(endpoint.key, "***")
        return text

    def answer(self, messages: list[Message]) -> LabelScores | Generation:
        usage = _Usage()
        owner = self.owner
        short = (
            not self.sampling
            and owner.use_logprobs
            and not owner.logprobs_ignored
            and owner.score_tokens < owner.max_tokens
        )
        first = self._complete(messages, usage, owner.score_tokens if short else None)
        if self.sampling:
            return Generation(first.text, usage.prompt_tokens, usage.completion_tokens)
        if short and not decided_by_first_token(first.text, first.candidates, self.labels):
            # the few tokens asked did not decide: the whole answer, once
            owner.logprobs_ignored |= first.candidates is None
            first = self._complete(messages, usage)
        label, scores = interpret(first.text, first.candidates, self.labels)
        if label is None:
            followup: list[Message] = [
                *messages,
                {"role": "assistant", "content": first.text},
                reask_message(self.labels),
            ]
            second = self._complete(followup, usage)
            label, scores = interpret(second.text, second.candidates, self.labels)
        return LabelScores(
            label=label,
            scores=scores if label is not None else None,
            prompt_tokens=usage.prompt_tokens,
            evaluated_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
        )

    def _pick_endpoint(self) -> _RunEndpoint:
        """The least busy endpoint not cooling down after a 429 (round-robin among equals). Busy is
        requests in flight per slot, so an endpoint with 1 slot is not handed as many requests (to
        queue on its semaphore) as one with 4 slots."""
        owner = self.owner
        with self._lock:
            now = time.monotonic()
            n = len(self.endpoints)
            order = [self.endpoints[(owner._rr + k) % n] for k in range(n)]
            best = min(
                order, key=lambda e: (max(0.0, e.ep.cooldown_until - now), e.active / e.ep.max_concurrency)
            )
            owner._rr = (self.endpoints.index(best) + 1) % n
            best.active += 1
        return best

    def _complete(self, messages: list[Message], usage: _Usage, max_tokens: int | None = None) -> _Completion:
        """One chat completion, retried (tenacity) on 429, 5xx, timeouts, connection errors and
        unreadable bodies with exponential backoff and jitter, at least as long as ``Retry-After``
        asks; adds the server's token usage to ``usage``."""
        owner = self.owner
        body = owner._request_body(messages, max_tokens or owner.max_tokens)
        if self.sampling:
            body.update(self.sampling)
            body.pop("logprobs", None)
            body.pop("top_logprobs", None)

        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            delay = owner._backoff(state.attempt_number - 1)
            after = getattr(error, "retry_after", None)
            return max(delay, min(after, 600.0)) if after is not None else delay

        def warn(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.warning("%s (attempt %d/%d); retrying", error, state.attempt_number, owner.max_retries + 1)

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(owner.max_retries + 1),
            wait=wait,
            retry=tenacity.retry_if_exception_type(_RetryableError),
            before_sleep=warn,
            reraise=True,
        )
        try:
            completion = retrying(self._attempt, body, messages)
        except _RetryableError as exc:
            tries = owner.max_retries + 1
            raise FreeALError(
                f"OpenAI-compatible server gave no usable answer after {tries} attempts: {exc}"
            ) from None
        usage.prompt_tokens += completion.prompt_tokens
        usage.completion_tokens += completion.completion_tokens
        return completion

    def _attempt(self, body: dict[str, Any], messages: list[Message]) -> _Completion:
        if self.stopped:
            raise _Stopped
        endpoint = self._pick_endpoint()
        try:
            return self._send(endpoint, body, messages)
        finally:
            with self._lock:
                endpoint.active -= 1

    def _send(self, endpoint: _RunEndpoint, body: dict[str, Any], messages: list[Message]) -> _Completion:
        owner = self.owner
        ep = endpoint.ep
        shown = _clean_url(ep.base_url)
        wait = ep.cooldown_until - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        with endpoint.slots:
            estimate = owner._estimate_tokens(messages)
            if ep.requests is not None:
                ep.requests.acquire(1.0)
            if ep.tokens is not None:
                ep.tokens.acquire(estimate)
            headers = {"Authorization": f"Bearer {endpoint.key}"} if endpoint.key else {}
            try:
                response = endpoint.client.post(ep.base_url + "/chat/completions", json=body, headers=headers)
            except httpx.TimeoutException as exc:
                ep.failed(owner.backoff_base, owner.backoff_max)
                raise _RetryableError(f"{shown}: request timed out after {owner.timeout:g}s") from exc
            except (httpx.RequestError, RuntimeError) as exc:  # RuntimeError: the client was closed
                if self.stopped:
                    raise _Stopped from exc
                ep.failed(owner.backoff_base, owner.backoff_max)
                raise _RetryableError(f"{shown}: connection failed ({type(exc).__name__})") from exc

        status = response.status_code
        if status >= 500:
            ep.failed(owner.backoff_base, owner.backoff_max)
        else:
            ep.failures = 0
        if status == 429 or status >= 500:
            retry_after = _parse_retry_after(response.headers)
            if status == 429 and retry_after is not None:
                ep.cooldown_until = max(ep.cooldown_until, time.monotonic() + min(retry_after, 600.0))
            raise _RetryableError(
                f"{shown} answered HTTP {status}: {self._scrub(_server_message(response))}", retry_after
            )
        if status >= 400:
            hint = ""
            if status in (401, 403) and not endpoint.key:
                hint = f" (no API key: environment variable {ep.api_key_env} is not set)"
            raise FreeALError(
                f"{shown} answered HTTP {status}: {self._scrub(_server_message(response))}{hint}"
            )
        try:
            payload = response.json()
            choice = payload["choices"][0]
            content = choice["message"].get("content") or ""
            if not isinstance(content, str):
                raise TypeError("content is not a string")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise _RetryableError(f"{shown} answered HTTP {status} with an unparseable body") from exc

        usage = payload.get("usage") if isinstance(payload, dict) else None
        prompt_tokens = completion_tokens = 0
        if isinstance(usage, dict):
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or 0)
        if ep.tokens is not None and (prompt_tokens or completion_tokens):
            ep.tokens.adjust(prompt_tokens + completion_tokens - estimate)
        owner._observe(messages, prompt_tokens)
        candidates = first_token_candidates(choice) if owner.use_logprobs and not self.sampling else None
        return _Completion(content, candidates, prompt_tokens, completion_tokens)
