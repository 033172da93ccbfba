from __future__ import annotations

import contextlib
import math

import pytest
from noise import bound as shared_bound
from noise import deviation

from cai_engine import ConfigError, GenerationSettings, Message, ModelError, UnknownComponentError
from cai_engine.plugins.components import ChatPrompt, cut_at_stop

pytestmark = pytest.mark.slow

PROMPTS = ["Hello there, how are you today?", "Hi", "Tell me a long story about a dragon and a knight.", "ok?"]


@pytest.fixture
def backend(cai_runtime, tiny_model):
    return cai_runtime.backend(str(tiny_model))


# -- comparing two computation paths ----------------------------------------------------------------------------------
#
# A batched, padded, prefix-shared or oneDNN-packed run of the tiny float32 model equals a sequence run alone only up
# to float32 rounding, and that rounding depends on the CPU: MKL and oneDNN choose AVX2 or AVX-512 code, and their
# blocking, by instruction set and matrix shape. So comparisons are not exact and use no tolerance measured on one
# machine: each test measures the model's own noise on the running machine (the same log-probs computed for each
# sequence alone and for all of them in one left-padded batch) and allows NOISE_MULTIPLE times that, plus FLOOR, a
# few hundred float32 roundings of the values compared, for machines where the two shapes agree bit for bit. Greedy
# generation is compared by what it promises: every token it chose is the first choice of a pass over that sequence
# alone, up to that bound (two paths may rightly part at a near tie, so texts are not compared across paths).

FLOOR = 512 * 2.0**-23  # ~6e-5 nats: 64 float32 roundings of a log-prob near -8


def bound(noise: float) -> float:
    return shared_bound(noise, FLOOR)


def alone(backend, sequences, firsts):
    """Next-token log-probs at positions ``first - 1`` onwards, one forward pass per sequence (no padding, no cache)."""
    import torch

    out = []
    with torch.inference_mode():
        for seq, first in zip(sequences, firsts):
            logits = backend.model(input_ids=torch.tensor([seq])).logits[0].float().log_softmax(-1)
            out.append(logits[first - 1 : len(seq) - 1])
    return out


def padded(backend, sequences, firsts):
    """The same log-probs from one left-padded batch of all the sequences (another batch shape)."""
    import torch

    width = max(map(len, sequences))
    ids = torch.tensor([[0] * (width - len(s)) + list(s) for s in sequences])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = (
            backend.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float().log_softmax(-1)
        )
    return [logits[r, width - len(s) + first - 1 : width - 1] for r, (s, first) in enumerate(zip(sequences, firsts))]


def model_noise(backend, sequences, firsts, tokens=None) -> float:
    """How far the model's log-probs move between two batch shapes on this machine."""
    pairs = zip(alone(backend, sequences, firsts), padded(backend, sequences, firsts))
    return max(deviation(a, b, None if tokens is None else tokens[i]) for i, (a, b) in enumerate(pairs))


@contextlib.contextmanager
def recording(backend):
    """Records every sequence ``backend.generate`` runs: its prompt tokens, the tokens chosen and the log-probs
    each was chosen from (the model's ``generate`` asked for its raw logits too)."""
    import torch

    rows: list[tuple[list[int], list[int], list]] = []
    generate = backend.model.generate
    pad, eos = backend.tokenizer.pad_token_id, backend.tokenizer.eos_token_id

    def recorded(*args, **kwargs):
        out = generate(*args, **kwargs, return_dict_in_generate=True, output_logits=True)
        ids, width = kwargs["input_ids"], kwargs["input_ids"].shape[1]
        steps = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # batch x steps x vocabulary
        for r in range(ids.shape[0]):
            chosen = []
            for token in out.sequences[r, width:].tolist():
                chosen.append(token)
                if token in (eos, pad):
                    break
            rows.append(([t for t in ids[r].tolist() if t != pad], chosen, steps[r, : len(chosen)]))
        return out.sequences

    backend.model.generate = recorded
    try:
        yield rows
    finally:
        del backend.model.generate


def check_greedy(backend, prompts, settings, reference=None) -> list[str]:
    """Greedy ``backend.generate`` is greedy under ``reference`` (default: the same model) run on each sequence alone,
    up to the bound; each text is the decoded tokens generated for its own prompt. Returns the texts."""
    reference = reference or backend
    with recording(backend) as rows:
        texts = backend.generate(prompts, settings)
    encoded = [backend._encode(p) for p in prompts]
    assert sorted(map(tuple, encoded)) == sorted(tuple(prompt) for prompt, _, _ in rows)  # every prompt ran once
    for prompt, chosen, steps in rows:
        kept = [t for t in chosen if t not in (backend.tokenizer.eos_token_id, backend.tokenizer.pad_token_id)]
        assert texts[encoded.index(prompt)] == backend.tokenizer.decode(kept, skip_special_tokens=True)
        assert chosen == [int(step.argmax()) for step in steps]  # greedy: the first choice, by construction
    sequences = [prompt + chosen for prompt, chosen, _ in rows]
    firsts = [len(prompt) for prompt, _, _ in rows]
    chosen_tokens = [chosen for _, chosen, _ in rows]
    noise = model_noise(reference, sequences, firsts, chosen_tokens)
    for (_, chosen, steps), single in zip(rows, alone(reference, sequences, firsts)):
        assert deviation(steps, single, chosen) <= bound(noise), (deviation(steps, single, chosen), noise)
        assert all(float(single[k].max() - single[k][t]) <= 2 * bound(noise) for k, t in enumerate(chosen))
    return texts


def option_sequences(backend, prompts, options):
    """(token sequences, firsts, continuation ids) for every option of every prompt, in order."""
    sequences, firsts, conts = [], [], []
    for prompt, opts in zip(prompts, options):
        ids = backend._encode(prompt)
        for option in opts:
            cont = backend.tokenizer(option, add_special_tokens=False)["input_ids"]
            sequences.append(ids + cont)
            firsts.append(len(ids))
            conts.append(cont)
    return sequences, firsts, conts


def score_noise(backend, prompts, options) -> float:
    """How far continuation scores (sums of log-probs) move between two batch shapes of the model on this machine."""
    sequences, firsts, conts = option_sequences(backend, prompts, options)
    totals = [
        [sum(float(lp[k][t]) for k, t in enumerate(cont)) for lp, cont in zip(way(backend, sequences, firsts), conts)]
        for way in (alone, padded)
    ]
    return max(abs(a - b) for a, b in zip(*totals))


def assert_scores_close(a, b, noise) -> None:
    worst = max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))
    assert worst <= bound(noise), (worst, noise, a, b)


def test_parse_model_ref(cai_runtime, monkeypatch):
    # the backends resolve references (Backend.claims); a GGUF file goes to llama.cpp only when it is installed
    monkeypatch.setattr("cai_engine.default_plugins.backends.llama_cpp.llama_cpp_available", lambda: False)
    parse_model_ref = cai_runtime.parse_model_ref
    assert parse_model_ref("smollm2") == ("transformers", {"model": "smollm2"})
    assert parse_model_ref("/m/x.gguf") == ("transformers", {"model": "/m/x.gguf"})
    assert parse_model_ref("http://127.0.0.1:8000/v1#qwen") == (
        "openai",
        {"base_url": "http://127.0.0.1:8000/v1", "model": "qwen"},
    )
    assert parse_model_ref({"model": "http://h/v1#m", "max_concurrency": 2}) == (
        "openai",
        {"model": "m", "base_url": "http://h/v1", "max_concurrency": 2},
    )
    assert parse_model_ref({"backend": "transformers", "model": "/x", "batch_size": 4})[1]["batch_size"] == 4
    with pytest.raises(ConfigError):
        parse_model_ref("")
    with pytest.raises(ConfigError, match="needs a 'model'"):
        parse_model_ref({"backend": "openai"})


def test_one_loaded_model_is_shared(cai_runtime, tiny_model):
    a = cai_runtime.backend(str(tiny_model))
    b = cai_runtime.backend({"model": str(tiny_model)})
    c = cai_runtime.backend({"model": str(tiny_model), "batch_size": 2})
    assert a is b and a is not c


def test_batched_generation_is_greedy_one_at_a_time(backend):
    """Batched (left-padded) greedy generation and one prompt at a time both pick, at every step, the first choice of
    a pass over that sequence alone, up to rounding (see above); each answer belongs to its own prompt."""
    settings = GenerationSettings(max_new_tokens=12)
    batched = check_greedy(backend, PROMPTS, settings)
    single = [check_greedy(backend, [p], settings)[0] for p in PROMPTS]
    assert len(set(batched)) > 1 and len(set(single)) > 1


def test_small_batches_give_the_same_results(cai_runtime, tiny_model, backend):
    settings = GenerationSettings(max_new_tokens=8)
    small = cai_runtime.backend({"model": str(tiny_model), "batch_size": 2})
    check_greedy(small, PROMPTS, settings, reference=backend)
    check_greedy(backend, PROMPTS, settings)


def test_batches_group_similar_lengths_within_a_token_budget(cai_runtime, tiny_model):
    from cai_engine.default_plugins.backends.hf_local import TransformersBackend

    def chunks(**options):
        backend = object.__new__(TransformersBackend)  # _chunks needs only the options, not a loaded model
        backend.options = TransformersBackend.Options(model=str(tiny_model), **options)
        return list(backend._chunks([5, 100, 6, 101, 7]))

    assert chunks(batch_size=2, batch_tokens=210) == [[0, 2], [4, 1], [3]]
    assert chunks(batch_size=2, batch_tokens=150) == [[0, 2], [4], [1], [3]]
    assert chunks(batch_size=8, batch_tokens=10) == [[0], [2], [4], [1], [3]]  # one item always fits


def test_a_token_budget_does_not_change_results(cai_runtime, tiny_model, backend):
    tight = cai_runtime.backend({"model": str(tiny_model), "batch_tokens": 40})
    prompts = ["The answer is: (", "Which is better? Short prompt", "x", "A much longer prompt " * 4]
    check_greedy(tight, prompts, GenerationSettings(max_new_tokens=6), reference=backend)
    options = [["A", "Bcd"]] * 4
    assert_scores_close(
        tight.continuation_logprobs(prompts, options),
        backend.continuation_logprobs(prompts, options),
        score_noise(backend, prompts, options),
    )


def test_max_new_tokens_is_respected(backend):
    before = backend.generated_tokens
    backend.generate(["a b c"], GenerationSettings(max_new_tokens=5))
    assert 1 <= backend.generated_tokens - before <= 5


def test_stop_strings_cut_generation(backend):
    full = backend.generate(["Once upon a time"], GenerationSettings(max_new_tokens=24))[0]
    assert len(full) > 6
    stop = full[4:6]
    expected = full[: full.find(stop)]
    assert backend.generate(["Once upon a time"], GenerationSettings(max_new_tokens=24, stop=(stop,)))[0] == expected


def test_cut_at_stop():
    assert cut_at_stop("abc\n\nHuman: x", ("\n\nHuman:", "zz")) == "abc"
    assert cut_at_stop("abc", ()) == "abc"
    assert cut_at_stop("a.b;c", (";", ".")) == "a"


def test_sampling_is_seeded(backend):
    def run(seed):
        return backend.generate(PROMPTS[:2], GenerationSettings(max_new_tokens=10, temperature=1.0, seed=seed))

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_repetition_penalty_changes_output(backend):
    plain = backend.generate(PROMPTS, GenerationSettings(max_new_tokens=16))
    penalised = backend.generate(PROMPTS, GenerationSettings(max_new_tokens=16, repetition_penalty=1.8))
    assert plain != penalised


def test_chat_prompts_use_the_template(backend):
    conv = [Message(role="user", content="hi")]
    assert backend.format_chat(conv).startswith("<|im_start|>user\nhi<|im_end|>")
    assert (
        backend._encode(ChatPrompt(conv, "The answer is: ("))
        == backend.tokenizer(backend.format_chat(conv) + "The answer is: (", add_special_tokens=False)["input_ids"]
    )


def test_transcript_when_no_template(cai_runtime, tiny_plain_model):
    plain = cai_runtime.backend(str(tiny_plain_model))
    assert not plain.has_chat_template
    assert plain.format_chat([Message(role="user", content="hi")]) == "\n\nHuman: hi\n\nAssistant:"


def _reference_logprob(backend, prompt: str, continuation: str) -> float:
    import torch

    ids = backend.tokenizer(prompt)["input_ids"]
    cont = backend.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = backend.model(input_ids=torch.tensor([ids + cont])).logits[0].log_softmax(-1)
    return sum(float(logits[len(ids) + i - 1, tok]) for i, tok in enumerate(cont))


def test_logprobs_match_an_unbatched_reference(backend):
    prompts = ["The answer is: (", "Which is better? Short prompt", "x"]
    single = backend.continuation_logprobs(prompts, [["A", "B"]] * 3)
    multi = backend.continuation_logprobs(prompts, [["A", "Bcd", "Yes no"]] * 3)
    tolerance = bound(score_noise(backend, prompts, [["A", "B", "Bcd", "Yes no"]] * 3))
    for p, (a, b), (a2, bcd, yn) in zip(prompts, single, multi):
        assert math.isclose(a, _reference_logprob(backend, p, "A"), abs_tol=tolerance)
        assert math.isclose(b, _reference_logprob(backend, p, "B"), abs_tol=tolerance)
        assert math.isclose(a2, a, abs_tol=tolerance)
        assert math.isclose(bcd, _reference_logprob(backend, p, "Bcd"), abs_tol=tolerance)
        assert math.isclose(yn, _reference_logprob(backend, p, "Yes no"), abs_tol=tolerance)


def test_continuation_scores_come_back_in_the_order_asked(backend):
    """Continuations of different lengths are scored in length-sorted batches; each score must come back at the
    position its continuation was given in, whatever that order."""
    options = [" ab", " abcdefgh", " abcd", " x"]
    scores = backend.continuation_logprobs(["Hello there"], [options])[0]
    for order in ([3, 2, 1, 0], [1, 3, 0, 2]):
        shuffled = backend.continuation_logprobs(["Hello there"], [[options[k] for k in order]])[0]
        assert shuffled == [scores[k] for k in order]


def test_prompt_longer_than_context_is_a_clear_error(cai_runtime, tmp_path):
    from cai_engine.testing import build_tiny_model

    backend = cai_runtime.backend(str(build_tiny_model(tmp_path / "short", context=512)))
    with pytest.raises(ModelError, match=r"prompt 1 is \d+ tokens.*context of 512 tokens"):
        backend.generate(["short", "x" * 600], GenerationSettings(max_new_tokens=4))
    with pytest.raises(ModelError, match="context of 512"):
        backend.continuation_logprobs(["y" * 520], [["A", "B"]])


def test_missing_model_path(cai_runtime, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        cai_runtime.backend(str(tmp_path / "nope"))


def test_folder_without_config(cai_runtime, tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        cai_runtime.backend(str(tmp_path))


def test_pickle_only_folder_is_refused(cai_runtime, tmp_path):
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelError, match="safetensors only"):
        cai_runtime.backend(str(tmp_path))


def test_corrupt_gguf_is_a_clear_error(cai_runtime, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelError, match="cannot read this GGUF file"):
        cai_runtime.backend(str(bad))
    not_gguf = tmp_path / "weights.txt"
    not_gguf.write_text("x", encoding="utf-8")
    with pytest.raises(ModelError, match="must be .gguf"):
        cai_runtime.backend(str(not_gguf))


def test_unknown_backend_and_bad_backend_options(cai_runtime, tiny_model):
    with pytest.raises(
        UnknownComponentError, match="unknown backend .vllm.; known backends: llamacpp, openai, transformers"
    ):
        cai_runtime.backend({"backend": "vllm", "model": "x"})
    with pytest.raises(ConfigError, match="batch_sise: unknown option"):
        cai_runtime.backend({"model": str(tiny_model), "batch_sise": 3})


FEW_SHOT = (
    "You are a careful assistant. Here is an example of the task, done well, followed by the real task. "
    "Example: the reply was fine and needed no change. Now the real task follows. "
)


@pytest.mark.parametrize("keep_options", [["A", "B"], ["1", "10", "Yes no"]])
def test_shared_prefix_gives_the_same_logprobs(cai_runtime, tiny_model, backend, keep_options):
    unshared = cai_runtime.backend({"model": str(tiny_model), "share_prefix": 0})
    prompts = [FEW_SHOT + tail for tail in ("first item?", "a second, longer item here?", "3")]
    saved = backend.shared_prefix_tokens
    shared_scores = backend.continuation_logprobs(prompts, [keep_options] * 3)
    assert backend.shared_prefix_tokens > saved  # the prefix was computed once, not three times
    plain_scores = unshared.continuation_logprobs(prompts, [keep_options] * 3)
    assert_scores_close(shared_scores, plain_scores, score_noise(unshared, prompts, [keep_options] * 3))


def test_shared_prefix_gives_the_same_generations(cai_runtime, tiny_model, backend):
    unshared = cai_runtime.backend({"model": str(tiny_model), "share_prefix": 0})
    prompts = [FEW_SHOT + tail for tail in ("first item?", "a second, longer item here?", "3", "four")]
    settings = GenerationSettings(max_new_tokens=12)
    saved = backend.shared_prefix_tokens
    check_greedy(backend, prompts, settings, reference=unshared)
    assert backend.shared_prefix_tokens > saved
    check_greedy(unshared, prompts, settings)


def test_packed_weights_give_the_same_generations_and_logprobs(cai_runtime, tiny_model, backend):
    import torch

    stock = cai_runtime.backend({"model": str(tiny_model), "packed_weights": False})
    linear_layers = sum(type(m) is torch.nn.Linear for m in backend.model.modules())
    assert backend.packed_layers == linear_layers > 0 and "oneDNN-packed" in backend.path_summary
    assert all("forward" in vars(m) for m in backend.model.modules() if type(m) is torch.nn.Linear)
    assert stock.packed_layers == 0 and "packed" not in stock.path_summary
    settings = GenerationSettings(max_new_tokens=12)
    check_greedy(backend, PROMPTS, settings, reference=stock)
    check_greedy(stock, PROMPTS, settings)
    options = [["A", "Bcd", "Yes no"]] * len(PROMPTS)
    assert_scores_close(
        backend.continuation_logprobs(PROMPTS, options),
        stock.continuation_logprobs(PROMPTS, options),
        score_noise(stock, PROMPTS, options),
    )


def test_packed_weights_stay_off_outside_float32_on_cpu(cai_runtime, tiny_model):
    assert cai_runtime.backend({"model": str(tiny_model), "dtype": "bfloat16"}).packed_layers == 0
