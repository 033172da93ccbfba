from __future__ import annotations

import math

import pytest

from cai_engine import ConfigError, GenerationSettings, Message, ModelError, UnknownComponentError
from cai_engine.components import ChatPrompt, cut_at_stop
from cai_engine.runtime import parse_model_ref

pytestmark = pytest.mark.slow

PROMPTS = ["Hello there, how are you today?", "Hi", "Tell me a long story about a dragon and a knight.", "ok?"]


@pytest.fixture
def backend(cai_runtime, tiny_model):
    return cai_runtime.backend(str(tiny_model))


def test_parse_model_ref():
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


def test_batched_generation_equals_one_at_a_time(backend):
    settings = GenerationSettings(max_new_tokens=12)
    batched = backend.generate(PROMPTS, settings)
    single = [backend.generate([p], settings)[0] for p in PROMPTS]
    assert batched == single
    assert len(set(batched)) > 1


def test_small_batches_give_the_same_results(cai_runtime, tiny_model, backend):
    settings = GenerationSettings(max_new_tokens=8)
    small = cai_runtime.backend({"model": str(tiny_model), "batch_size": 2})
    assert small.generate(PROMPTS, settings) == backend.generate(PROMPTS, settings)


def test_batches_group_similar_lengths_within_a_token_budget(cai_runtime, tiny_model):
    from cai_engine.backends.hf_local import TransformersBackend

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
    assert tight.generate(prompts, GenerationSettings(max_new_tokens=6)) == backend.generate(
        prompts, GenerationSettings(max_new_tokens=6)
    )
    for a, b in zip(
        tight.continuation_logprobs(prompts, [["A", "Bcd"]] * 4),
        backend.continuation_logprobs(prompts, [["A", "Bcd"]] * 4),
    ):
        assert a == pytest.approx(b, abs=1e-4)


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
    for p, (a, b), (a2, bcd, yn) in zip(prompts, single, multi):
        assert math.isclose(a, _reference_logprob(backend, p, "A"), abs_tol=1e-4)
        assert math.isclose(b, _reference_logprob(backend, p, "B"), abs_tol=1e-4)
        assert math.isclose(a2, a, abs_tol=1e-4)
        assert math.isclose(bcd, _reference_logprob(backend, p, "Bcd"), abs_tol=1e-4)
        assert math.isclose(yn, _reference_logprob(backend, p, "Yes no"), abs_tol=1e-4)


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
    for row_a, row_b in zip(shared_scores, plain_scores):
        assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(row_a, row_b))


def test_shared_prefix_gives_the_same_generations(cai_runtime, tiny_model, backend):
    unshared = cai_runtime.backend({"model": str(tiny_model), "share_prefix": 0})
    prompts = [FEW_SHOT + tail for tail in ("first item?", "a second, longer item here?", "3", "four")]
    settings = GenerationSettings(max_new_tokens=12)
    saved = backend.shared_prefix_tokens
    shared = backend.generate(prompts, settings)
    assert backend.shared_prefix_tokens > saved
    assert shared == unshared.generate(prompts, settings) == [backend.generate([p], settings)[0] for p in prompts]


def test_packed_weights_give_the_same_generations_and_logprobs(cai_runtime, tiny_model, backend):
    import torch

    stock = cai_runtime.backend({"model": str(tiny_model), "packed_weights": False})
    linear_layers = sum(type(m) is torch.nn.Linear for m in backend.model.modules())
    assert backend.packed_layers == linear_layers > 0 and "oneDNN-packed" in backend.path_summary
    assert all("forward" in vars(m) for m in backend.model.modules() if type(m) is torch.nn.Linear)
    assert stock.packed_layers == 0 and "packed" not in stock.path_summary
    settings = GenerationSettings(max_new_tokens=12)
    assert backend.generate(PROMPTS, settings) == stock.generate(PROMPTS, settings)
    options = [["A", "Bcd", "Yes no"]] * len(PROMPTS)
    for row_a, row_b in zip(
        backend.continuation_logprobs(PROMPTS, options), stock.continuation_logprobs(PROMPTS, options)
    ):
        assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(row_a, row_b))


def test_packed_weights_stay_off_outside_float32_on_cpu(cai_runtime, tiny_model):
    assert cai_runtime.backend({"model": str(tiny_model), "dtype": "bfloat16"}).packed_layers == 0
