"""The in-process llama.cpp backend on the real default model's GGUF (98 MB, loads in well under a second)."""

from __future__ import annotations

import pytest
from conftest import require_default_model

from cai_engine import ChatPrompt, Message, Runtime
from cai_engine.backends.llama_decode import Job, _common_length
from cai_engine.components import GenerationSettings
from cai_engine.errors import ModelError

pytestmark = pytest.mark.model

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "How do I boil an egg?",
    "Name three colours.",
    "What is 2 + 2?",
]


@pytest.fixture(scope="module")
def runtime():
    pytest.importorskip("llama_cpp")
    require_default_model()
    rt = Runtime()
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def backend(runtime):
    return runtime.backend({"backend": "llamacpp", "model": "smollm2", "parallel": 4, "n_ctx": 1024})


def conversations(questions=QUESTIONS):
    return [[Message(role="user", content=q)] for q in questions]


def test_gguf_references_use_llama_cpp_when_installed(runtime):
    from cai_engine.backends.model_files import default_model_file

    cls, _ = runtime.backend_options(str(default_model_file()))
    assert cls.name == "llamacpp"
    assert runtime.backend_options("smollm2")[0].name == "transformers"  # training and base stay on transformers
    assert (
        runtime.backend_options({"backend": "transformers", "model": str(default_model_file())})[0].name
        == "transformers"
    )


def test_greedy_batched_output_equals_one_at_a_time(backend):
    """Batched greedy decoding picks, at every step, the token a one-at-a-time pass ranks first, up to ties.

    llama.cpp's CPU kernels quantise activations differently for one token per step, several tokens per step, and
    prompt processing (measured on this Q4_1 model: up to 0.05 nats between a one-sequence decode and a prompt
    pass, 0.12 with four sequences per step), so two near-tied tokens may swap; the check allows 0.2 nats and
    nothing more. Prompt processing and scoring are bit-for-bit the same batched and alone (see the next tests).
    """
    settings = GenerationSettings(max_new_tokens=24)
    batched = backend.generate(conversations(), settings)  # 5 prompts, 4 slots: one slot is refilled
    assert all(text.strip() for text in batched)
    jobs = [Job(index=i, tokens=backend._encode(c), max_new=24) for i, c in enumerate(conversations())]
    backend._run(jobs, settings)  # the same jobs again, to get the token ids
    for i, (job, conv) in enumerate(zip(jobs, conversations())):
        prompt = backend._encode(conv)
        full = prompt + job.generated
        single = Job(index=0, tokens=full, want=tuple(range(len(prompt) - 1, len(full) - 1)))
        backend._run([single], GenerationSettings(max_new_tokens=1))
        for step, token in enumerate(job.generated):
            logprobs = single.logprobs[len(prompt) - 1 + step]
            assert logprobs.max() - logprobs[token] < 0.2, (i, step)
    single_texts = [backend.generate([c], settings)[0] for c in conversations()]
    assert sum(a == b for a, b in zip(batched, single_texts)) >= 4


@pytest.mark.parametrize("weights", ["original", "f16"])
def test_shared_prefix_is_computed_once_and_changes_nothing(runtime, weights):
    """A shared prefix changes results only by rounding. The prefix is decoded in its own batch, and llama.cpp's
    attention kernel tiles a batch of queries differently from one query, so upper layers see slightly different
    keys: on the file's Q4_1 weights (activations rounded to 8 bits) up to ~0.2 nats, on the F16 copy under 0.01."""
    prefix = "You answer in one short sentence. " * 12
    prompts = [ChatPrompt([Message(role="system", content=prefix), Message(role="user", content=q)]) for q in QUESTIONS]
    settings = GenerationSettings(max_new_tokens=16)
    common = {"backend": "llamacpp", "model": "smollm2", "parallel": 4, "n_ctx": 1024, "weights": weights}
    shared = runtime.backend(common)
    plain = runtime.backend({**common, "share_prefix": 0})
    before = shared.shared_prefix_tokens
    texts = shared.generate(prompts, settings)
    alone = plain.generate(prompts, settings)
    assert all(t.strip() for t in texts)
    assert shared.shared_prefix_tokens - before >= 60 * (len(prompts) - 1)
    assert plain.shared_prefix_tokens == 0
    options = [["Yes", "No", "The answer"]] * len(prompts)
    with_prefix = shared.continuation_logprobs(prompts, options)
    without = plain.continuation_logprobs(prompts, options)
    tolerance = 0.3 if weights == "original" else 0.05
    assert sum(a == b for a, b in zip(texts, alone)) >= 4
    assert max(abs(a - b) for ra, rb in zip(with_prefix, without) for a, b in zip(ra, rb)) < tolerance
    # the prefix stays cached: a later call with the same instructions decodes only its own tokens
    prompt_tokens = shared.prompt_tokens
    shared.generate(prompts[:2], settings)
    assert shared.prompt_tokens - prompt_tokens < 2 * 40


def test_a_unified_kv_cache_gives_the_per_sequence_results(runtime):
    """``kv_cache: unified`` (one cache, no equal-length split of each decode call) scores and generates what one
    stream per sequence does, up to rounding on the F16 copy, shared prefixes and scoring groups included."""
    common = {"backend": "llamacpp", "model": "smollm2", "parallel": 4, "n_ctx": 512, "weights": "f16"}
    unified = runtime.backend({**common, "kv_cache": "unified"})
    separate = runtime.backend(common)
    assert "unified KV cache" in unified.path_summary and "per sequence" in separate.path_summary
    exchange = "Here is a reply to judge, followed by one question about it. " * 4
    prompts = [
        ChatPrompt([Message(role="system", content=exchange), Message(role="user", content=q)]) for q in QUESTIONS
    ]
    options = [["Yes", "No", "The answer is"]] * len(prompts)
    before = unified.shared_prefix_tokens
    scores = unified.continuation_logprobs(prompts, options)
    assert unified.shared_prefix_tokens - before >= 40 * (len(prompts) - 1)  # the prefix was shared, not recomputed
    expected = separate.continuation_logprobs(prompts, options)
    assert max(abs(a - b) for ra, rb in zip(scores, expected) for a, b in zip(ra, rb)) < 0.05
    settings = GenerationSettings(max_new_tokens=16)
    texts = unified.generate(prompts, settings)
    assert all(t.strip() for t in texts)
    assert sum(a == b for a, b in zip(texts, separate.generate(prompts, settings))) >= 4


def test_prefixes_are_cached_across_single_prompt_calls(runtime):
    """A request path sends one prompt at a time: each call's prompt stays cached, so the next one that starts the
    same way (the same instructions, the same reply asked about again) decodes only what is new; a few different
    prefixes are kept at once, least recently used replaced first. Results equal an uncached run up to rounding."""
    common = {"backend": "llamacpp", "model": "smollm2", "parallel": 2, "n_ctx": 512, "weights": "f16"}
    cached = runtime.backend({**common, "prefix_cache": 2})
    plain = runtime.backend({**common, "share_prefix": 0})
    heads = ["Rules for the assistant: be brief and kind. " * 6, "Answer like a pirate would, always. " * 6]
    prompts = [
        ChatPrompt([Message(role="system", content=h), Message(role="user", content=q)])
        for h in heads
        for q in QUESTIONS[:2]
    ]
    options = [["Yes", "No"]]
    new_tokens = []
    for prompt in [*prompts, *prompts]:  # two prefixes alternate; both stay cached
        before = cached.prompt_tokens
        (yes, no), (yes_plain, no_plain) = [b.continuation_logprobs([prompt], options)[0] for b in (cached, plain)]
        assert abs(yes - yes_plain) < 0.05 and abs(no - no_plain) < 0.05
        new_tokens.append(cached.prompt_tokens - before)
    first_sight = [new_tokens[0], new_tokens[2]]  # each set of rules is decoded in full once
    assert min(first_sight) > 50 and max(new_tokens[1:2] + new_tokens[3:]) < 25
    assert cached.shared_prefix_tokens > 7 * 40


def test_scoring_groups_prompts_that_share_a_reply(runtime):
    """Scoring calls are split into groups sharing a long prefix (several questions about one reply), each prefix
    decoded once; the scores equal those computed with no sharing, up to rounding."""
    common = {"backend": "llamacpp", "model": "smollm2", "parallel": 4, "n_ctx": 1024, "weights": "f16"}
    grouped = runtime.backend(common)
    plain = runtime.backend({**common, "share_prefix": 0})
    replies = [f"Reply {i}: " + "the weather was calm and the sea was flat that whole week. " * 4 for i in range(3)]
    questions = ["Is it rude?", "Is it harmful?", "Is it false?", "Is it off topic?"]
    prompts = [f"{reply}\n\nQuestion: {question} Answer:" for reply in replies for question in questions]
    options = [[" Yes", " No"]] * len(prompts)
    plan = grouped._plan([Job(index=i, tokens=grouped._encode(p), want=(0,)) for i, p in enumerate(prompts)])
    assert len(plan) == 1  # the positions read start at 0: nothing can be shared
    jobs = [Job(index=i, tokens=grouped._encode(p)) for i, p in enumerate(prompts)]
    for job in jobs:
        job.want = (len(job.tokens) - 1,)
    plan = grouped._plan(jobs)
    assert sorted(len(group) for _, group in plan) == [4, 4, 4] and all(length > 40 for length, _ in plan)
    before = grouped.prompt_tokens
    scores, unshared = grouped.continuation_logprobs(prompts, options), plain.continuation_logprobs(prompts, options)
    assert max(abs(a - b) for ra, rb in zip(scores, unshared) for a, b in zip(ra, rb)) < 0.05
    assert grouped.prompt_tokens - before < plain.prompt_tokens / 2


def test_scoring_groups_the_continuations_of_one_short_prompt(runtime):
    """Several multi-token continuations of one prompt are one job each; the prompt is shorter than `share_prefix`,
    but each prompt's jobs still form a group (together they save more than `share_prefix` tokens), so every prompt
    is decoded once, not once per continuation. Scores equal those computed with no sharing, up to rounding."""
    common = {"backend": "llamacpp", "model": "smollm2", "parallel": 4, "n_ctx": 512, "weights": "f16"}
    grouped = runtime.backend(common)
    plain = runtime.backend({**common, "share_prefix": 0})
    prompts = [ChatPrompt([Message(role="user", content=q)]) for q in QUESTIONS[:3]]
    options = [["I'm sorry", "I cannot", "I can't", "Sorry", "As an AI", "Sure, here"]] * len(prompts)
    encoded = [grouped._encode(p) for p in prompts]
    own = [len(e) - _common_length(encoded, len(e)) for e in encoded]
    assert max(own) < grouped.options.share_prefix  # each prompt's own part alone is too short to share
    before = grouped.prompt_tokens
    scores, unshared = grouped.continuation_logprobs(prompts, options), plain.continuation_logprobs(prompts, options)
    assert max(abs(a - b) for ra, rb in zip(scores, unshared) for a, b in zip(ra, rb)) < 0.05
    assert grouped.prompt_tokens - before < plain.prompt_tokens / 2


def test_weights_are_stored_for_batched_kernels_once(runtime, tmp_path, monkeypatch):
    """A Q4_1 file decoded in batches runs from an F16 copy made once in the cache (llama.cpp has tiled batch
    kernels for F16, not for Q4_1); 'original' keeps the file."""
    from cai_engine.backends import model_files

    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path))
    auto = runtime.backend({"backend": "llamacpp", "model": "smollm2", "parallel": 2, "n_ctx": 256})
    assert auto.layout == "f16" and auto.model_id.endswith("run as f16")
    copies = list((tmp_path / "models").glob("*.f16.gguf"))
    assert len(copies) == 1 and not list((tmp_path / "models").glob("*.part"))
    stamp = copies[0].stat().st_mtime_ns
    assert model_files.relayout_gguf(auto.path, "f16") == copies[0] and copies[0].stat().st_mtime_ns == stamp
    original = runtime.backend(
        {"backend": "llamacpp", "model": "smollm2", "parallel": 2, "n_ctx": 256, "weights": "original"}
    )
    assert original.layout == "original" and "run as" not in original.model_id
    texts = [
        b.generate(["The capital of France is"], GenerationSettings(max_new_tokens=4))[0] for b in (auto, original)
    ]
    assert texts[0].strip() and texts[1].strip()
    with pytest.raises(ModelError, match="unknown weight layout"):
        model_files.relayout_gguf(auto.path, "q2_k")


def test_sampling_is_seeded_per_prompt_not_per_batch(backend):
    settings = GenerationSettings(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=7)
    convs = conversations()
    together = backend.generate(convs, settings)
    again = backend.generate(convs, settings)
    assert together == again
    other = backend.generate(convs, GenerationSettings(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=8))
    assert other != together


def test_stop_strings_cut_the_output(backend):
    text = backend.generate(["1, 2, 3, 4, 5, 6,"], GenerationSettings(max_new_tokens=20))[0]
    assert "," in text
    cut = backend.generate(["1, 2, 3, 4, 5, 6,"], GenerationSettings(max_new_tokens=20, stop=(",",)))[0]
    assert "," not in cut and text.startswith(cut)


def test_logprobs_agree_with_transformers_on_the_same_gguf(runtime, backend):
    hf = runtime.backend("smollm2")
    prompts = [ChatPrompt(c, assistant_prefix="The answer is: (") for c in conversations()[:3]]
    options = [["A", "B"], ["A", "B"], ["A", "B"]]
    ours = backend.continuation_logprobs(prompts, options)
    theirs = hf.continuation_logprobs(prompts, options)
    for row_a, row_b in zip(ours, theirs):
        for a, b in zip(row_a, row_b):
            assert abs(a - b) < 0.3  # Q4_1 weights in both; llama.cpp quantises activations to 8 bits
    multi = backend.continuation_logprobs(["The capital of France is"], [[" Paris", " Paris, France", " London"]])[0]
    multi_hf = hf.continuation_logprobs(["The capital of France is"], [[" Paris", " Paris, France", " London"]])[0]
    assert max(abs(a - b) for a, b in zip(multi, multi_hf)) < 0.3
    assert multi[0] > multi[1]  # a longer continuation adds log-probs, it never gains them


def test_chat_template_renders_as_the_tokenizer_does(runtime, backend):
    hf = runtime.backend("smollm2")
    conv = [
        Message(role="system", content="Be brief."),
        Message(role="user", content="Hi"),
        Message(role="assistant", content="Hello!"),
        Message(role="user", content="Bye"),
    ]
    assert backend.format_chat(conv) == hf.format_chat(conv)
    assert backend.format_chat(conv, add_generation_prompt=False) == hf.format_chat(conv, add_generation_prompt=False)


def test_bad_files_are_clear_errors(runtime, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelError, match="cannot read this GGUF file"):
        runtime.backend(str(bad))
    with pytest.raises(ModelError, match="no such GGUF file"):
        runtime.backend({"backend": "llamacpp", "model": str(tmp_path / "missing.gguf")})
