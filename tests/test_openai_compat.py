"""OpenAICompatAnnotator against a real loopback HTTP server (tests/openai_server.py), no mocks."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from freeal.config import Endpoint, LLMConfig
from freeal.errors import FreeALError
from freeal.llm import annotator_identity, make_annotator
from freeal.llm.base import Annotator, LabelScores, Message
from freeal.llm.openai_compat import (
    FLOOR_MARGIN,
    WORKER_THREADS,
    EndpointSpec,
    OpenAICompatAnnotator,
    label_scores_from_top,
    parse_label,
)
from openai_server import NOLABEL_ANSWER, FakeOpenAIServer, keyword_policy

LABELS = ["Sports", "Business", "World", "Sci/Tech"]
KEYWORDS = {"football": "Sports", "stock": "Business", "election": "World", "software": "Sci/Tech"}
TEXTS = [
    ("The football final went to penalties.", "Sports"),
    ("The stock market fell sharply today.", "Business"),
    ("The election results were contested.", "World"),
    ("A new software release fixes bugs.", "Sci/Tech"),
]
KEY_ENV = "FREEAL_TEST_KEY"
SECRET = "sk-test-SECRET-0123456789"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(KEY_ENV, SECRET)


def prompt(text: str) -> list[Message]:
    return [
        {"role": "system", "content": "Classify the news text. Labels: " + ", ".join(LABELS)},
        {"role": "user", "content": f"Text: {text}\nLabel:"},
    ]


def server(**kw) -> FakeOpenAIServer:
    kw.setdefault("labels", LABELS)
    kw.setdefault("keywords", KEYWORDS)
    return FakeOpenAIServer(**kw)


def annotator(url: str, **kw) -> OpenAICompatAnnotator:
    kw.setdefault("api_key_env", KEY_ENV)
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("timeout", 5.0)
    return OpenAICompatAnnotator("test-model", url, **kw)


def run_all(ann: Annotator, texts: list[str]) -> list[LabelScores]:
    results: dict[int, LabelScores] = {}
    for index, answer in ann.score_many([prompt(t) for t in texts], LABELS):
        assert index not in results
        results[index] = answer
    assert sorted(results) == list(range(len(texts)))
    return [results[i] for i in range(len(texts))]


def no_worker_threads() -> bool:
    return not any(t.name.startswith(WORKER_THREADS) for t in threading.enumerate())


# ------------------------------------------------------------------------------------------------
# Pure parsing / scoring


def test_parse_label_strict() -> None:
    assert parse_label("Sports", LABELS) == "Sports"
    assert parse_label("  sports.\n", LABELS) == "Sports"
    assert parse_label('"**Sci/Tech**"', LABELS) == "Sci/Tech"
    assert parse_label("Business - the text is about markets", LABELS) == "Business"
    assert parse_label("I think Sports", LABELS) is None
    assert parse_label("Sportswear", LABELS) is None
    assert parse_label("", LABELS) is None
    # nested label names: the longest one that starts the answer
    assert parse_label("World News, clearly", ["World", "World News"]) == "World News"
    assert parse_label("World, clearly", ["World", "World News"]) == "World"


def test_label_scores_prefix_and_floor() -> None:
    top = [("Spor", -0.1), (" business", -2.0), ("B", -1.5), ("I", -4.0)]
    scores = label_scores_from_top(top, LABELS)
    assert scores == [-0.1, -1.5, -4.0 - FLOOR_MARGIN, -4.0 - FLOOR_MARGIN]
    assert label_scores_from_top([("I", -0.1), ("Hmm", -1.0)], LABELS) is None


# ------------------------------------------------------------------------------------------------
# Labels


def test_labels_with_logprobs() -> None:
    with server() as srv:
        ann = annotator(srv.url)
        answers = run_all(ann, [t for t, _ in TEXTS])
    for (_, gold), ans in zip(TEXTS, answers, strict=True):
        assert ans.label == gold
        assert ans.scores is not None and len(ans.scores) == len(LABELS)
        assert max(range(len(LABELS)), key=ans.scores.__getitem__) == LABELS.index(gold)
        assert ans.scores[LABELS.index(gold)] == pytest.approx(-0.05)
        assert ans.prompt_tokens > 0 and ans.completion_tokens > 0
        assert ans.evaluated_tokens == ans.prompt_tokens
    body = srv.bodies[0]
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    # the first answer token decides: 1 answer token is asked, not the full 16
    assert body["temperature"] == 0 and body["max_tokens"] == 1 and body["model"] == "test-model"
    assert srv.requests == len(TEXTS)
    assert no_worker_threads()


def test_labels_with_logprobs_disabled() -> None:
    with server() as srv:
        answers = run_all(annotator(srv.url, use_logprobs=False), [t for t, _ in TEXTS])
    assert [a.label for a in answers] == [g for _, g in TEXTS]
    assert all(a.scores is None for a in answers)
    assert "logprobs" not in srv.bodies[0]


def test_server_without_logprobs_falls_back_to_parse() -> None:
    with server(logprobs=False) as srv:  # like Ollama: ignores the logprobs request
        answers = run_all(annotator(srv.url, max_concurrency=1), [t for t, _ in TEXTS])
    assert [a.label for a in answers] == [g for _, g in TEXTS]
    assert all(a.scores is None for a in answers)
    # the first short answer shows the server ignores logprobs: it and every later one in full
    assert srv.requests == len(TEXTS) + 1
    assert [b["max_tokens"] for b in srv.bodies] == [1] + [16] * len(TEXTS)


def test_a_tie_on_the_first_token_asks_for_the_whole_answer() -> None:
    """ "Sports" and "Sci/Tech" share the first token "S": the short answer cannot tell them apart
    when the server cuts it there, so the whole answer is asked and its text breaks the tie."""

    with server(keywords={"match": "Sports"}, chars_per_token=1, honour_max_tokens=True) as srv:
        [ans] = run_all(annotator(srv.url), ["the match"])
    assert ans.label == "Sports" and srv.requests == 2
    assert [b["max_tokens"] for b in srv.bodies] == [1, 16]


def test_answers_cached_with_one_count_of_answer_tokens_serve_another() -> None:
    """The label comes from the first token whatever the count asked, so a run resumed with
    another ``score_tokens`` must find the answers it already paid for."""
    url = "http://127.0.0.1:1/v1"
    one, four = (
        annotator(url, score_tokens=1, allow_plain_http=True),
        annotator(url, score_tokens=4, allow_plain_http=True),
    )
    assert one.identity == four.identity
    assert one.identity != annotator(url, max_tokens=8, allow_plain_http=True).identity


# ------------------------------------------------------------------------------------------------
# Retries


def test_429_then_success_honours_retry_after() -> None:
    with server(script=["429:0.3"]) as srv:
        start = time.monotonic()
        [ans] = run_all(annotator(srv.url, backoff_base=0.001), [TEXTS[0][0]])
        elapsed = time.monotonic() - start
    assert ans.label == "Sports"
    assert srv.counts == {"429:0.3": 1, "ok": 1}
    assert elapsed >= 0.29  # Retry-After, not the 1 ms backoff


def test_500s_then_success() -> None:
    with server(script=["500", "503", "500"]) as srv:
        [ans] = run_all(annotator(srv.url), [TEXTS[1][0]])
    assert ans.label == "Business"
    assert srv.requests == 4


def test_slow_answer_times_out_then_success() -> None:
    with server(script=["slow:3.0"]) as srv:
        start = time.monotonic()
        [ans] = run_all(annotator(srv.url, timeout=0.3), [TEXTS[2][0]])
        elapsed = time.monotonic() - start
    assert ans.label == "World"
    assert srv.counts == {"slow:3.0": 1, "ok": 1}
    assert elapsed < 2.0


def test_garbage_and_dropped_connection_then_success() -> None:
    with server(script=["garbage", "drop"]) as srv:
        [ans] = run_all(annotator(srv.url), [TEXTS[3][0]])
    assert ans.label == "Sci/Tech"
    assert srv.counts == {"garbage": 1, "drop": 1, "ok": 1}


def test_retries_exhausted_raise() -> None:
    with server(default="500") as srv:
        ann = annotator(srv.url, max_retries=2)
        with pytest.raises(FreeALError, match=r"3 attempts.*HTTP 500"):
            run_all(ann, [TEXTS[0][0]])
    assert srv.requests == 3
    assert no_worker_threads()


def test_client_error_is_not_retried_and_hides_key() -> None:
    with server(script=["401"]) as srv:
        ann = annotator(srv.url)
        with pytest.raises(FreeALError) as info:
            run_all(ann, [TEXTS[0][0]])
    message = str(info.value)
    assert "401" in message and "Incorrect API key" in message
    assert SECRET not in message
    assert srv.requests == 1
    assert srv.auth_headers == [f"Bearer {SECRET}"]  # the server did see (and echo) it
    assert no_worker_threads()


# ------------------------------------------------------------------------------------------------
# Re-ask and abstention


def test_non_label_answer_is_reasked_once() -> None:
    with server(script=["nolabel", "nolabel"]) as srv:  # the short answer, then the whole one
        [ans] = run_all(annotator(srv.url), [TEXTS[0][0]])
    assert ans.label == "Sports"
    assert ans.scores is not None  # the re-ask's logprobs
    assert srv.requests == 3
    second = srv.bodies[2]["messages"]
    assert second[-2] == {"role": "assistant", "content": NOLABEL_ANSWER}
    assert second[-1] == {
        "role": "user",
        "content": "Answer with exactly one of: Sports, Business, World, Sci/Tech.",
    }
    # usage summed over both requests
    assert ans.prompt_tokens == sum(
        max(1, sum(len(m["content"]) for m in b["messages"]) // 4) for b in srv.bodies
    )


def test_never_a_label_abstains_after_exactly_three_requests() -> None:
    with server(default="nolabel") as srv:  # short answer, whole answer, "answer with one of"
        [ans] = run_all(annotator(srv.url), [TEXTS[0][0]])
    assert ans.label is None and ans.scores is None
    assert srv.requests == 3
    assert ans.prompt_tokens > 0


# ------------------------------------------------------------------------------------------------
# Concurrency, endpoints, keys, rate limits


def test_concurrency_bound() -> None:
    with server(latency=0.1) as srv:
        answers = run_all(annotator(srv.url, max_concurrency=3), [TEXTS[i % 4][0] for i in range(12)])
    assert all(a.label is not None for a in answers)
    assert srv.max_in_flight == 3


def test_connections_are_kept_open_between_requests() -> None:
    """Against a server that keeps connections alive, a connection is not opened per request: at
    most one per request in flight (``bench/scale_loop.py --keep-alive`` serves this way)."""
    texts = [TEXTS[i % 4][0] + f" ({i})" for i in range(40)]
    with server(keep_alive=True) as srv:
        answers = run_all(annotator(srv.url, max_concurrency=4), texts)
    assert [a.label for a in answers] == [TEXTS[i % 4][1] for i in range(40)]
    assert srv.requests == 40
    assert srv.connections <= 4
    with server() as closing:  # HTTP/1.0: the server closes each connection after its answer
        run_all(annotator(closing.url, max_concurrency=4), texts)
    assert closing.connections == 40


def test_a_pool_of_servers_spreads_work_by_speed_and_survives_one_killed() -> None:
    """Three servers of different speeds; the middle one dies a third of the way through. Every
    text is answered once, right; the dead server's requests go to the others; the faster of the
    two live ones takes more of the work."""
    texts = [TEXTS[i % 4][0] for i in range(90)]
    with server(latency=0.01) as fast, server(latency=0.03) as doomed, server(latency=0.08) as slow:
        ann = OpenAICompatAnnotator(
            "test-model",
            endpoints=[(fast.url, KEY_ENV), (doomed.url, KEY_ENV), (slow.url, KEY_ENV)],
            max_concurrency=2,
            backoff_base=0.05,
            backoff_max=2.0,
            timeout=2.0,
        )
        answers: dict[int, LabelScores] = {}
        for index, answer in ann.score_many([prompt(t) for t in texts], LABELS):
            answers[index] = answer
            if len(answers) == 30:
                doomed.stop()  # killed: its port refuses connections from now on
                at_kill = doomed.requests
    assert sorted(answers) == list(range(90))
    assert [answers[i].label for i in range(90)] == [TEXTS[i % 4][1] for i in range(90)]
    assert doomed.requests == at_kill  # (a stopped server counts no more requests)
    assert fast.requests + doomed.requests + slow.requests == 90  # no text paid for twice
    assert fast.requests > slow.requests


def test_two_endpoints_both_used_with_their_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FREEAL_KEY_A", "key-a")
    monkeypatch.setenv("FREEAL_KEY_B", "key-b")
    with server(latency=0.05) as a, server(latency=0.05) as b:
        ann = OpenAICompatAnnotator(
            "test-model", endpoints=[(a.url, "FREEAL_KEY_A"), [b.url, "FREEAL_KEY_B"]], max_concurrency=2
        )
        answers = run_all(ann, [TEXTS[i % 4][0] for i in range(12)])
    assert [x.label for x in answers] == [TEXTS[i % 4][1] for i in range(12)]
    assert a.requests >= 3 and b.requests >= 3 and a.requests + b.requests == 12
    assert set(a.auth_headers) == {"Bearer key-a"} and set(b.auth_headers) == {"Bearer key-b"}
    assert a.max_in_flight <= 2 and b.max_in_flight <= 2
    assert a.url.removesuffix("/v1") in ann.identity and b.url.removesuffix("/v1") in ann.identity


def test_requests_run_only_a_few_per_worker_ahead_of_the_reader() -> None:
    """A million prompts are not all queued at once (each queued one holds a future and then its
    answer until read): while the reader pauses after its first answer, at most 4 per worker
    (and the one that answer freed) are sent; the rest follow as it reads on."""
    texts = [f"{TEXTS[i % 4][0]} (item {i})" for i in range(400)]
    with server() as srv:
        stream = annotator(srv.url, max_concurrency=2).score_many([prompt(t) for t in texts], LABELS)
        first = next(stream)
        time.sleep(0.5)  # a zero-latency server answers hundreds in this time if let
        sent_while_paused = srv.requests
        rest = list(stream)
    assert sent_while_paused <= 4 * 2 + 1
    assert sorted([first[0], *(i for i, _ in rest)]) == list(range(400))
    assert srv.requests == 400 and no_worker_threads()


def test_each_endpoint_keeps_its_own_concurrency(tmp_path) -> None:
    """One slot on one server, four on the other (the run-wide bound is 2), set in the run config:
    neither ever has more requests in flight than its own bound, the roomier one goes past 2 and
    takes most of the work, and the limits leave the identity (the cache key) as it is without them."""
    with server(latency=0.1) as one, server(latency=0.1) as four:
        endpoints = [
            {"base_url": one.url, "api_key_env": KEY_ENV, "max_concurrency": 1},
            {"base_url": four.url, "api_key_env": KEY_ENV, "max_concurrency": 4, "rpm": 6000},
        ]
        cfg = LLMConfig(
            backend="openai",
            model="test-model",
            endpoints=endpoints,
            max_concurrency=2,
            cache_path=tmp_path / "c.sqlite",
        )
        texts = [f"{TEXTS[i % 4][0]} (item {i})" for i in range(20)]  # distinct: the cache asks each once
        answers = run_all(make_annotator(cfg), texts)
        bare = [Endpoint(base_url=e["base_url"], api_key_env=KEY_ENV) for e in endpoints]
        plain = cfg.model_copy(update={"endpoints": bare})
    assert [x.label for x in answers] == [TEXTS[i % 4][1] for i in range(20)]
    # above the run-wide 2, so its own 4 applied
    assert one.max_in_flight == 1 and 2 < four.max_in_flight <= 4
    assert one.requests + four.requests == 20 and four.requests > one.requests
    assert annotator_identity(cfg) == annotator_identity(plain)


def test_key_from_named_env_var_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_LLM_KEY", "sk-very-secret-key")
    with server() as srv:
        ann = annotator(srv.url, api_key_env="MY_LLM_KEY")
        run_all(ann, [TEXTS[0][0]])
    assert srv.auth_headers == ["Bearer sk-very-secret-key"]
    for shown in (ann.identity, repr(ann), str(ann), repr(vars(ann))):
        assert "sk-very-secret-key" not in shown
    assert ann.identity.startswith("openai:test-model@http://127.0.0.1:")
    assert "MY_LLM_KEY" in repr(ann)
    monkeypatch.delenv("MY_LLM_KEY")
    with server() as srv:
        run_all(annotator(srv.url, api_key_env="MY_LLM_KEY"), [TEXTS[0][0]])
    assert srv.auth_headers == [None]  # no key, no header (local servers need none)


def test_identity_names_mode_not_key() -> None:
    a = OpenAICompatAnnotator("m", "http://user:pw@localhost:8000/v1/")
    b = OpenAICompatAnnotator("m", "http://localhost:8000/v1", use_logprobs=False)
    assert a.identity != b.identity
    assert a.identity.startswith("openai:m@http://localhost:8000/v1:")
    assert "pw" not in a.identity and "pw" not in repr(a)


def test_requests_per_minute_slows_a_burst() -> None:
    # 600/min = 10/s with a 1 s burst of 10: sending 15 requests needs >= 0.5 s of refill, however fast
    # or slow the machine is.
    with server() as srv:
        start = time.monotonic()
        run_all(annotator(srv.url, requests_per_minute=600), [TEXTS[i % 4][0] for i in range(15)])
        elapsed = time.monotonic() - start
    assert elapsed < 3.0
    times = srv.request_times
    assert len(times) == 15
    assert times[-1] - start >= 0.5  # the bucket starts full when the annotator is made, after `start`


def test_tokens_per_minute_slows_a_burst() -> None:
    # Each request ~ 100 prompt tokens (+16 completion); 30000/min = 500/s: 8 requests need ~0.9 s.
    text = TEXTS[0][0] + " " + "x" * 330
    with server() as srv:
        start = time.monotonic()
        run_all(annotator(srv.url, tokens_per_minute=30_000), [text] * 8)
        elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 4.0


# ------------------------------------------------------------------------------------------------
# Streaming and threads


def test_results_stream_and_early_close_cleans_up() -> None:
    def policy(user_messages: list[str]) -> str:
        if "slowpoke" in user_messages[-1]:
            time.sleep(2.0)
        return keyword_policy(KEYWORDS)(user_messages)

    with server(policy=policy) as srv:
        ann = annotator(srv.url)
        texts = ["slowpoke football", *[t for t, _ in TEXTS]]
        start = time.monotonic()
        gen = ann.score_many([prompt(t) for t in texts], LABELS)
        first_index, _ = next(gen)
        assert time.monotonic() - start < 1.5  # did not wait for the slow one
        assert first_index != 0
        gen.close()  # abandon the slow request
        assert no_worker_threads()


def test_works_inside_a_running_event_loop_and_other_threads() -> None:
    with server() as srv:
        ann = annotator(srv.url)

        async def inside_loop() -> list[LabelScores]:
            return run_all(ann, [TEXTS[0][0]])

        assert asyncio.run(inside_loop())[0].label == "Sports"
        got: list[str | None] = []
        thread = threading.Thread(target=lambda: got.append(run_all(ann, [TEXTS[1][0]])[0].label))
        thread.start()
        thread.join(10)
        assert got == ["Business"]
    assert no_worker_threads()


def test_bad_configuration() -> None:
    with pytest.raises(FreeALError):
        OpenAICompatAnnotator("m", "http://x/v1", endpoints=[("http://y/v1", "K")])
    with pytest.raises(FreeALError):
        OpenAICompatAnnotator("m", "http://x/v1", max_concurrency=0)
    with pytest.raises(FreeALError, match="max_concurrency of http://y/v1"):
        OpenAICompatAnnotator("m", endpoints=[EndpointSpec("http://y/v1", max_concurrency=0)])
    with pytest.raises(FreeALError):
        OpenAICompatAnnotator("", "http://x/v1")
    ann = OpenAICompatAnnotator("m", "http://127.0.0.1:9/v1")
    with pytest.raises(FreeALError):
        ann.score_many([prompt("x")], ["a", "A"])
    assert list(ann.score_many([], LABELS)) == []
