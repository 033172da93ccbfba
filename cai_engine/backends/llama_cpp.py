"""The in-process llama.cpp backend: GGUF files run quantised, many sequences per decode step.

``llama-cpp-python`` (the ``llamacpp`` extra) loads the model; this module drives llama.cpp's batch API itself:

- **Continuous batching.** Up to ``parallel`` sequences decode together, one sequence id each. A sequence that
  finishes frees its slot and the next prompt starts in it at once; prompt tokens of newly admitted sequences ride
  in the same decode calls as the running sequences' next tokens (chunked prefill, ``n_batch`` tokens a call).
- **Shared prefixes.** When the prompts of a call start with the same tokens (instructions, few-shot shots), those
  tokens are decoded once into a reserved sequence and copied into each slot's KV cache instead of recomputed. The
  last prefix is kept between calls, so a judge or critic that repeats its instructions pays for them once.
- **Scoring.** ``continuation_logprobs`` reads log-softmax values at exactly the positions it needs; options that
  are one token each cost one pass over the prompt.
- **Chat templates** come from the GGUF file (rendered with llama-cpp-python's sandboxed Jinja formatter).

Sampling (greedy, temperature/top-p, repetition penalty) runs in numpy on the logits of each sequence, with a
generator seeded per prompt, so a prompt's output does not depend on what else shares its batch.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from ..components import Backend, ChatPrompt, GenerationSettings, Prompt, cut_at_stop
from ..errors import BackendUnavailableError, ModelError, PromptTooLongError

log = logging.getLogger(__name__)


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def resolve_gguf(ref: str) -> tuple[Path, str]:
    """A GGUF model reference (a catalogue name or a path) as (file, model id for records)."""
    from ..catalog import registered_catalog

    catalog = registered_catalog()
    if ref in catalog:
        if ref == "smollm2":
            from .hf_local import default_model_file

            installed = catalog.installed_path(ref)
            path = installed or default_model_file()
        else:
            path = catalog.path(ref)
        return path, f"{ref} ({path.name})"
    path = Path(ref).expanduser()
    if not path.is_file():
        raise ModelError(f"model {ref!r}: no such GGUF file; give a .gguf path or a catalogue name (`cai models list`)")
    if path.suffix.lower() != ".gguf":
        raise ModelError(f"{ref}: the llamacpp backend loads .gguf files")
    return path, str(path)


@dataclass
class _Job:
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


class LlamaCppBackend(Backend):
    """GGUF models through llama.cpp in-process: batched decoding, shared-prefix KV reuse, log-prob scoring."""

    name = "llamacpp"

    class Options(Backend.Options):
        model: str = Field(description="A .gguf file, or a catalogue name ('qwen2.5-coder-1.5b', 'smollm2').")
        parallel: int = Field(16, ge=1, le=256, description="Sequences decoded together (one KV sequence each).")
        n_ctx: int = Field(
            2048,
            ge=256,
            description="Context of each sequence (prompt plus generated tokens); the "
            "KV cache holds this many cells per parallel sequence.",
        )
        n_batch: int = Field(512, ge=32, description="Tokens per decode call (prompt chunks plus next tokens).")
        threads: int | None = Field(None, ge=1, description="CPU threads (None: every core).")
        chat_template: str = Field(
            "auto",
            description="'auto' uses the template stored in the GGUF file; 'none' uses a Human:/Assistant: transcript.",
        )
        system_prompt: str | None = Field(
            None, description="A system turn added to conversations that have none (None: the template's default)."
        )
        share_prefix: int = Field(32, ge=0, description="Reuse a common prefix of at least this many tokens; 0: off.")

    def __init__(self, options) -> None:
        super().__init__(options)
        if not llama_cpp_available():
            raise BackendUnavailableError(
                "the llamacpp backend needs llama-cpp-python; install it with pip install 'cai-engine[llamacpp]'"
            )
        self._lock = threading.Lock()
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.shared_prefix_tokens = 0
        self.seconds = 0.0
        self._prefix: list[int] = []  # tokens held in the reserved prefix sequence
        self._load()
        import atexit

        atexit.register(self.close)  # free the context before the interpreter tears llama_cpp's module down

    # -- loading ---------------------------------------------------------------------------------------------

    def _load(self) -> None:
        import llama_cpp
        from llama_cpp import _internals

        path, self._model_id = resolve_gguf(self.options.model)
        threads = self.options.threads or os.cpu_count() or 1
        try:
            # The Llama object gives us the model, the tokenizer and the metadata; its own context stays tiny.
            self._llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=64, n_batch=64, n_threads=threads, n_threads_batch=threads, verbose=False
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelError(
                f"{path}: cannot read this GGUF file (llama.cpp: {exc}); check that it is a complete GGUF model file"
            ) from None
        params = llama_cpp.llama_context_default_params()
        for name in (
            "flash_attn_type",
            "yarn_attn_factor",
            "yarn_beta_fast",
            "yarn_beta_slow",
            "yarn_ext_factor",
            "rope_freq_base",
            "rope_freq_scale",
            "type_k",
            "type_v",
        ):  # as llama-cpp-python sets them
            setattr(params, name, getattr(self._llm.context_params, name))
        params.n_ctx = self.options.n_ctx * (self.options.parallel + 1)
        params.n_batch = self.options.n_batch
        params.n_ubatch = self.options.n_batch
        params.n_seq_max = self.options.parallel + 1  # the last sequence id holds the shared prefix
        params.n_threads = threads
        params.n_threads_batch = threads
        # One KV stream per sequence: measured here, a unified cache gave batched log-probs that differed from the
        # same prompt run alone (by up to 0.8 nats); separate streams match exactly. Shared prefixes are copied
        # across streams as whole buffers (the prefix sequence's stream holds only the prefix).
        params.kv_unified = False
        params.no_perf = True
        self._ctx = _internals.LlamaContext(model=self._llm._model, params=params, verbose=False)
        self._c = self._ctx.ctx
        self._memory = llama_cpp.llama_get_memory(self._c)
        self._batch = llama_cpp.llama_batch_init(self.options.n_batch, 0, 1)
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm._model.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._train_ctx = llama_cpp.llama_model_n_ctx_train(self._llm._model.model)
        self._prefix_seq = self.options.parallel
        self._eog: frozenset[int] | None = None
        self._template = None
        template = self._llm.metadata.get("tokenizer.chat_template")
        if template and self.options.chat_template == "auto":
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            model = self._llm._model
            eos, bos = self._llm.token_eos(), self._llm.token_bos()
            self._template = Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_get_text(eos) if eos != -1 else "",
                bos_token=model.token_get_text(bos) if bos != -1 else "",
            )
        self.path = path

    # -- properties ------------------------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    @property
    def context_length(self) -> int | None:
        return min(self._train_ctx or self.options.n_ctx, self.options.n_ctx)

    def count_tokens(self, text: str) -> int:
        return len(self._tokenize(text, special=False))

    # -- prompts ---------------------------------------------------------------------------------------------

    def format_chat(self, conversation, *, add_generation_prompt: bool = True) -> str:
        if self._template is None:
            return super().format_chat(conversation, add_generation_prompt=add_generation_prompt)
        self._template.add_generation_prompt = add_generation_prompt
        return self._template(messages=self.chat_messages(conversation)).prompt  # type: ignore[arg-type]

    def _tokenize(self, text: str, *, special: bool = True, add_bos: bool = False) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, ChatPrompt):
            return self._tokenize(
                self.format_chat(prompt.messages) + prompt.assistant_prefix, add_bos=not self.has_chat_template
            )
        if isinstance(prompt, str):
            return self._tokenize(prompt, add_bos=True)
        return self._tokenize(self.format_chat(prompt), add_bos=not self.has_chat_template)

    def _check_length(self, ids: list[list[int]], reserve: int) -> None:
        limit = self.context_length
        assert limit is not None  # a loaded llama.cpp context always knows its size
        for index, seq in enumerate(ids):
            if len(seq) + reserve > limit:
                raise PromptTooLongError(
                    f"prompt {index} is {len(seq)} tokens; with {reserve} tokens to add it "
                    f"exceeds the context of {limit} tokens; shorten it or raise n_ctx"
                )

    def _detokenize(self, tokens: list[int]) -> str:
        return self._llm.detokenize(tokens).decode("utf-8", errors="ignore")

    # -- the public API --------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], settings: GenerationSettings) -> list[str]:
        if not prompts:
            return []
        encoded = [self._encode(p) for p in prompts]
        self._check_length(encoded, 1)
        room = self.context_length
        assert room is not None
        jobs = [
            _Job(
                index=i,
                tokens=ids,
                max_new=max(1, min(settings.max_new_tokens, room - len(ids))),
                seed=None if settings.seed is None else settings.seed + i,
            )
            for i, ids in enumerate(encoded)
        ]
        with self._lock:
            self._run(jobs, settings)
        out = []
        for job in jobs:
            self.generated_tokens += len(job.generated)
            out.append(cut_at_stop(self._detokenize(job.generated), settings.stop).rstrip("\ufffd"))
        return out

    def continuation_logprobs(
        self, prompts: Sequence[Prompt], continuations: Sequence[Sequence[str]]
    ) -> list[list[float | None]]:
        if len(prompts) != len(continuations):
            raise ValueError("one list of continuations per prompt")
        if not prompts:
            return []
        encoded = [self._encode(p) for p in prompts]
        cont_ids = [[self._tokenize(c, special=False) for c in conts] for conts in continuations]
        if any(not ids for conts in cont_ids for ids in conts):
            raise ValueError("continuations must not be empty")
        longest = max(len(ids) for conts in cont_ids for ids in conts)
        self._check_length(encoded, longest)
        jobs: list[_Job] = []
        plan: list[list[tuple[int, list[int], int]]] = []  # per prompt: (job, continuation ids, first position)
        for _i, (ids, conts) in enumerate(zip(encoded, cont_ids)):
            if all(len(c) == 1 for c in conts):  # one pass over the prompt reads every option
                jobs.append(_Job(index=len(jobs), tokens=ids, want=(len(ids) - 1,)))
                plan.append([(len(jobs) - 1, c, len(ids) - 1) for c in conts])
                continue
            rows = []
            for c in conts:
                full = ids + c
                jobs.append(_Job(index=len(jobs), tokens=full, want=tuple(range(len(ids) - 1, len(full) - 1))))
                rows.append((len(jobs) - 1, c, len(ids) - 1))
            plan.append(rows)
        with self._lock:
            self._run(jobs, GenerationSettings(max_new_tokens=1))
        out: list[list[float | None]] = []
        for rows in plan:
            values: list[float | None] = []
            for job_index, cont, first in rows:
                job = jobs[job_index]
                values.append(float(sum(job.logprobs[first + t][tok] for t, tok in enumerate(cont))))
            out.append(values)
        return out

    # -- the decode loop -------------------------------------------------------------------------------------

    def _common_prefix(self, jobs: list[_Job]) -> int:
        if len(jobs) < 2 and not self._prefix:
            return 0
        first = jobs[0].tokens
        # every job keeps at least one token of its own, and every position whose logits are read
        length = min((min(j.want) if j.want else len(j.tokens) - 1) for j in jobs)
        for job in jobs[1:]:
            n = 0
            limit = min(length, len(job.tokens))
            while n < limit and job.tokens[n] == first[n]:
                n += 1
            length = n
        if len(jobs) < 2:  # a single prompt: reuse the cached prefix only as far as it matches
            n = 0
            while n < min(length, len(self._prefix)) and first[n] == self._prefix[n]:
                n += 1
            length = n
        return length if length >= max(self.options.share_prefix, 1) and self.options.share_prefix else 0

    def _prepare_prefix(self, tokens: list[int]) -> None:
        """Hold ``tokens`` in the prefix sequence, decoding only what the cached prefix lacks."""
        import llama_cpp

        keep = 0
        while keep < min(len(tokens), len(self._prefix)) and tokens[keep] == self._prefix[keep]:
            keep += 1
        if keep < len(self._prefix):
            llama_cpp.llama_memory_seq_rm(self._memory, self._prefix_seq, keep, -1)
            self._prefix = self._prefix[:keep]
        pos = keep
        while pos < len(tokens):
            chunk = tokens[pos : pos + self.options.n_batch]
            self._fill([(self._prefix_seq, t, pos + k, False) for k, t in enumerate(chunk)])
            self._decode()
            pos += len(chunk)
        self.prompt_tokens += len(tokens) - keep
        self._prefix = list(tokens)

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

    def _run(self, jobs: list[_Job], settings: GenerationSettings) -> None:
        """Run every job to completion with at most ``parallel`` in flight; refill slots as jobs finish."""
        import llama_cpp
        import numpy as np

        prefix_len = self._common_prefix(jobs)
        if prefix_len:
            self._prepare_prefix(jobs[0].tokens[:prefix_len])
            self.shared_prefix_tokens += prefix_len * (len(jobs) - 1)
        pending = deque(sorted(jobs, key=lambda j: -len(j.tokens)))  # long prompts first: fewer idle slots at the end
        free = list(range(self.options.parallel))
        running: dict[int, _Job] = {}
        rngs: dict[int, Any] = {}
        stop_ids = self._end_of_generation()
        while pending or running:
            # admit new jobs while a slot is free (each slot has its own KV stream of n_ctx cells)
            while pending and free:
                job = pending.popleft()
                slot = free.pop(0)
                llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
                if prefix_len:  # a cross-stream copy is a whole-buffer copy; the prefix stream holds the prefix
                    llama_cpp.llama_memory_seq_cp(self._memory, self._prefix_seq, slot, -1, -1)
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
                        job.logprobs[pos] = _log_softmax(logits)
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

    def _hit_stop(self, job: _Job, stops: Sequence[str]) -> bool:
        tail = self._detokenize(job.generated[-24:])
        return any(s and s in tail for s in stops)

    def _sample(self, logits, job: _Job, settings: GenerationSettings, rng) -> int:
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

    def close(self) -> None:
        import llama_cpp

        if getattr(self, "_batch", None) is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None) is not None:
            self._ctx.close()
            self._ctx = None  # type: ignore[assignment]
        if getattr(self, "_llm", None) is not None:
            self._llm.close()
            self._llm = None  # type: ignore[assignment]


def _log_softmax(logits):
    import numpy as np

    values = logits.astype(np.float64)
    top = values.max()
    return values - top - np.log(np.exp(values - top).sum())
