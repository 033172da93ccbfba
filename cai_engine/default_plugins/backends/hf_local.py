"""The local transformers backend: model folders, GGUF files, and the embedded default model.

torch and transformers are imported when a model loads, never at import time, so ``cai --help`` stays fast.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from cai_engine import (
    DEFAULT_MODEL,
    Backend,
    ChatPrompt,
    GenerationSettings,
    ModelError,
    Prompt,
    PromptTooLongError,
    cut_at_stop,
    local_model_problem,
    resolve_model_folder,
)

log = logging.getLogger(__name__)


class TransformersBackend(Backend):
    """Runs a causal LM in-process with transformers: batched, left-padded generation and log-prob scoring."""

    name = "transformers"

    class Options(Backend.Options):
        model: str = Field(DEFAULT_MODEL, description=f"{DEFAULT_MODEL!r}, a model folder, or a .gguf file.")
        dtype: Literal["float32", "bfloat16", "float16"] = Field(
            "float32", description="float32 is fastest on CPUs without bf16 units."
        )
        device: str = Field("cpu", description="'cpu', 'cuda', 'cuda:1' or 'auto'.")
        batch_size: int = Field(16, ge=1, description="Sequences per forward pass (at most).")
        batch_tokens: int = Field(
            16384,
            ge=1,
            description="Padded tokens per forward pass (at most): items are "
            "sorted by length and a batch of long prompts holds fewer.",
        )
        chat_template: Literal["auto", "none"] = Field(
            "auto",
            description="'auto' uses the model's chat template when it has one; 'none' uses a "
            "Human:/Assistant: transcript.",
        )
        system_prompt: str | None = Field(
            None, description="A system turn added to conversations that have none (None: the template's default)."
        )
        threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default).")
        share_prefix: int = Field(
            32,
            ge=0,
            description="When every prompt of a batch starts with the same N or more tokens (few-shot "
            "examples, instructions), compute that prefix once and reuse it; 0 turns this off.",
        )
        packed_weights: bool = Field(
            True,
            description="On a CPU in float32, reorder each linear layer's weights once into oneDNN's blocked "
            "layout and multiply through oneDNN (faster batched decoding where MKL's path is slow; greedy outputs "
            "unchanged); costs a second copy of those weights in memory.",
        )

    @classmethod
    def claims(cls, ref, registry):
        return True  # every reference no other backend claimed: a folder, a .gguf file, a catalogue name, a Hub id

    @classmethod
    def model_problem(cls, options, registry):
        return local_model_problem(str(options.get("model", "")), registry.catalog)

    def __init__(self, options) -> None:
        super().__init__(options)
        self._lock = threading.Lock()
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.shared_prefix_tokens = 0  # prefill tokens saved by computing shared prefixes once
        self.seconds = 0.0
        self._load()

    # -- loading ---------------------------------------------------------------------------------------------

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        folder, self._model_id = resolve_model_folder(self.options.model)
        device = self.options.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=getattr(torch, self.options.dtype), local_files_only=True, use_safetensors=True
            )
        except Exception as exc:
            raise ModelError(f"{folder}: cannot load the model ({type(exc).__name__}: {exc})") from None
        self.model.to(device).eval()
        # the keys and values of a shared prefix go in as ``cache`` on transformers 5, ``past_key_values`` before
        self._cache_argument = (
            "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        )
        self.device = device
        self.packed_layers = self._pack_weights() if self.options.packed_weights else 0
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.folder = folder

    def _pack_weights(self) -> int:
        """Route every ``nn.Linear`` through oneDNN with its weight reordered once; returns how many layers.

        The stock fp32 path is MKL's sgemm, which can multiply the skinny products of batched decoding slowly (the
        numbers are in docs/measurements.md). The backend's model only ever runs inference, so the forward method of
        each layer is replaced on this instance; the original weights stay (tied embeddings read them).
        """
        import torch

        reorder = getattr(getattr(torch.ops, "mkldnn", None), "_reorder_linear_weight", None)
        if (
            self.device != "cpu"
            or self.options.dtype != "float32"
            or reorder is None
            or not torch.backends.mkldnn.is_available()
        ):
            return 0
        linear = torch.ops.mkldnn._linear_pointwise
        count = 0
        for module in self.model.modules():
            if type(module) is not torch.nn.Linear:
                continue
            packed = reorder(module.weight.detach(), self.options.batch_size)
            bias = None if module.bias is None else module.bias.detach()

            def forward(x, packed=packed, bias=bias, out=module.out_features):
                y = linear(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
                return y.reshape(*x.shape[:-1], out)

            module.forward = forward
            count += 1
        return count

    # -- properties ------------------------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def path_summary(self) -> str:
        packed = ", oneDNN-packed weights" if self.packed_layers else ""
        return (
            f"transformers, {self.options.dtype} on {self.device}{packed}, batches of up to "
            f"{self.options.batch_size} prompts / {self.options.batch_tokens} tokens"
        )

    @property
    def has_chat_template(self) -> bool:
        return self.options.chat_template == "auto" and bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- prompts ---------------------------------------------------------------------------------------------

    def format_chat(self, conversation, *, add_generation_prompt: bool = True) -> str:
        if not self.has_chat_template:
            return super().format_chat(conversation, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.apply_chat_template(  # type: ignore[return-value]  # a string: tokenize=False
            self.chat_messages(conversation), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, ChatPrompt):
            text = self.format_chat(prompt.messages) + prompt.assistant_prefix
            special = not self.has_chat_template
        elif isinstance(prompt, str):
            text, special = prompt, True
        else:
            text, special = self.format_chat(prompt), not self.has_chat_template
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _check_length(self, ids: list[list[int]], reserve: int) -> None:
        limit = self.context_length
        if limit is None:
            return
        for index, seq in enumerate(ids):
            if len(seq) + reserve > limit:
                raise PromptTooLongError(
                    f"prompt {index} is {len(seq)} tokens; with {reserve} tokens to add it exceeds "
                    f"the model's context of {limit} tokens; shorten it (fewer few-shot examples or "
                    "turns) or use a model with a longer context"
                )

    def _batch(self, seqs: list[list[int]]):
        import torch

        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.device)
        return input_ids, mask

    # -- generation ------------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], settings: GenerationSettings) -> list[str]:
        import torch

        if not prompts:
            return []
        encoded = [self._encode(p) for p in prompts]
        self._check_length(encoded, 1)
        results: list[str] = [""] * len(encoded)
        with self._lock, torch.inference_mode():
            for chunk in self._chunks([len(e) + settings.max_new_tokens for e in encoded]):
                start = chunk[0]
                seqs = [encoded[i] for i in chunk]
                prefix_len, cache = self._shared_prefix(seqs)
                input_ids, mask = self._batch([s[prefix_len:] for s in seqs])
                if cache is not None:  # [prefix | left-padded suffixes]; positions skip the padding via the mask
                    prefix = torch.tensor([seqs[0][:prefix_len]] * len(seqs), device=self.device)
                    input_ids = torch.cat([prefix, input_ids], dim=1)
                    mask = torch.cat([torch.ones_like(prefix), mask], dim=1)
                    kwargs_cache = {self._cache_argument: cache}
                else:
                    kwargs_cache = {}
                room = (self.context_length or 10**9) - input_ids.shape[1]
                kwargs: dict[str, Any] = {
                    "max_new_tokens": max(1, min(settings.max_new_tokens, room)),
                    "pad_token_id": self.tokenizer.pad_token_id,
                    "repetition_penalty": settings.repetition_penalty,
                    "do_sample": settings.temperature > 0,
                }
                if settings.temperature > 0:
                    kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
                    if settings.seed is not None:
                        torch.manual_seed(settings.seed + start)
                if settings.stop:
                    kwargs.update(stop_strings=list(settings.stop), tokenizer=self.tokenizer)
                began = time.perf_counter()
                output = self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs, **kwargs_cache)
                self.seconds += time.perf_counter() - began
                new = output[:, input_ids.shape[1] :]
                for row, index in enumerate(chunk):
                    tokens = [t for t in new[row].tolist() if t != self.tokenizer.pad_token_id]
                    self.generated_tokens += len(tokens)
                    self.prompt_tokens += len(encoded[index])
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    results[index] = cut_at_stop(str(text), settings.stop)
        return results

    # -- scoring ---------------------------------------------------------------------------------------------

    def continuation_logprobs(
        self, prompts: Sequence[Prompt], continuations: Sequence[Sequence[str]]
    ) -> list[list[float | None]]:
        import torch

        if len(prompts) != len(continuations):
            raise ValueError("one list of continuations per prompt")
        if not prompts:
            return []
        encoded = [self._encode(p) for p in prompts]
        cont_ids = [
            [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in conts] for conts in continuations
        ]
        if any(not ids for conts in cont_ids for ids in conts):
            raise ValueError("continuations must not be empty")
        longest = max(len(ids) for conts in cont_ids for ids in conts)
        self._check_length(encoded, longest)
        # filled by position: length-sorted chunks score the continuations out of order
        out: list[list[float | None]] = [[None] * len(conts) for conts in cont_ids]
        with self._lock, torch.inference_mode():
            if longest == 1:  # every option is one token: one forward pass over the prompt reads them all
                for rows in self._chunks([len(e) for e in encoded]):
                    last = self._forward([encoded[i] for i in rows], keep=1)[:, -1, :]
                    for r, i in enumerate(rows):
                        out[i] = [float(last[r, ids[0]]) for ids in cont_ids[i]]
                return out
            pairs = [(i, j) for i, conts in enumerate(cont_ids) for j in range(len(conts))]
            for rows in self._chunks([len(encoded[i]) + len(cont_ids[i][j]) for i, j in pairs]):
                chunk = [pairs[r] for r in rows]
                seqs = [encoded[i] + cont_ids[i][j] for i, j in chunk]
                k = max(len(cont_ids[i][j]) for i, j in chunk) + 1
                logp = self._forward(seqs, keep=k)
                for r, (i, j) in enumerate(chunk):
                    ids = cont_ids[i][j]
                    c = len(ids)
                    total = sum(float(logp[r, k - c + t - 1, tok]) for t, tok in enumerate(ids))
                    out[i][j] = total
        return out

    def _chunks(self, lengths: Sequence[int]):
        """Indices into ``lengths`` in batches of similar length: sorted (so little padding), at most ``batch_size``
        items and ``batch_tokens`` padded tokens each (one item always fits). Callers put results back by index."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        chunk: list[int] = []
        for index in order:
            widest = max([lengths[i] for i in chunk] + [lengths[index]])
            if chunk and (
                len(chunk) == self.options.batch_size or widest * (len(chunk) + 1) > self.options.batch_tokens
            ):
                yield chunk
                chunk = []
            chunk.append(index)
        if chunk:
            yield chunk

    def _shared_prefix(self, seqs: list[list[int]], keep: int = 1):
        """(length, KV cache expanded to the batch) of the tokens every sequence starts with, or (0, None).

        Few-shot prompts repeat hundreds of tokens per item; computing them once per batch instead of once per item
        is where batching wins on prefill (DESIGN: a 1,000-token prefix for 32 sequences is ~80 s otherwise).
        """
        import torch

        if len(seqs) < 2 or not self.options.share_prefix:
            return 0, None
        first = seqs[0]
        length = min(len(s) for s in seqs) - keep  # each sequence keeps the tokens whose logits are read
        for seq in seqs[1:]:
            n = 0
            while n < length and seq[n] == first[n]:
                n += 1
            length = n
        if length < self.options.share_prefix:
            return 0, None
        began = time.perf_counter()
        prefix = torch.tensor([first[:length]], device=self.device)
        output = self.model(input_ids=prefix, use_cache=True)
        cache = getattr(output, "cache", None) or output.past_key_values
        cache.batch_repeat_interleave(len(seqs))
        self.seconds += time.perf_counter() - began
        self.prompt_tokens += length
        self.shared_prefix_tokens += length * (len(seqs) - 1)
        return length, cache

    def _forward(self, seqs: list[list[int]], keep: int):
        """Log-softmax over the vocabulary for the last ``keep`` positions of each (left-padded) sequence."""
        import torch

        prefix_len, cache = self._shared_prefix(seqs, keep)
        input_ids, mask = self._batch([s[prefix_len:] for s in seqs])
        positions = prefix_len + (mask.cumsum(-1) - 1).clamp(min=0)
        full_mask = (
            mask
            if cache is None
            else torch.cat([torch.ones(mask.shape[0], prefix_len, dtype=mask.dtype, device=mask.device), mask], dim=1)
        )
        began = time.perf_counter()
        logits = self.model(
            input_ids=input_ids,
            attention_mask=full_mask,
            position_ids=positions,
            logits_to_keep=keep,
            **{self._cache_argument: cache},
        ).logits
        self.seconds += time.perf_counter() - began
        self.prompt_tokens += int(mask.sum())
        return logits.float().log_softmax(-1)
