"""A linear probe on a frozen small model's activations: the compiled classifier's runtime.

The text is read by the first ``layer`` transformer layers of the base model (the embedded default, SmolLM2-135M,
unless told otherwise); the hidden states are averaged over the tokens (an output probe built with ``pooling: reply``
averages over the reply's tokens only, the request still read as context) and a logistic-regression head turns them
into a probability. Only the head is trained, so training is seconds on a CPU, and only the first layers run, so
scoring is milliseconds. The base model is referenced (name and the SHA-256 of its weights file), not copied.

A classifier folder holds ``classifier.json`` (base model, layer, pooling, labels, thresholds, data and metrics),
``head.safetensors`` (the feature scaling and the head's weights) and ``README.md`` (the model card).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cai_engine.classifiers.templates import normalise
from cai_engine.errors import ModelError
from cai_engine.models.runtime import DEFAULT_MODEL

CONFIG = "classifier.json"
WEIGHTS = "head.safetensors"

#: How the base model's layers run when scoring: ``float32`` as trained; ``bfloat16`` about 1.7x faster where the CPU
#: has native bfloat16 (AVX512-BF16 or AMX), with pooled activations that agree to cosine 0.9999 with float32's;
#: ``auto`` takes bfloat16 where the CPU has it and float32 elsewhere. A probe trained on float32 activations runs in
#: either; a probe built with ``--int8`` (``base_weights: int8``) always runs its base layers in 8 bits (see
#: :class:`Encoder`; ``auto`` or ``int8`` load it, the others are refused).
Precision = Literal["auto", "float32", "bfloat16"]

#: How the base model's linear layers ran when a probe's head was fitted: ``float`` (then scoring runs float32 or
#: bfloat16, see :data:`Precision`) or ``int8`` (weights in 8 bits per output channel, activations quantised as each
#: text runs: PyTorch's dynamic quantisation; about twice as fast as float32 and 1.5x as fast as bfloat16 on one
#: request, slower than bfloat16 batched, measured on an AVX-512 CPU). 8-bit activations
#: drift from float32's (cosine 0.98 after 6 layers of SmolLM2-135M), so an int8 probe's head and threshold are
#: fitted on int8 activations and it always runs so.
BaseWeights = Literal["float", "int8"]

#: Which tokens' activations a probe averages: ``mean``, every token it reads; ``reply`` (output probes), the reply's
#: tokens only, the request still read as context through attention. Averaged over the whole exchange, a long
#: request's topic can outweigh what a short reply does with it. Measured (docs/results, classifiers): reply pooling
#: ranks the labelled guard cases better, but on the development set written to decide, built probes show no
#: meaningful difference (AUC 0.921 against 0.918), so ``mean`` stays the default. ``turn`` (input probes): the
#: request, then the answer's opening (``\nAssistant:``, tokenised apart), averaged over that opening alone, where a
#: chat model has read the request and is about to answer or decline; ``mean+turn``: both averages, side by side.
Pooling = Literal["mean", "reply", "turn", "mean+turn"]
#: The poolings that read the answer's opening after the request, tokenised apart from it (input probes only).
TURN_POOLINGS = ("turn", "mean+turn")


def resolve_precision(precision: str) -> str:
    """``auto`` as this CPU's choice; the others as given."""
    if precision not in ("auto", "float32", "bfloat16"):
        raise ModelError(f"precision {precision!r}: choose auto, float32 or bfloat16")
    if precision != "auto":
        return precision
    import torch

    native = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return "bfloat16" if native else "float32"


class ProbeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(description="'input' (a request) or 'output' (an exchange: request and reply).")
    method: Literal["probe", "finetuned"] = Field(
        "probe",
        description="'probe': a logistic head on the frozen base model's pooled activations (head.safetensors); "
        "'finetuned': the base model's first layers fine-tuned with a classification head (a transformers folder).",
    )
    base_model: str = Field(DEFAULT_MODEL, description="The model whose activations are read.")
    base_model_sha256: str | None = Field(
        None, description="SHA-256 of the base model's weights file, checked on load."
    )
    layer: int = Field(ge=1, description="How many transformer layers run; their output is pooled.")
    base_weights: BaseWeights = Field(
        "float",
        description="'float': the head was fitted on float32 activations (scoring runs float32 or bfloat16); 'int8': "
        "on those of the base layers with 8-bit weights, which it always runs (`cai classifiers build --int8`).",
    )
    pooling: Pooling = Field(
        "mean",
        description="'mean': activations averaged over every token read; 'reply' (output probes): over the reply's "
        "tokens only, the request read as context; 'turn' (input probes): over the tokens that close the request "
        "and open the answer ('\\nAssistant:'), the request read as context; 'mean+turn' (input probes): both "
        "averages from one pass, the request's tokens and the answer's opening, side by side (twice the features).",
    )
    system: str | None = Field(
        None,
        description="Input probes with turn pooling: each request is read inside the base model's chat template, after "
        "this system turn (the opening read is the template's end of the user turn and start of the assistant's; "
        "with mean+turn the first half averages the frame's tokens before the request with the request's); "
        "None: read as 'User: ...\\nAssistant:'.",
    )
    frame: list[str] | None = Field(
        None,
        description="With ``system``: the chat template's text before the request and after it, as training read them "
        "(scoring reads the same text, whatever the template renders later).",
    )
    ensemble: list[int] = Field(
        default_factory=list,
        description="Depths whose heads are averaged (the mean of their logits), the deepest being ``layer``; empty: "
        "one head, on ``layer``'s output. When set, the head's tensors carry one row per depth.",
    )
    max_tokens: int = Field(256, ge=8, description="Longer texts keep their first and last tokens.")
    labels: list[str] = Field(description="Label names; the first, 'violation', is the overall one.")
    thresholds: dict[str, float] = Field(default_factory=dict, description="Calibrated decision thresholds.")
    constitution: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _reply_pooling_needs_a_reply(self) -> ProbeConfig:
        if self.pooling == "reply" and self.kind != "output":
            raise ValueError("pooling 'reply' is for output classifiers (an input classifier reads no reply)")
        if self.pooling in TURN_POOLINGS and self.kind != "input":
            raise ValueError(
                f"pooling {self.pooling!r} is for input classifiers (an output classifier reads a reply there)"
            )
        if self.system is not None and (self.kind != "input" or self.pooling not in TURN_POOLINGS):
            raise ValueError(
                "a system turn frames a request before the answer opens: for input probes with turn pooling"
            )
        if self.system is not None and not self.system.strip():
            raise ValueError("system: an empty system turn; give its text, or none")
        if (self.system is None) != (self.frame is None) or (self.frame is not None and len(self.frame) != 2):
            raise ValueError("system and frame go together: the system turn, and the text before and after the request")
        if self.ensemble:
            problem = (
                "averages two or more depths"
                if len(self.ensemble) < 2
                else "depths must be ascending, without repeats"
                if sorted(set(self.ensemble)) != self.ensemble
                else "depths start at 1"
                if min(self.ensemble) < 1
                else f"its deepest must be layer ({self.layer})"
                if self.ensemble[-1] != self.layer
                else "is for a probe (method probe)"
                if self.method != "probe"
                else None
            )
            if problem:
                raise ValueError(f"ensemble {self.ensemble}: {problem}")
        return self

    def to_json(self) -> str:
        """``classifier.json``'s text. ``base_weights``, ``pooling`` and ``ensemble`` are written only when they differ
        from their defaults, so such a classifier's folder stays readable by releases before the fields (they forbid
        unknown keys)."""
        skip = {k for k, default in (("base_weights", "float"), ("pooling", "mean")) if getattr(self, k) == default}
        skip |= (set() if self.ensemble else {"ensemble"}) | (set() if self.system is not None else {"system", "frame"})
        return self.model_dump_json(indent=2, exclude=skip or None) + "\n"


def render(kind: str, prompt: str, reply: str | None = None) -> str:
    """The text a probe reads: the request alone, or the exchange."""
    if kind == "input" or reply is None:
        return f"User: {normalise(prompt)}"
    return f"{context(prompt)} {normalise(reply)}"


def context(prompt: str) -> str:
    """The start of an exchange's text (:func:`render`) up to its reply: what a reply-pooled probe reads without
    averaging."""
    return f"User: {normalise(prompt)}\nAssistant:"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_ENCODERS: dict[tuple[str, int, str, bool], Encoder] = {}
_ENCODERS_LOCK = threading.Lock()


def _encoder_precision(precision: str) -> str:
    """An encoder's precision: ``int8`` as given (only a probe built with ``--int8`` asks for it), the others as
    :func:`resolve_precision` says."""
    return precision if precision == "int8" else resolve_precision(precision)


def quantize_int8(model: Any) -> Any:
    """``model`` with every ``nn.Linear`` replaced by a dynamically quantised one (8-bit weights per output channel).
    PyTorch marks its quantised tensor types as deprecated in favour of torchao, whose CPU path is slower than float32
    without ``torch.compile`` (measured: 22 ms against 15 ms for 6 layers); the warning is silenced here only."""
    import torch

    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as exc:
        raise ModelError(
            f"this torch ({torch.__version__}) has no dynamic quantisation (torch.ao.quantization: {exc}); an int8 "
            "probe needs torch with it (2.13, the version `make setup` installs, has it) or a rebuild without --int8"
        ) from None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*quantiz.*deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*quantiz.*", category=DeprecationWarning)
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


_WARM_UP = "A short text to compile the layers with."


def _keep_ends(items: list[int], most: int) -> list[int]:
    """``items``, or where there are more than ``most``, their first ``most // 2`` and the rest from the end."""
    if len(items) <= most:
        return items
    half = most // 2
    return items[:half] + items[len(items) - (most - half) :]


class Encoder:
    """The first ``layers`` layers of a causal LM, returning mean-pooled hidden states after each of them.

    ``precision``: ``float32``, ``bfloat16``, or ``int8``: every linear layer's weights quantised to 8 bits per output
    channel and its input per call (dynamic quantisation). An int8 encoder runs one text a call, because the input's
    scale is taken over the whole batch: batched, a text's features would depend on its neighbours and on padding.

    ``compile``: run the layers through ``torch.compile`` (float32 and bfloat16 only), which fuses the small
    element-wise operations between the matrix products: 1-5 ms faster one text at a time at 8 layers (6-25%, measured
    on one CPU), after a warm-up of some seconds here (needs a C++ compiler; where compiling fails, a warning, and the
    layers run as they are)."""

    frame_once = True  # a system turn's frame read once and kept (:meth:`_prefix`); False reads it with each text

    def __init__(self, base_model: str, layers: int, precision: str = "float32", compile: bool = False) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cai_engine.models.files import resolve_model_folder

        folder, _ = resolve_model_folder(base_model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch.float32, local_files_only=True, use_safetensors=True
            )
        except Exception as exc:
            raise ModelError(f"{folder}: cannot load the probe's base model ({type(exc).__name__}: {exc})") from None
        inner = model.model
        if layers > len(inner.layers):
            raise ModelError(f"{base_model} has {len(inner.layers)} layers; the probe asks for {layers}")
        inner.layers = inner.layers[:layers]  # the rest never runs
        inner.config.num_hidden_layers = layers
        self.precision = _encoder_precision(precision)
        if self.precision == "bfloat16":
            inner = inner.to(torch.bfloat16)
        elif self.precision == "int8":
            inner = quantize_int8(inner)
        self.model = inner.eval()
        self._eager = self.model
        self.compiled = False
        norm = getattr(inner, "norm", None)
        if norm is None:
            raise ModelError(f"{base_model}: no final norm found (model.norm); the probe supports Llama-style models")
        self._norm = norm
        self.layers = layers
        self.folder = folder
        self._lock = threading.Lock()
        self._prefixes: dict[tuple[int, ...], tuple[list[tuple[Any, Any]], Any]] = {}
        # transformers 5 names the keys and values read before ``cache``; earlier releases ``past_key_values``
        forward = inspect.signature(inner.forward).parameters
        self._cache_argument = "cache" if "cache" in forward else "past_key_values"
        if compile:
            self._compile()

    def chat_frame(self, system: str) -> tuple[str, str]:
        """The base model's chat template around one user turn after ``system``, with the assistant's turn opened:
        the text before the request and the text after it (what a system-framed turn probe reads)."""
        marker = "\x00request\x00"
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": marker}],
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as exc:  # no template, or one that refuses a system turn
            raise ModelError(
                f"{self.folder}: cannot read a request after a system turn with this model's chat template "
                f"({type(exc).__name__}: {exc}); train without a system turn"
            ) from None
        if not isinstance(text, str) or text.count(marker) != 1 or system not in text.split(marker)[0]:
            raise ModelError(
                f"{self.folder}: its chat template changes the system turn or the request (trims, escapes or moves "
                "them), so the request cannot be framed after it as written; train without a system turn"
            )
        before, after = text.split(marker)
        return before, after

    def _compile(self) -> None:
        """Compile the layers and warm them up on one text and on two (a batch of one is compiled apart); on any
        failure, warn and keep the layers as they are."""
        import torch

        if self.precision == "int8":
            warnings.warn(
                "compile: an 8-bit probe's layers run as they are (compiling applies to float layers)", stacklevel=3
            )
            return
        self.model = torch.compile(self._eager, dynamic=True)
        self.compiled = True
        self.warm_up(last_only=True)

    def warm_up(self, last_only: bool, frame: tuple[str, str] | None = None) -> None:
        """Run the compiled layers on one text and on two (a batch of one is compiled apart), reading the last layer
        only or every layer, and with ``frame`` after a system turn's kept frame (another compiled graph), so that the
        first request pays no compiling; stops where compiling failed."""
        for batch in ([_WARM_UP], [_WARM_UP, _WARM_UP + " " + _WARM_UP]):
            if not self.compiled:
                return
            if frame is None:
                self.features(batch, last_only=last_only)
            else:
                texts, skip = probe_texts("input", "turn", batch, None, frame)
                self.features(texts, skip=skip, split=True, frame=frame, last_only=last_only)

    def _forward(self, **inputs: Any) -> Any:
        if self.compiled:
            try:
                return self.model(**inputs)
            except Exception as exc:  # no C++ compiler, an unsupported operation: the eager layers give the same
                warnings.warn(
                    f"compile: torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); the probe's layers run "
                    "uncompiled",
                    stacklevel=3,
                )
                self.model, self.compiled = self._eager, False
        return self.model(**inputs)

    def _prefix(self, ids: tuple[int, ...]) -> tuple[list[tuple[Any, Any]], Any]:
        """The keys and values of every layer for ``ids``, a text that starts every text of a call (a system turn's
        frame before the request), and the sum of every layer's normed outputs over its tokens: computed once, then
        every text is read after it. A causal model's tokens do not see what follows them, so reading the rest after
        these keys gives what reading the whole text gives, up to rounding (in int8 the frame's activations are
        quantised on their own, so the features differ from a whole text's a little; training and scoring both read
        this way), and the frame's layers run once, not for every request."""
        import torch

        if ids not in self._prefixes:
            tokens = torch.tensor([list(ids)])
            result = self._eager(
                input_ids=tokens, attention_mask=torch.ones_like(tokens), use_cache=True, output_hidden_states=True
            )
            hidden = [self._norm(h) for h in result.hidden_states[1:-1]] + [result.last_hidden_state]
            sums = torch.stack([h[0].float().sum(0) for h in hidden])  # [layers, hidden]
            kept = getattr(result, "cache", None) or result.past_key_values  # transformers 5, and earlier
            self._prefixes[ids] = ([(layer.keys, layer.values) for layer in kept.layers], sums)
        return self._prefixes[ids]

    @classmethod
    def shared(cls, base_model: str, layers: int, precision: str = "float32", compile: bool = False) -> Encoder:
        with _ENCODERS_LOCK:
            key = (
                base_model,
                layers,
                _encoder_precision(precision),
                compile and _encoder_precision(precision) != "int8",
            )
            if key not in _ENCODERS:
                _ENCODERS[key] = cls(base_model, layers, key[2], compile)  # int8 under either key: not compiled
            return _ENCODERS[key]

    def _ids(
        self,
        text: str,
        max_tokens: int,
        skip: str | None = None,
        split: bool = False,
        frame: tuple[str, str] | None = None,
    ) -> tuple[list[int], list[int]]:
        """The token ids read (a longer text keeps its first and last ``max_tokens // 2``) and, for each, 1 where it
        is averaged: every token, or those after ``skip``, a start of ``text`` read as context only (at least the last
        token is averaged; where ``skip``'s last token merges with the next, the merged token counts as averaged).
        ``split``: ``skip`` and the rest of ``text`` are tokenised apart, so no token straddles them (a tokenizer that
        merges "?" with a following newline would otherwise put the request's last character into the average)."""
        if frame is not None and skip and text.startswith(skip) and skip.startswith(frame[0]):
            # a system-framed request: the template's text before and after it whole, its own tokens read with any
            # special-token spelling split (a request cannot close its turn or open another), and cut if long
            before = self.tokenizer(frame[0], add_special_tokens=False)["input_ids"]
            after = self.tokenizer(text[len(skip) :], add_special_tokens=False)["input_ids"]
            request = self.tokenizer(skip[len(frame[0]) :], add_special_tokens=False, split_special_tokens=True)
            request = _keep_ends(request["input_ids"], max(1, max_tokens - len(before) - len(after)))
            return before + request + after, [0] * (len(before) + len(request)) + [1] * len(after)
        if split and skip and text.startswith(skip) and len(text) > len(skip):
            head = self.tokenizer(skip, add_special_tokens=False)["input_ids"]
            tail = self.tokenizer(text[len(skip) :], add_special_tokens=False)["input_ids"]
            head = _keep_ends(head, max(1, max_tokens - len(tail)))  # a long request is cut, never the opening
            return head + tail, [0] * len(head) + [1] * len(tail)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] or [self.tokenizer.eos_token_id or 0]
        start = 0
        if skip:
            head = self.tokenizer(skip, add_special_tokens=False)["input_ids"]
            while start < min(len(head), len(ids) - 1) and head[start] == ids[start]:
                start += 1
        kept = _keep_ends(list(range(len(ids))), max_tokens)
        return [ids[i] for i in kept], [int(i >= start) for i in kept]

    def features(
        self,
        texts: Sequence[str],
        *,
        max_tokens: int = 256,
        batch_size: int = 16,
        last_only: bool = False,
        skip: Sequence[str | None] | None = None,
        progress: str | None = None,
        both: bool = False,
        split: bool = False,
        frame: tuple[str, str] | None = None,
    ) -> Any:
        """A tensor ``[len(texts), layers, hidden]``: each layer's output after the model's final norm, averaged over
        the text's tokens (``skip``: per text, a start of it read as context and left out of the average, or None).
        ``last_only`` (scoring, where only the encoder's own depth is read): ``[len(texts), 1, hidden]``, without
        asking the model for the other layers. ``progress``: the label of a progress bar over the texts (training
        reads thousands; scoring one text at a time shows none). ``both`` (with ``skip``): ``[..., 2 * hidden]``, the
        average over the context's tokens beside the average over the rest, from the same pass (a causal model's
        context tokens do not see what follows them, so the first half is what the context alone gives). ``split``:
        each ``skip`` is tokenised apart from the rest of its text (:meth:`_ids`), as ``turn`` pooling reads.
        ``frame`` (texts framed by a system turn's chat template, :meth:`chat_frame`): the template's text before the
        request and the request are tokenised apart too, the request with special-token spellings split, and only
        the request is cut to ``max_tokens``."""
        import contextlib

        import torch

        if self.precision == "int8":
            batch_size = 1
        out: list[tuple[int, Any]] = []
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        encoded = {i: self._ids(texts[i], max_tokens, None if skip is None else skip[i], split, frame) for i in order}
        opening: tuple[int, ...] = ()
        if frame is not None and self.frame_once:  # every text opens with the frame: read it once, then the rest
            opening = tuple(self.tokenizer(frame[0], add_special_tokens=False)["input_ids"])
            if opening and all(
                tuple(ids[: len(opening)]) == opening and len(ids) > len(opening) for ids, _ in encoded.values()
            ):
                encoded = {i: (ids[len(opening) :], kept[len(opening) :]) for i, (ids, kept) in encoded.items()}
            else:
                opening = ()
        bar: Any = contextlib.nullcontext()
        if progress is not None:  # training; a guard scoring one text at a time makes no bar
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc=progress, unit="text")
        with self._lock, torch.inference_mode(), bar:
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                width = max(len(encoded[i][0]) for i in batch)
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                pool = torch.zeros((len(batch), width), dtype=torch.float32)
                for row, i in enumerate(batch):
                    tokens, averaged = encoded[i]
                    ids[row, : len(tokens)] = torch.tensor(tokens)
                    mask[row, : len(tokens)] = 1
                    pool[row, : len(tokens)] = torch.tensor(averaged, dtype=torch.float32)
                prefix_sums = None
                if opening:
                    from transformers import DynamicCache

                    cache, prefix_sums = self._prefix(opening)
                    prefix_sums = prefix_sums[-1:] if last_only else prefix_sums
                    rows = len(batch)
                    past = DynamicCache(
                        ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in cache]
                    )
                    result = self._forward(
                        input_ids=ids,
                        attention_mask=torch.cat(
                            [torch.ones((len(batch), len(opening)), dtype=torch.long), mask], dim=1
                        ),
                        **{self._cache_argument: past},
                        use_cache=True,
                        output_hidden_states=not last_only,
                    )
                else:
                    result = self._forward(input_ids=ids, attention_mask=mask, output_hidden_states=not last_only)
                # transformers hands back each layer's output before the model's final norm, and the last one after
                # it (last_hidden_state); a probe of depth k is served by a k-layer encoder, whose last output is
                # normed, so every layer is read normed here, as it will be served
                earlier = [] if last_only else [self._norm(h) for h in result.hidden_states[1:-1]]
                hidden = [*earlier, result.last_hidden_state]
                weights = pool.unsqueeze(-1)
                # the context's tokens (every real token not averaged; none where a text has no skip)
                context_weights = (mask.float() - pool).clamp(min=0).unsqueeze(-1)
                halves = []
                for depth, h in enumerate(hidden):
                    averaged = (h.float() * weights).sum(1) / weights.sum(1).clamp(min=1)
                    if both:
                        total, count = (h.float() * context_weights).sum(1), context_weights.sum(1)
                        if prefix_sums is not None:  # the frame's tokens, read once
                            total, count = total + prefix_sums[depth], count + len(opening)
                        averaged = torch.cat([total / count.clamp(min=1), averaged], dim=-1)
                    halves.append(averaged)
                pooled = torch.stack(halves, dim=1)  # [batch, layers, hidden] (or 2 * hidden with both)
                out.extend(zip(batch, pooled))
                if progress is not None:
                    bar.update(len(batch))
        out.sort(key=lambda pair: pair[0])
        return torch.stack([row for _, row in out])


def probe_texts(
    kind: str,
    pooling: str,
    prompts: Sequence[str],
    replies: Sequence[str | None] | None,
    frame: tuple[str, str] | None = None,
) -> tuple[list[str], list[str | None] | None]:
    """The texts a ``kind`` probe reads (:func:`render`), and what :meth:`Encoder.features` leaves out of the average
    for each: its request (``reply`` pooling of an output probe, ``turn`` pooling of an input probe, which reads the
    request followed by the opening of the answer, :func:`context`, and averages that opening alone), or nothing
    (None). ``frame`` (a turn-pooled input probe with a system turn, :meth:`Encoder.chat_frame`): the chat template's
    text before and after the request, in place of ``User: `` and ``\nAssistant:``. Training and scoring both read
    their texts through here."""
    if pooling in TURN_POOLINGS and kind == "input":
        if frame is not None:
            before, after = frame
            return [f"{before}{normalise(p)}{after}" for p in prompts], [f"{before}{normalise(p)}" for p in prompts]
        return [context(p) for p in prompts], [render(kind, p) for p in prompts]
    texts = [render(kind, p, None if replies is None else replies[i]) for i, p in enumerate(prompts)]
    if pooling != "reply" or kind != "output" or replies is None:
        return texts, None
    return texts, [context(p) if r is not None else None for p, r in zip(prompts, replies)]


def probe_precision(config: ProbeConfig, precision: str, folder: Path | None = None) -> str:
    """How a probe's base layers run: an int8 probe's always in int8 (asked for ``auto``); a float probe's as
    :func:`resolve_precision` says."""
    if config.base_weights != "int8":
        return resolve_precision(precision)
    if precision in ("auto", "int8"):
        return "int8"
    resolve_precision(precision)  # an unknown value gets the list of choices first
    raise ModelError(
        f"{folder or 'this classifier'}: its head was fitted on 8-bit activations (base_weights: int8), so it runs "
        f"in int8 only, not {precision}; load it with precision auto (the default)"
    )


class Probe:
    """A trained probe loaded from its folder; ``predict`` gives per-label probabilities."""

    def __init__(
        self,
        config: ProbeConfig,
        weights: dict[str, Any],
        folder: Path | None = None,
        precision: str = "auto",
        compile: bool = False,
    ) -> None:
        self.config = config
        self.precision = probe_precision(config, precision, folder)
        self.compile = compile
        self.mean, self.scale = weights["mean"], weights["scale"]
        self.weight, self.bias = weights["weight"], weights["bias"]
        self.folder = folder
        self._encoder: Encoder | None = None

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = Encoder.shared(self.config.base_model, self.config.layer, self.precision, self.compile)
            frame = (self.config.frame[0], self.config.frame[1]) if self.config.frame is not None else None
            if self.config.ensemble or frame is not None:  # compiled for one layer's output of whole texts
                self._encoder.warm_up(last_only=not self.config.ensemble, frame=frame)
        return self._encoder

    @classmethod
    def load(
        cls, folder: str | Path, *, check_base: bool = True, precision: str = "auto", compile: bool = False
    ) -> Probe:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
            raise ModelError(f"{folder}: not a classifier folder (needs {CONFIG} and {WEIGHTS})")
        try:
            config = ProbeConfig.model_validate_json((folder / CONFIG).read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ModelError(f"{folder / CONFIG}: invalid ({exc})") from None
        weights = load_file(str(folder / WEIGHTS))
        _check_head(folder, config, weights)
        probe = cls(config, weights, folder, precision, compile)
        depths = [int(k) for k in config.metrics.get("layer_auc", {})]
        if depths and config.layer < max(depths) and config.metrics.get("features") != "normed":
            warnings.warn(
                f"{folder}: this {config.layer}-layer probe was chosen among depths up to {max(depths)} before "
                "cai-engine read every depth as it is served (after the model's final norm), so it was fitted on "
                "other activations than it now reads; rebuild it (cai classifiers build or train)",
                stacklevel=2,
            )
        if config.pooling in TURN_POOLINGS and config.metrics.get("turn_tokens") != "split":
            raise ModelError(
                f"{folder}: this {config.pooling}-pooled probe was trained before cai-engine tokenised the answer's "
                "opening apart from the request, so it would now read other activations than it was fitted on; "
                "retrain it (cai classifiers train --kind input --pooling ...)"
            )
        if check_base and config.base_model_sha256:
            actual = base_model_sha256(config.base_model)
            if actual is not None and actual != config.base_model_sha256:
                raise ModelError(
                    f"{folder}: trained on {config.base_model} with weights sha256 {config.base_model_sha256[:12]}..., "
                    f"but the installed one is {actual[:12]}...; rebuild the classifier"
                )
        return probe

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": self.mean, "scale": self.scale, "weight": self.weight, "bias": self.bias}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS))
        (folder / CONFIG).write_text(self.config.to_json(), encoding="utf-8")

    def logits_from_features(self, features: Any) -> Any:
        """``features``: ``[n, hidden]`` pooled activations of the probe's layer, or for an ensemble ``[n, depths,
        hidden]``, those of each depth it averages (each depth's head scores its own, and the logits are averaged)."""
        import torch

        if self.config.ensemble:
            by_depth = torch.einsum("ndh,dlh->ndl", (features - self.mean) / self.scale, self.weight) + self.bias
            return by_depth.mean(1)
        return ((features - self.mean) / self.scale) @ self.weight.T + self.bias

    def predict(self, prompts: Sequence[str], replies: Sequence[str] | None = None) -> list[dict[str, float]]:
        """Per text, each label's probability."""
        import torch

        if not prompts:
            return []
        frame = (self.config.frame[0], self.config.frame[1]) if self.config.frame is not None else None  # as trained
        texts, skip = probe_texts(self.config.kind, self.config.pooling, prompts, replies, frame)
        # the shared encoder has exactly the probe's depth: its last layer is the one the head reads (an ensemble
        # reads the shallower depths it averages from the same pass)
        depths = self.config.ensemble
        features = self.encoder.features(
            texts,
            max_tokens=self.config.max_tokens,
            last_only=not depths,
            skip=skip,
            both=self.config.pooling == "mean+turn",
            split=self.config.pooling in TURN_POOLINGS,
            frame=frame,
        )
        features = features[:, [d - 1 for d in depths]] if depths else features[:, -1]
        if features.shape[-1] != self.mean.shape[-1]:
            raise ModelError(
                f"{self.folder or 'this classifier'}: its head reads {self.mean.shape[-1]} features, but "
                f"{self.config.base_model} gives {features.shape[-1]} with {self.config.pooling} pooling; it was "
                "trained on another base model or pooling: retrain it"
            )
        probs = torch.sigmoid(self.logits_from_features(features))
        return [{label: float(row[j]) for j, label in enumerate(self.config.labels)} for row in probs]

    def threshold(self, label: str = "violation") -> float:
        return self.config.thresholds.get(label, 0.5)


def _check_head(folder: Path, config: ProbeConfig, weights: dict[str, Any]) -> None:
    """A head whose tensors disagree with each other or with the config (a hand-edited or mixed-up folder) is refused
    on load, naming what is wrong, instead of failing inside a matrix product at the first request."""
    missing = [k for k in ("mean", "scale", "weight", "bias") if k not in weights]
    if missing:
        raise ModelError(f"{folder / WEIGHTS}: lacks {', '.join(missing)}; rebuild the classifier")
    shapes = {k: tuple(weights[k].shape) for k in ("mean", "scale", "weight", "bias")}
    stacked = 1 if config.ensemble else 0  # an ensemble's tensors carry one row per depth first
    wanted = {"mean": 1 + stacked, "scale": 1 + stacked, "weight": 2 + stacked, "bias": 1 + stacked}
    wrong = [f"{k} has {len(shapes[k])} dimensions, not {n}" for k, n in wanted.items() if len(shapes[k]) != n]
    if wrong:
        raise ModelError(f"{folder / WEIGHTS}: {'; '.join(wrong)}; rebuild the classifier")
    width = weights["mean"].shape[-1]
    problems = []
    if stacked and any(shape[0] != len(config.ensemble) for shape in shapes.values()):
        problems.append(
            f"an ensemble of {len(config.ensemble)} depths needs that many heads, but the tensors hold "
            f"{sorted({shape[0] for shape in shapes.values()})}"
        )
    if weights["scale"].shape[-1] != width or weights["weight"].shape[-1] != width:
        problems.append(
            f"mean, scale and weight are {width}, {weights['scale'].shape[-1]} and {weights['weight'].shape[-1]} wide"
        )
    if weights["weight"].shape[-2] != len(config.labels) or weights["bias"].shape[-1] != len(config.labels):
        problems.append(
            f"the head has {weights['weight'].shape[-2]} weight rows and {weights['bias'].shape[-1]} biases for "
            f"{len(config.labels)} labels"
        )
    if config.pooling == "mean+turn" and width % 2:
        problems.append(f"a mean+turn head reads two halves, but it is {width} wide")
    if problems:
        raise ModelError(f"{folder / WEIGHTS}: {'; '.join(problems)}; rebuild the classifier")


def base_model_sha256(base_model: str) -> str | None:
    """The SHA-256 of the base model's weights file, when it is a file this machine has (the default's GGUF, an
    installed catalogue model's GGUF, or a file given by path)."""
    from cai_engine.models.files import default_model_file

    if base_model == DEFAULT_MODEL:
        try:
            return file_sha256(default_model_file())
        except ModelError:
            return None
    from cai_engine.models.catalog import registered_catalog

    catalog = registered_catalog()
    if base_model in catalog:  # an installed catalogue model: its GGUF file
        try:
            return file_sha256(catalog.path(base_model))
        except (ModelError, OSError):
            return None
    path = Path(base_model)
    if path.is_file():
        return file_sha256(path)
    return None


def describe(folder: str | Path) -> dict[str, Any]:
    """A classifier folder's config as JSON data (for ``cai classifiers list``)."""
    data = json.loads((Path(folder) / CONFIG).read_text(encoding="utf-8"))
    keys = ("kind", "method", "base_model", "layer", "ensemble", "base_weights", "pooling", "system", "thresholds")
    probe = data.get("method", "probe") == "probe"
    defaults: dict[str, Any] = {
        "method": "probe",
        "base_weights": "float" if probe else None,
        "pooling": "mean" if probe else None,
        "ensemble": [] if probe else None,
    }
    return {"path": str(folder), **{k: data.get(k, defaults.get(k)) for k in keys}}
