"""The llama.cpp backend's decode loop: many sequences per decode step, a finished sequence's slot refilled at once,
common prompt prefixes decoded once into cached prefix streams (LRU) and copied into each sequence's KV cache,
sampling in numpy per sequence."""

from __future__ import annotations

import ctypes
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from cai_engine import GenerationSettings, ModelError


@dataclass
class Job:
    """One sequence to run: a prompt, then either generation or reading log-probs at given positions."""

    index: int
    tokens: list[int]
    max_new: int = 0  # tokens to generate (0: scoring only)
    want: tuple[int, ...] = ()  # positions whose next-token log-probs are read (scoring)
    seed: int | None = None
    # filled while running
    fed: int = 0  # prompt tokens already in the KV cache
    generated: list[int] = field(default_factory=list)
    logprobs: dict[int, Any] = field(default_factory=dict)
    done: bool = False
    seen: set[int] | None = None  # token ids the repetition penalty applies to


class BatchedDecoding:
    """The llama.cpp backend's decode loop (continuous batching, shared-prefix KV copy, per-sequence sampling).

    A mixin: it drives the model, context and batch that :class:`~cai_engine.default_plugins.backends.llama_cpp.LlamaCppBackend`
    loads (``_llm``, ``_ctx``, ``_batch``, the prefix streams, the sizes and counters).
    """

    _llm: Any
    _ctx: Any
    _c: Any
    _batch: Any
    _memory: Any
    _vocab: Any
    _prefixes: dict[int, list[int]]  # prefix stream id -> the tokens it holds
    _prefix_used: dict[int, int]  # prefix stream id -> when it was last used
    _prefix_streams: range
    _tick: int
    _eog: frozenset[int] | None
    options: Any
    n_vocab: int
    generated_tokens: int
    prompt_tokens: int
    shared_prefix_tokens: int
    seconds: float

    def _detokenize(self, tokens: list[int]) -> str:
        raise NotImplementedError

    # -- prefixes --------------------------------------------------------------------------------------------

    def _plan(self, jobs: list[Job]) -> list[tuple[int, list[Job]]]:
        """Split a call into groups that each share a prompt prefix: [(prefix length, jobs)], run one after another.

        Every job keeps at least one token of its own and every position whose log-probs are read. A call of one
        prompt caches that prompt (all but its last token), so the next call that starts the same way reuses it.
        Scoring calls (no generation) are also split into groups that share more than the whole call does (the
        principles asked about one reply, the candidate continuations of one prompt): a group is kept when the
        prompt tokens it saves, ``(members - 1) * (its prefix - the call's prefix)``, reach ``share_prefix``.
        Generation keeps one group so that every slot stays busy.
        """
        minimum = self.options.share_prefix
        if not minimum:
            return [(0, jobs)]
        every = _common_length([j.tokens for j in jobs], min(_own(j) for j in jobs))
        groups: list[tuple[int, list[Job]]] = []
        rest = list(jobs)
        if len(jobs) > 2 and all(not j.max_new for j in jobs):
            order = sorted(jobs, key=lambda j: j.tokens)
            # shared[k]: how much the k-th and the next job share beyond what the whole call shares
            shared = [_common_length([a.tokens, b.tokens], min(_own(a), _own(b))) - every for a, b in pairwise(order)]
            rest, i = [], 0
            while i < len(order):
                if i + 2 < len(order) and shared[i] < minimum and shared[i] < shared[i + 1]:
                    rest.append(order[i])  # it shares little with the next, which shares more with its own next
                    i += 1
                    continue
                members, length = [order[i]], None
                j = i + 1
                while j < len(order) and shared[j - 1] > 0:
                    extended = shared[j - 1] if length is None else min(length, shared[j - 1])
                    if length is not None and len(members) * extended < (len(members) - 1) * length:
                        break  # a member more would save less than the group saves without it
                    members.append(order[j])
                    length = extended
                    j += 1
                if length is not None and (len(members) - 1) * length >= minimum:
                    groups.append((every + length, members))
                else:
                    rest.extend(members)
                i = j
            if len(groups) == 1 and not rest:  # one group: the call's own common prefix
                return groups
        if rest:
            groups.append((every if every >= minimum else 0, rest))
        return groups

    def _prepare_prefix(self, tokens: list[int]) -> int:
        """A prefix stream holding ``tokens`` (possibly followed by more), decoding only what it lacks; its id.

        The stream holding the longest match is extended; with no match of ``share_prefix`` tokens, the least recently
        used stream is replaced.
        """
        import llama_cpp

        seq, keep = -1, 0
        for candidate, held in self._prefixes.items():
            n = _common_length([held, tokens], len(tokens))
            if n > keep:
                seq, keep = candidate, n
        if seq < 0 or keep < min(len(tokens), self.options.share_prefix):
            seq = min(self._prefix_streams, key=lambda s: self._prefix_used.get(s, -1))
            keep = _common_length([self._prefixes.get(seq, []), tokens], len(tokens))
        held = self._prefixes.get(seq, [])
        if keep < len(tokens):
            if keep < len(held):
                llama_cpp.llama_memory_seq_rm(self._memory, seq, keep, -1)
            pos = keep
            while pos < len(tokens):
                chunk = tokens[pos : pos + self.options.n_batch]
                self._fill([(seq, t, pos + k, False) for k, t in enumerate(chunk)])
                self._decode()
                pos += len(chunk)
            self.prompt_tokens += len(tokens) - keep
            held = list(tokens)
        self.shared_prefix_tokens += keep  # reused from an earlier call
        self._prefixes[seq] = held
        self._tick += 1
        self._prefix_used[seq] = self._tick
        return seq

    def _fill(self, entries: list[tuple[int, int, int, bool]]) -> None:
        batch = self._batch
        for k, (seq, token, pos, logits) in enumerate(entries):
            batch.token[k] = token
            batch.pos[k] = pos
            batch.n_seq_id[k] = 1
            batch.seq_id[k][0] = seq
            batch.logits[k] = logits
        batch.n_tokens = len(entries)

    def _decode(self) -> None:
        import llama_cpp

        began = time.perf_counter()
        status = llama_cpp.llama_decode(self._c, self._batch)
        self.seconds += time.perf_counter() - began
        if status != 0:
            raise ModelError(f"llama.cpp could not decode a batch (status {status}); lower `parallel` or raise `n_ctx`")

    def _logits(self, index: int):
        import llama_cpp
        import numpy as np

        pointer = llama_cpp.llama_get_logits_ith(self._c, index)
        return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))

    def _run(self, jobs: list[Job], settings: GenerationSettings) -> None:
        """Run every job to completion with at most ``parallel`` in flight; refill slots as jobs finish."""
        for prefix_len, group in self._plan(jobs):
            self._run_group(group, settings, prefix_len)

    def _run_group(self, jobs: list[Job], settings: GenerationSettings, prefix_len: int) -> None:
        import llama_cpp
        import numpy as np

        source, trim = -1, False
        if prefix_len:
            source = self._prepare_prefix(jobs[0].tokens[:prefix_len])
            self.shared_prefix_tokens += prefix_len * (len(jobs) - 1)
            trim = len(self._prefixes[source]) > prefix_len  # the stream holds a longer prefix than this group's
        pending = deque(sorted(jobs, key=lambda j: -len(j.tokens)))  # long prompts first: fewer idle slots at the end
        free = list(range(self.options.parallel))
        running: dict[int, Job] = {}
        rngs: dict[int, Any] = {}
        stop_ids = self._end_of_generation()
        while pending or running:
            # admit new jobs while a slot is free (each slot has its own KV stream of n_ctx cells)
            while pending and free:
                job = pending.popleft()
                slot = free.pop(0)
                llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
                if prefix_len:  # a cross-stream copy is a whole-buffer copy; the prefix stream holds the prefix
                    llama_cpp.llama_memory_seq_cp(self._memory, source, slot, -1, -1)
                    if trim:
                        llama_cpp.llama_memory_seq_rm(self._memory, slot, prefix_len, -1)
                job.fed = prefix_len
                running[slot] = job
                if job.max_new and settings.temperature > 0:
                    rngs[slot] = np.random.default_rng(job.seed)
            # one decode call: each generating sequence's next token first, then prompt chunks
            entries: list[tuple[int, int, int, bool]] = []
            owners: list[tuple[int, int]] = []  # (slot, position) for every entry that outputs logits
            for slot, job in running.items():
                if job.fed == len(job.tokens) and job.generated:
                    pos = len(job.tokens) + len(job.generated) - 1
                    entries.append((slot, job.generated[-1], pos, True))
                    owners.append((slot, pos))
            for slot, job in running.items():
                room = self.options.n_batch - len(entries)
                if room <= 0:
                    break
                if job.fed < len(job.tokens):
                    take = job.tokens[job.fed : job.fed + room]
                    for k, token in enumerate(take):
                        pos = job.fed + k
                        wants = pos in job.want or (job.max_new > 0 and pos == len(job.tokens) - 1)
                        entries.append((slot, token, pos, wants))
                        if wants:
                            owners.append((slot, pos))
                    job.fed += len(take)
                    self.prompt_tokens += len(take)
            self._fill(entries)
            self._decode()
            outputs = [k for k, e in enumerate(entries) if e[3]]
            finished = []
            for k, (slot, pos) in zip(outputs, owners):
                job = running[slot]
                logits = self._logits(k)
                if job.want:
                    if pos in job.want:
                        job.logprobs[pos] = log_softmax(logits)
                    if job.fed == len(job.tokens) and len(job.logprobs) == len(job.want):
                        finished.append(slot)
                    continue
                token = self._sample(logits, job, settings, rngs.get(slot))
                job.generated.append(token)
                text_done = settings.stop and self._hit_stop(job, settings.stop)
                if token in stop_ids or len(job.generated) >= job.max_new or text_done:
                    if token in stop_ids:
                        job.generated.pop()
                    finished.append(slot)
            for slot in finished:
                running.pop(slot).done = True
                rngs.pop(slot, None)
                llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
                free.append(slot)
            free.sort()

    def _end_of_generation(self) -> frozenset[int]:
        import llama_cpp

        if self._eog is None:
            self._eog = frozenset(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t))
        return self._eog

    def _hit_stop(self, job: Job, stops: Sequence[str]) -> bool:
        tail = self._detokenize(job.generated[-24:])
        return any(s and s in tail for s in stops)

    def _sample(self, logits, job: Job, settings: GenerationSettings, rng) -> int:
        import numpy as np

        if settings.repetition_penalty != 1.0:
            logits = logits.copy()
            if job.seen is None:
                job.seen = set(job.tokens)
            job.seen.update(job.generated[-1:])
            seen = np.fromiter(job.seen, dtype=np.int64)
            values = logits[seen]
            logits[seen] = np.where(
                values > 0, values / settings.repetition_penalty, values * settings.repetition_penalty
            )
        if settings.temperature <= 0 or rng is None:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / settings.temperature
        scaled -= scaled.max()
        probs = np.exp(scaled)
        probs /= probs.sum()
        if settings.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, settings.top_p)) + 1]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(rng.choice(len(probs), p=probs))


def _own(job: Job) -> int:
    """How many leading tokens of ``job`` may come from a shared prefix."""
    return min(job.want) if job.want else len(job.tokens) - 1


def _common_length(sequences: Sequence[Sequence[int]], limit: int) -> int:
    """The length of the prefix all ``sequences`` share, at most ``limit``."""
    first = sequences[0]
    n = min([limit, *(len(s) for s in sequences)])
    for other in sequences[1:]:
        k = 0
        while k < n and other[k] == first[k]:
            k += 1
        n = k
    return n


def log_softmax(logits):
    import numpy as np

    values = logits.astype(np.float64)
    top = values.max()
    return values - top - np.log(np.exp(values - top).sum())
