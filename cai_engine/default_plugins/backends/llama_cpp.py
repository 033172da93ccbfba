"""The in-process llama.cpp backend: GGUF files run quantised, many sequences per decode step.

``llama-cpp-python`` (the ``llamacpp`` extra) loads the model; this module drives llama.cpp's batch API itself:

- **Continuous batching.** Up to ``parallel`` sequences decode together, one sequence id each. A sequence that
  finishes frees its slot and the next prompt starts in it at once; prompt tokens of newly admitted sequences ride
  in the same decode calls as the running sequences' next tokens (chunked prefill, ``n_batch`` tokens a call).
- **Shared prefixes.** When the prompts of a call start with the same tokens (instructions, few-shot shots), those
  tokens are decoded once into a reserved sequence and copied into each slot's KV cache instead of recomputed. The
  last ``prefix_cache`` prefixes are kept between calls (least recently used replaced first; a call of one prompt
  keeps that prompt), so a judge or critic that repeats its instructions pays for them once. Scoring calls are split
  into groups sharing a longer prefix (the questions asked about one reply).
- **Weights and kernels.** A Q4_1/Q5_1 file is decoded from a one-time F16 copy (llama.cpp's batch kernels tile F16,
  not those types), with flash attention on (``weights``, ``flash_attention``).
- **Scoring.** ``continuation_logprobs`` reads log-softmax values at exactly the positions it needs; options that
  are one token each cost one pass over the prompt.
- **Chat templates** come from the GGUF file (rendered with llama-cpp-python's sandboxed Jinja formatter).

Sampling (greedy, temperature/top-p, repetition penalty) runs in numpy on the logits of each sequence, with a
generator seeded per prompt, so a prompt's output does not depend on what else shares its batch.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import Field

from cai_engine import (
    DEFAULT_MODEL,
    Backend,
    BackendUnavailableError,
    ChatPrompt,
    GenerationSettings,
    ModelError,
    Prompt,
    PromptTooLongError,
    cut_at_stop,
    local_model_problem,
)
from cai_engine.default_plugins.backends.llama_decode import BatchedDecoding, Job

log = logging.getLogger(__name__)


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def cpu_has_amx(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has Intel AMX (the ``amx_int8`` flag in ``/proc/cpuinfo``; False where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    return "amx_int8" in flags.partition(":")[2].split()


def repack_enabled(repack: str, cpuinfo: str | None = None) -> bool:
    """Whether llama.cpp may repack weights into its extra buffer types: ``on``, ``off``, or ``auto`` (off on CPUs with
    AMX, where llama.cpp's AMX matrix product crashes the process on some machines: ggml-org/llama.cpp#20824)."""
    if repack not in ("auto", "on", "off"):
        raise ValueError(f"repack must be auto, on or off, not {repack!r}")
    return repack == "on" or (repack == "auto" and not cpu_has_amx(cpuinfo))


_OPEN_LOCK = threading.RLock()


@contextmanager
def model_params(*, repack: bool):
    """Open llama-cpp-python models inside this block with llama.cpp's extra buffer types on or off.

    ``llama_cpp.Llama`` has no option for ``use_extra_bufts``: while the block runs, the default model parameters it
    starts from (``llama_cpp.llama_cpp.llama_model_default_params``, read by ``Llama.__init__`` at call time) are
    swapped for ones with the field set. Every opening through this block holds one lock, so an opening with
    repacking on never sees another thread's swap."""
    import llama_cpp.llama_cpp as low

    with _OPEN_LOCK:
        if repack:
            yield
            return
        original = low.llama_model_default_params

        def without_extra_buffers():
            params = original()
            params.use_extra_bufts = False
            return params

        low.llama_model_default_params = without_extra_buffers
        try:
            yield
        finally:
            low.llama_model_default_params = original


def resolve_gguf(ref: str) -> tuple[Path, str]:
    """A GGUF model reference (a catalogue name or a path) as (file, model id for records)."""
    from cai_engine import registered_catalog

    catalog = registered_catalog()
    if ref in catalog:
        if ref == DEFAULT_MODEL:
            from cai_engine import default_model_file

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


class LlamaCppBackend(BatchedDecoding, Backend):
    """GGUF models through llama.cpp in-process: batched decoding, shared-prefix KV reuse, log-prob scoring."""

    name = "llamacpp"

    class Options(Backend.Options):
        model: str = Field(description=f"A .gguf file, or a catalogue name ('qwen2.5-coder-1.5b', {DEFAULT_MODEL!r}).")
        parallel: int = Field(16, ge=1, le=240, description="Sequences decoded together (one KV sequence each).")
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
        prefix_cache: int = Field(
            4,
            ge=1,
            le=16,
            description="Prompt prefixes kept between calls, least recently used replaced first (each holds a KV "
            "stream of n_ctx cells).",
        )
        flash_attention: bool = Field(
            True,
            description="llama.cpp's flash attention kernel. On: every query row takes the same path whatever shares "
            "its batch, so batched and prefix-shared results equal a prompt run alone, and many sequences decode "
            "faster. Off: the unfused kernels, whose batched results drift from single ones by rounding.",
        )
        kv_cache: Literal["per_sequence", "unified"] = Field(
            "per_sequence",
            description="'per_sequence': one KV stream per sequence; a sequence's results do not depend on what shares "
            "its batch beyond rounding, but llama.cpp splits each decode call into pieces in which every sequence "
            "has the same number of tokens, so many short prompts of unequal length (the guard's per-principle "
            "questions) run as many small passes. 'unified': one cache for all sequences and no such split, which "
            "speeds up many short prompts and slows long prompts and generation a little; on quantised weights "
            "results move more with the batch (greedy output can change).",
        )
        weights: Literal["auto", "original", "f16", "q8_0"] = Field(
            "auto",
            description="How the weights are stored for decoding. 'auto': a Q4_1/Q5_1 file decoded with parallel > 1 "
            "is copied once to F16 (llama.cpp has tiled batch kernels for F16, not for those types; the copy is "
            "exact up to f16 rounding); 'original': the file as it is; 'f16'/'q8_0': always that copy.",
        )
        repack: Literal["auto", "on", "off"] = Field(
            "auto",
            description="llama.cpp's extra buffer types, into which it repacks weights for faster kernels. 'auto': off "
            "on CPUs with Intel AMX, where llama.cpp's AMX matrix product crashes the process on some machines "
            "(ggml-org/llama.cpp#20824), on elsewhere; 'on' or 'off' to choose.",
        )

    @classmethod
    def claims(cls, ref, registry):
        """GGUF files and catalogue models, when llama-cpp-python is installed. The embedded default stays on
        transformers, which the trainers use too, so base and fine-tuned models are compared on one runtime."""
        gguf = ref.lower().endswith(".gguf") or (ref != DEFAULT_MODEL and ref in registry.catalog)
        return gguf and llama_cpp_available()

    @classmethod
    def model_problem(cls, options, registry):
        return local_model_problem(str(options.get("model", "")), registry.catalog)

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
        self._prefixes: dict[int, list[int]] = {}
        self._prefix_used: dict[int, int] = {}
        self._tick = 0
        self._load()
        import atexit

        atexit.register(self.close)  # free the context before the interpreter tears llama_cpp's module down

    # -- loading ---------------------------------------------------------------------------------------------

    def _load(self) -> None:
        import llama_cpp
        from llama_cpp import _internals

        path, self._model_id = resolve_gguf(self.options.model)
        threads = self.options.threads or os.cpu_count() or 1
        repack = self.repack = repack_enabled(self.options.repack)
        self._llm = self._open(path, threads, repack)
        layout = self._layout()
        if layout is not None:
            from cai_engine import relayout_gguf

            self._llm.close()
            self._llm = self._open(relayout_gguf(path, layout), threads, repack)
            self._model_id += f", run as {layout}"
        self.layout = layout or "original"
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
        if self.options.flash_attention:
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        streams = self.options.parallel + self.options.prefix_cache
        params.n_ctx = self.options.n_ctx * streams
        params.n_batch = self.options.n_batch
        params.n_ubatch = self.options.n_batch
        params.n_seq_max = streams  # the last `prefix_cache` sequence ids hold shared prefixes
        params.n_threads = threads
        params.n_threads_batch = threads
        # One KV stream per sequence by default: on quantised weights a unified cache gives batched log-probs further
        # from the same prompt run alone; separate streams match up to rounding. Shared prefixes are then copied
        # across streams as whole buffers (the prefix sequence's stream holds only the prefix); in a unified cache
        # a copy only tags the prefix's cells with one more sequence.
        params.kv_unified = self.options.kv_cache == "unified"
        params.no_perf = True
        self._ctx = _internals.LlamaContext(model=self._llm._model, params=params, verbose=False)
        self._c = self._ctx.ctx
        self._memory = llama_cpp.llama_get_memory(self._c)
        self._batch = llama_cpp.llama_batch_init(self.options.n_batch, 0, 1)
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm._model.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._train_ctx = llama_cpp.llama_model_n_ctx_train(self._llm._model.model)
        self._prefix_streams = range(self.options.parallel, streams)
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

    @staticmethod
    def _open(path: Path, threads: int, repack: bool = True):
        import llama_cpp

        try:
            # The Llama object gives us the model, the tokenizer and the metadata; its own context stays tiny.
            with model_params(repack=repack):
                return llama_cpp.Llama(
                    model_path=str(path),
                    n_ctx=64,
                    n_batch=64,
                    n_threads=threads,
                    n_threads_batch=threads,
                    verbose=False,
                )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelError(
                f"{path}: cannot read this GGUF file (llama.cpp: {exc}); check that it is a complete GGUF model file"
            ) from None

    def _layout(self) -> str | None:
        """The weight layout to convert to, or None to run the file as it is."""
        if self.options.weights in ("f16", "q8_0"):
            return self.options.weights
        if self.options.weights == "original" or self.options.parallel == 1:
            return None
        # general.file_type 3 is MOSTLY_Q4_1, 9 is MOSTLY_Q5_1: no tiled batch kernel for either on x86
        return "f16" if self._llm.metadata.get("general.file_type") in ("3", "9") else None

    # -- properties ------------------------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    @property
    def path_summary(self) -> str:
        weights = "the file's own weights" if self.layout == "original" else f"an {self.layout.upper()} copy"
        attention = "flash attention" if self.options.flash_attention else "unfused attention"
        cache = "one KV stream per sequence" if self.options.kv_cache == "per_sequence" else "a unified KV cache"
        repacked = "" if self.repack else ", no weight repacking"
        return (
            f"llama.cpp in-process, {self.options.parallel} sequences per decode, {weights}{repacked}, {attention}, "
            f"{cache}"
        )

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
            Job(
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
        jobs: list[Job] = []
        plan: list[list[tuple[int, list[int], int]]] = []  # per prompt: (job, continuation ids, first position)
        for _i, (ids, conts) in enumerate(zip(encoded, cont_ids)):
            if all(len(c) == 1 for c in conts):  # one pass over the prompt reads every option
                jobs.append(Job(index=len(jobs), tokens=ids, want=(len(ids) - 1,)))
                plan.append([(len(jobs) - 1, c, len(ids) - 1) for c in conts])
                continue
            rows = []
            for c in conts:
                full = ids + c
                jobs.append(Job(index=len(jobs), tokens=full, want=tuple(range(len(ids) - 1, len(full) - 1))))
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
