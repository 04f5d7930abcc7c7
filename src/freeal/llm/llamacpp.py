"""The embedded annotator: a GGUF model run in-process by llama.cpp, answering by label scoring.

Label scoring reads the log-probability of each label's tokens right after the prompt (summed over
a label's tokens) instead of letting the model write free text, so every answer is a label of the
set and comes with a score per label.

Scoring is batched over texts. Prompts that share a prefix (the instructions, and in later rounds a
group's demonstrations) hold it once in llama.cpp's KV cache as a prefix of many sequences; the
tails of many texts (and the tokens of multi-token labels) are then evaluated in one decode, each in
its own sequence. An item costs its own tokens plus its labels' tokens, evaluated in large batches,
where llama.cpp's CPU kernels run fastest.
"""

from __future__ import annotations

import ctypes
import os
import weakref
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
    ``n_ctx`` (longest prompt in tokens), ``batch_tokens`` (text tokens scored per decode), ``name``
    (shown in the cache identity instead of the path,
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
        batch_tokens: int = 512,
        name: str | None = None,
        extra_buffers: ExtraBuffers = "auto",
    ) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        path = Path(model_path)
        if not path.is_file():
            raise FreeALError(f"{path}: GGUF model file not found")
        self.model_path = path
        self.n_threads = n_threads or default_threads()
        self.n_ctx = n_ctx
        self.batch_tokens = batch_tokens
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
        self.identity = f"llamacpp:{name or path.name}"
        self.supports_grammar = True
        self._label_tokens: dict[str, list[int]] = {}
        self._scorer = SharedPrefixScorer(self.llm, batch_tokens=batch_tokens, n_threads=self.n_threads)
        # llama.cpp's memory is freed when the annotator goes, or at the interpreter's exit while
        # llama_cpp is still whole (an object left to module teardown prints "Exception ignored"),
        # and always the scoring context before the model whose weights it reads
        self._release = weakref.finalize(self, _release_native, self._scorer, self.llm)

    def close(self) -> None:
        """Free the model and its scoring context now; the annotator cannot be used afterwards."""
        self._release()

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

    def score(self, messages: list[Message], labels: Sequence[str]) -> LabelScores:
        return next(self.score_many([messages], labels))[1]

    def score_many(
        self, prompts: Sequence[list[Message]], labels: Sequence[str]
    ) -> Iterator[tuple[int, LabelScores]]:
        """Label scores for every prompt, many prompts per decode (see :class:`SharedPrefixScorer`);
        answers come in the prompts' order, each as soon as its batch is decoded."""
        tokens = [self.render(m) for m in prompts]
        targets = [self.label_tokens(lab) for lab in labels]
        longest = max(len(t) for t in targets)
        for prompt in tokens:
            if len(prompt) + longest > self.n_ctx:
                raise FreeALError(
                    f"a prompt of {len(prompt)} tokens does not fit the model's context of {self.n_ctx} "
                    "tokens; raise n_ctx or shorten the texts"
                )
        for i, scores, evaluated in self._scorer.score(tokens, targets):
            best = int(np.argmax(scores))
            yield (
                i,
                LabelScores(
                    label=labels[best],
                    scores=scores,
                    prompt_tokens=len(tokens[i]),
                    evaluated_tokens=evaluated,
                ),
            )

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
        With ``grammars``, llama.cpp samples only tokens the prompt's grammar allows; greedy answers
        under a grammar (``temperature`` 0, NER's entity lists) go through :meth:`_greedy_under_grammar`."""
        for i, messages in enumerate(prompts):
            grammar = (
                llama_cpp.LlamaGrammar.from_string(grammars[i], verbose=False)
                if grammars is not None
                else None
            )
            # llama.cpp keeps the longest prefix it already holds: count only what it must evaluate
            prompt = self.render(messages)
            kept = min(common_prefix(self.llm.input_ids[: self.llm.n_tokens], prompt), len(prompt) - 1)
            if grammar is not None and temperature == 0:
                text, generated = self._greedy_under_grammar(prompt, kept, grammar, max_tokens)
                yield i, Generation(text, len(prompt), generated, evaluated_tokens=len(prompt) - kept)
                continue
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

    def _greedy_under_grammar(
        self, prompt: list[int], kept: int, grammar: llama_cpp.LlamaGrammar, max_tokens: int
    ) -> tuple[str, int]:
        """The greedy answer under ``grammar`` and its token count, as llama-cpp-python's own sampler
        chain gives it, found with far fewer grammar checks.

        That chain runs the grammar over the whole vocabulary (152k tokens for Qwen) before every
        greedy pick: constrained decoding cost the 1.5B about 40% more per generated token than free
        decoding (BENCHMARKS.md, NER generation). A greedy pick needs only the best token the grammar
        allows, so the most likely token is checked alone, and the vocabulary goes through the
        grammar only when that token is refused (llama.cpp's own sampler does the same). Ties go to
        the lowest token id in both ways, so the answer is the same token for token, up to the rule below.

        The answer ends where it writes a line for the third time (that copy left out): a greedy
        answer that repeats its lines has fallen into a loop, which runs to ``max_tokens`` (SmolLM2
        on 80 of 100 BC5CDR sentences); for an entity list the copies add nothing. Ending at the
        first copy instead changed 2 of those 100 sentences' entities, where a line came back once
        and a new one followed (none of the 1.5B's 300; BENCHMARKS.md, NER generation)."""
        llm = self.llm
        vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        n_vocab = llm.n_vocab()
        llm.n_tokens = kept  # llm.eval drops the KV cells after the kept prefix
        llm.eval(prompt[kept:])
        checker = llama_cpp.llama_sampler_init_grammar(
            vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
        )
        one = np.zeros(1, dtype=_TOKEN_DATA)
        every = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        ids = np.arange(n_vocab, dtype=np.intc)
        answer: list[int] = []
        try:
            for _ in range(max_tokens):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
                token = int(np.argmax(logits))
                one["id"], one["logit"] = token, logits[token]
                if not np.isfinite(_grammar_pass(checker, one)["logit"][0]):
                    every["id"], every["logit"], every["p"] = ids, logits, 0.0
                    token = int(np.argmax(_grammar_pass(checker, every)["logit"]))
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                llama_cpp.llama_sampler_accept(checker, token)
                answer.append(token)
                if b"\n" in llm.detokenize([token]):
                    lines = llm.detokenize(answer).split(b"\n")[:-1]
                    third = next((k for k, line in enumerate(lines) if lines[:k].count(line) == 2), None)
                    if third is not None:
                        text = b"".join(line + b"\n" for line in lines[:third])
                        return text.decode("utf-8", errors="ignore"), len(answer)
                llm.eval([token])
        finally:
            llama_cpp.llama_sampler_free(checker)
        return llm.detokenize(answer).decode("utf-8", errors="ignore"), len(answer)


#: llama.cpp's ``llama_token_data``: a candidate token, its logit and probability
_TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)


def _grammar_pass(checker: llama_cpp.llama_sampler_p, candidates: np.ndarray) -> np.ndarray:
    """``candidates`` with the logits of the tokens the grammar refuses set to -inf (in place)."""
    array = llama_cpp.llama_token_data_array(
        data=candidates.ctypes.data_as(llama_cpp.llama_token_data_p),
        size=len(candidates),
        selected=-1,
        sorted=False,
    )
    llama_cpp.llama_sampler_apply(checker, ctypes.byref(array))
    return candidates


def _release_native(scorer: SharedPrefixScorer, llm: llama_cpp.Llama) -> None:
    scorer.close()
    llm.close()


class SharedPrefixScorer:
    """Scores many prompts per ``llama_decode`` in a context of its own, sharing the model's weights.

    Prompts are taken in order and cut into chunks whose members share a prefix and whose tails fit
    ``batch_tokens``. The prefix is decoded once, in sequence 0, and copied to the other sequences
    (``seq_cp``); it stays for the next chunk, which evaluates only what differs. Each member's tail
    is then decoded in its own sequence, all members in one batch; a label of several tokens gets a
    copy of the member's sequence and its later tokens in a second batch. Logits are kept only
    where a label token is read.

    The KV cache is split per sequence (``kv_unified`` off): with a unified cache, this llama.cpp
    gives a sequence different logits once a batch holds 32 tokens or more (llama.cpp issue 24962;
    measured here: 0.17 nats on the same text in two sequences), where split sequences score a text
    exactly as the model's main context does. A chunk ends at a prompt whose shared prefix is clearly
    shorter (a new demonstration group), so grouped prompts keep their long prefixes.
    """

    #: a chunk goes on while the next prompt shortens the shared prefix by at most this many tokens
    #: (two texts that happen to start alike); more means another group's demonstrations
    PREFIX_SLACK = 16
    #: the most sequences, and the most KV cells over all of them (about 0.5 GB for the 1.5B)
    MAX_SEQUENCES = 32
    MAX_CELLS = 16384

    def __init__(self, llm: llama_cpp.Llama, *, batch_tokens: int, n_threads: int) -> None:
        self.llm = llm
        self.batch_tokens = batch_tokens
        self.n_threads = n_threads
        self.n_vocab = llm.n_vocab()
        self.ctx = None
        self.per_sequence = 0  # KV cells of each sequence in the current context
        self.n_seq = 0

    def close(self) -> None:
        if self.ctx is not None:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def _fit(self, longest: int) -> None:
        """A context whose sequences each hold ``longest`` tokens (made again only to grow)."""
        if self.ctx is not None and longest <= self.per_sequence:
            return
        self.close()
        per_sequence = -(-longest // 256) * 256
        n_seq = max(
            1,
            min(self.MAX_SEQUENCES, llama_cpp.llama_max_parallel_sequences(), self.MAX_CELLS // per_sequence),
        )
        # the model's own settings (flash attention off, the KV cache's types), so that a text scores
        # the same here as in the model's main context
        params = llama_cpp.llama_context_params.from_buffer_copy(self.llm.context_params)
        params.n_ctx = per_sequence * n_seq
        params.n_batch = params.n_ubatch = self.batch_tokens
        params.n_seq_max = n_seq
        params.kv_unified = False
        params.n_threads = params.n_threads_batch = self.n_threads
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self.llm._model.model, params)
        if ctx is None:
            raise FreeALError("llama.cpp could not create a scoring context (out of memory?)")
        self.ctx, self.per_sequence, self.n_seq = ctx, per_sequence, n_seq
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.batch = llama_cpp.llama_batch_init(self.batch_tokens, 0, 1)
        self.held: list[int] = []  # the prefix sequence 0 holds
        self.synced: set[int] = {0}  # the sequences holding exactly that prefix

    def score(
        self, prompts: Sequence[list[int]], targets: Sequence[list[int]]
    ) -> Iterator[tuple[int, list[float], int]]:
        """Per prompt (its position first, in no fixed order): each target's summed log-probability
        after the prompt, and how many tokens were evaluated for it (its tail and label tokens, plus
        any new prefix)."""
        extra = sum(len(t) - 1 for t in targets)
        self._fit(max(len(p) for p in prompts) + extra)
        branches = max(1, sum(len(t) > 1 for t in targets))
        for run in self._runs(prompts):
            # texts of similar length together: a split KV cache decodes as many tokens of every
            # sequence per step, so unequal tails leave short, slow steps
            run.sort(key=lambda i: len(prompts[i]))
            chunk: list[int] = []
            for i in run:
                members = [*chunk, i]
                prefix = min(_shared_prefix(prompts, members), min(len(prompts[j]) for j in members) - 1)
                # every tail as long as the longest (see _decode_chunk), and the label rows likewise
                tails = len(members) * max(len(prompts[j]) - prefix for j in members)
                rows = len(members) * branches * extra
                if chunk and (max(tails, rows) > self.batch_tokens or len(members) * branches > self.n_seq):
                    yield from self._decode(prompts, chunk, targets)
                    chunk = [i]
                else:
                    chunk = members
            yield from self._decode(prompts, chunk, targets)

    def _runs(self, prompts: Sequence[list[int]]) -> list[list[int]]:
        """Consecutive prompts that share a prefix: a run ends where the next prompt shares clearly
        less of it (another group's demonstrations), not where two texts happen to start alike."""
        runs: list[list[int]] = []
        shared = 0
        for i, tokens in enumerate(prompts):
            if runs:
                now = min(shared, common_prefix(prompts[runs[-1][0]], tokens))
                if len(runs[-1]) == 1 or shared - now <= self.PREFIX_SLACK:
                    runs[-1].append(i)
                    shared = now
                    continue
            runs.append([i])
            shared = len(tokens)
        return runs

    def _decode(
        self, prompts: Sequence[list[int]], chunk: list[int], targets: Sequence[list[int]]
    ) -> list[tuple[int, list[float], int]]:
        """Score one chunk; the KV cache holds just the prefix afterwards, also when the caller stops
        in the middle of the chunk's answers or an interrupt lands inside llama.cpp (then it holds
        nothing, and the next chunk evaluates its prefix again)."""
        try:
            return self._decode_chunk(prompts, chunk, targets)
        except BaseException:
            llama_cpp.llama_memory_clear(self.memory, True)
            self.held, self.synced = [], {0}
            raise

    def _decode_chunk(
        self, prompts: Sequence[list[int]], chunk: list[int], targets: Sequence[list[int]]
    ) -> list[tuple[int, list[float], int]]:
        # Every llama_decode step reads all the weights once, whatever its size, and llama.cpp cuts a
        # batch over split sequences into steps that take as many tokens from each sequence: tails
        # of unequal length cost one more step per distinct length. So every tail is made as long as
        # the longest, a shorter prompt taking back the last few tokens of its copy of the prefix,
        # and every member's label rows as long as the longest label's, each taking back a few
        # prompt tokens: one step for the tails and one for the labels.
        chunk = sorted(chunk, key=lambda i: -len(prompts[i]))  # sequence 0 gets a whole prefix
        if len(chunk) == 1:  # no prefix to share: keep what the cache holds, decode the rest at once
            prefix = min(len(prompts[chunk[0]]) - 1, common_prefix(self.held, prompts[chunk[0]]))
        else:
            prefix = min(_shared_prefix(prompts, chunk), len(prompts[chunk[-1]]) - 1)
        multi = [t for t in targets if len(t) > 1]
        branches = max(1, len(multi))
        new_prefix = self._hold(prompts[chunk[0]][:prefix], len(chunk) * branches)
        longest = len(prompts[chunk[0]]) - prefix
        rows = max((len(t) - 1 for t in multi), default=0)
        tails: list[tuple[int, int, int, bool]] = []  # token, position, sequence, logits
        labels: list[tuple[int, int, int, bool]] = []
        ends: list[int] = []  # per member: its tail's last entry
        starts: list[list[int]] = []  # per member: the entry of each multi-token label's first token
        evaluated: list[int] = []
        retaken: set[int] = set()  # sequences whose copy of the prefix was partly evaluated again
        for r, i in enumerate(chunk):
            own, length = r * branches, len(prompts[i])
            begin = max(0, length - longest)
            if begin < prefix:
                llama_cpp.llama_memory_seq_rm(self.memory, own, begin, -1)
                retaken.add(own)
            tail = prompts[i][begin:]
            tails += [(t, begin + k, own, k == len(tail) - 1) for k, t in enumerate(tail)]
            ends.append(len(tails) - 1)
            starts.append([])
            spent = len(tail)
            for j, target in enumerate(multi):
                back = rows - (len(target) - 1)  # prompt tokens taken back to make the rows equal
                row = prompts[i][length - back :] + target[:-1]
                starts[-1].append(len(labels) + back)
                labels += [(t, length - back + k, own + j, k >= back) for k, t in enumerate(row)]
                spent += len(row)
            evaluated.append(spent)
        self._run(tails)
        lead = {r: self._logprobs(end) for r, end in enumerate(ends)}
        later: dict[int, np.ndarray] = {}
        if labels:
            # Label tokens go in a batch of their own, each multi-token label of a member in a copy
            # of the member's sequence, its rows cut back to where they start.
            for r, i in enumerate(chunk):
                length = len(prompts[i])
                for j, target in enumerate(multi):
                    seq = r * branches + j
                    if j:
                        llama_cpp.llama_memory_seq_cp(self.memory, r * branches, seq, -1, -1)
                    back = rows - (len(target) - 1)
                    if back:
                        llama_cpp.llama_memory_seq_rm(self.memory, seq, length - back, -1)
            self._run(labels)
            later = {n: self._logprobs(n) for n, entry in enumerate(labels) if entry[3]}
        answers = []
        for r, i in enumerate(chunk):
            scores: list[float] = []
            m = 0
            for target in targets:
                total = float(lead[r][target[0]])
                if len(target) > 1:
                    total += sum(
                        (float(later[starts[r][m] + k - 1][target[k]]) for k in range(1, len(target))), 0.0
                    )
                    m += 1
                scores.append(total)
            answers.append((i, scores, evaluated[r] + (new_prefix if r == 0 else 0)))
        if len(chunk) == 1:  # keep the whole prompt: the next one may share more than the prefix
            whole = prompts[chunk[0]]
            llama_cpp.llama_memory_seq_rm(self.memory, 0, len(whole), -1)
            for seq in range(1, branches):
                llama_cpp.llama_memory_seq_rm(self.memory, seq, -1, -1)
            self.held, self.synced = list(whole), {0}
            return answers
        for seq in range(len(chunk) * branches):  # drop the tails, keep the prefix
            llama_cpp.llama_memory_seq_rm(self.memory, seq, prefix, -1)
        self.synced -= retaken - {0}  # their prefix cells were evaluated again: copy afresh next time
        return answers

    def _hold(self, shared: list[int], n_seq: int) -> int:
        """Make sequences ``0..n_seq-1`` hold exactly ``shared``; how many tokens that evaluated."""
        keep = common_prefix(self.held, shared)
        if keep < len(self.held) or keep < len(shared):
            llama_cpp.llama_memory_seq_rm(self.memory, 0, keep, -1)
            for start in range(keep, len(shared), self.batch_tokens):
                piece = shared[start : start + self.batch_tokens]
                self._run([(token, start + k, 0, False) for k, token in enumerate(piece)])
            self.held, self.synced = list(shared), {0}
        for seq in range(1, n_seq):
            if seq not in self.synced:  # a whole-sequence copy: this cache keeps sequences apart
                llama_cpp.llama_memory_seq_rm(self.memory, seq, -1, -1)
                llama_cpp.llama_memory_seq_cp(self.memory, 0, seq, -1, -1)
                self.synced.add(seq)
        return len(shared) - keep

    def _run(self, entries: list[tuple[int, int, int, bool]]) -> None:
        batch = self.batch
        batch.n_tokens = len(entries)
        for n, (token, position, seq, logits) in enumerate(entries):
            batch.token[n] = token
            batch.pos[n] = position
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq
            batch.logits[n] = logits
        code = llama_cpp.llama_decode(self.ctx, batch)
        if code != 0:
            raise FreeALError(f"llama.cpp could not decode a batch of {len(entries)} tokens (code {code})")

    def _logprobs(self, index: int) -> np.ndarray:
        raw = llama_cpp.llama_get_logits_ith(self.ctx, index)
        logits = np.ctypeslib.as_array(raw, shape=(self.n_vocab,)).astype(np.float64)
        top = logits.max()
        return logits - (top + np.log(np.exp(logits - top).sum()))


def _shared_prefix(prompts: Sequence[list[int]], members: Sequence[int]) -> int:
    """The length of the prefix all ``members`` share."""
    first = prompts[members[0]]
    return min((common_prefix(first, prompts[j]) for j in members[1:]), default=len(first))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    same = np.asarray(a[:n]) == np.asarray(b[:n])
    return int(n if same.all() else np.argmin(same))
