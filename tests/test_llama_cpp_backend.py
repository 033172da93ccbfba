"""The in-process llama.cpp backend on the real default model's GGUF (98 MB, loads in well under a second)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from noise import bound as shared_bound
from noise import deviation

from cai_engine import ChatPrompt, Message, Runtime
from cai_engine.default_plugins.backends.llama_decode import Job, _common_length, log_softmax
from cai_engine.errors import ModelError
from cai_engine.plugins.components import GenerationSettings
from cai_engine.testing import require_default_model

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


# -- comparing two computation paths ----------------------------------------------------------------------------------
#
# Two ways of computing the same thing (batched and alone, with a shared prefix and without) agree only up to
# rounding, and how much rounding depends on the CPU: llama.cpp picks its kernels per instruction set (AVX2, AVX-512,
# VNNI, AMX tile and quantise activations differently) and per batch shape. So no comparison here uses a tolerance
# measured on one machine. Each test measures the reference path's own noise on the running machine: the same
# log-probs computed twice, in one prompt pass and in other batch shapes (the prompt in pieces, then one token per
# decode call for several sequences at once, as generation runs). A path under test may differ from the reference by
# NOISE_MULTIPLE times that, plus NOISE_FLOOR for machines where the shapes happen to agree bit for bit (observed
# here, on AVX-512: the paths under test differ by 0.7-1.0 times the noise). A broken path (a wrong or stale KV
# cache, a prefix copied to the wrong place, sequences that see each other) is off by far more.

NOISE_FLOOR = 0.02  # nats


def bound(noise: float) -> float:
    return shared_bound(noise, NOISE_FLOOR)


def prompt_pass(backend, sequences, firsts):
    """For each token sequence, the next-token log-probs at positions ``first - 1`` to the end, from one prompt pass
    over that sequence alone (no shared or cached prefix)."""
    out = []
    for tokens, first in zip(sequences, firsts):
        job = Job(index=0, tokens=list(tokens), want=tuple(range(first - 1, len(tokens) - 1)))
        with backend._lock:
            backend._run_group([job], GenerationSettings(max_new_tokens=1), 0)
        out.append(np.stack([job.logprobs[p] for p in job.want]))
    return out


def stepwise(backend, sequences, firsts):
    """The same log-probs as :func:`prompt_pass` in other batch shapes: the tokens before ``first - 1`` in pieces of
    32 (as a shared prefix splits a prompt), then, the way generation runs, one token of each sequence per decode
    call with ``parallel`` sequences side by side."""
    import llama_cpp

    out: list[list] = [[] for _ in sequences]
    width, chunk = backend.options.parallel, 32
    with backend._lock:
        for start in range(0, len(sequences), width):
            group = list(enumerate(range(start, min(start + width, len(sequences)))))  # (slot, sequence)
            for slot, i in group:
                llama_cpp.llama_memory_seq_rm(backend._memory, slot, -1, -1)
                for pos in range(0, firsts[i] - 1, chunk):
                    end = min(pos + chunk, firsts[i] - 1)
                    backend._fill([(slot, sequences[i][p], p, False) for p in range(pos, end)])
                    backend._decode()
            for pos in range(min(firsts[i] for _, i in group) - 1, max(len(sequences[i]) for _, i in group) - 1):
                entries = [(slot, i) for slot, i in group if firsts[i] - 1 <= pos < len(sequences[i]) - 1]
                if not entries:
                    continue
                backend._fill([(slot, sequences[i][pos], pos, True) for slot, i in entries])
                backend._decode()
                for k, (_, i) in enumerate(entries):
                    out[i].append(log_softmax(backend._logits(k)))
            for slot, _ in group:
                llama_cpp.llama_memory_seq_rm(backend._memory, slot, -1, -1)
    return [np.stack(rows) for rows in out]


@contextlib.contextmanager
def recording(backend):
    """Records, per prompt index, each sampled token and the log-probs the sampler chose it from."""
    steps: dict[int, list[tuple[int, np.ndarray]]] = {}
    sample = backend._sample

    def recorded(logits, job, settings, rng):
        token = sample(logits, job, settings, rng)
        steps.setdefault(job.index, []).append((token, log_softmax(logits)))
        return token

    backend._sample = recorded
    try:
        yield steps
    finally:
        del backend._sample


def reference_scores(reference, prompts, options) -> tuple[list[list[float]], float]:
    """``reference.continuation_logprobs`` and how far those scores move when the same tokens are decoded stepwise
    (the reference path's own noise on this machine, in the units the scores are compared in)."""
    scores = reference.continuation_logprobs(prompts, options)
    fed: dict[tuple[int, ...], int] = {}  # tokens fed -> row in `sequences`; one-token options share one sequence
    sequences, firsts, lookups = [], [], []
    for i, (prompt, opts) in enumerate(zip(prompts, options)):
        ids = reference._encode(prompt)
        for j, option in enumerate(opts):
            cont = reference._tokenize(option, special=False)
            key = tuple(ids + cont[:-1])
            if key not in fed:
                fed[key] = len(sequences)
                sequences.append(ids + cont)
                firsts.append(len(ids))
            lookups.append((i, j, fed[key], cont))
    rows = stepwise(reference, sequences, firsts)
    noise = max(
        abs(scores[i][j] - sum(float(rows[k][t][tok]) for t, tok in enumerate(cont))) for i, j, k, cont in lookups
    )
    return scores, noise


def largest_difference(a, b) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def check_greedy_generation(candidate, reference, prompts, settings) -> tuple[list[str], dict[str, float]]:
    """Greedy generation on ``candidate`` is greedy under ``reference`` up to rounding: at every step the log-probs
    generation chose from are within the bound of the reference's prompt pass over the same tokens, so the chosen
    token is the reference's first choice or within twice the bound of it. Exact text equality is not asked for: on
    a near tie, two paths may rightly take different tokens. Returns the texts and the figures measured."""
    with recording(candidate) as steps:
        texts = candidate.generate(prompts, settings)
    assert all(t.strip() for t in texts)
    encoded = [candidate._encode(p) for p in prompts]
    chosen = [[token for token, _ in steps[i]] for i in range(len(prompts))]
    for i, text in enumerate(texts):
        generated = [t for t in chosen[i] if t not in candidate._end_of_generation()]
        assert text == candidate._detokenize(generated).rstrip("\ufffd")  # the text is the tokens it chose, in order
        assert all(token == int(lp.argmax()) for token, lp in steps[i])  # greedy: the first choice, by construction
    sequences = [e + c for e, c in zip(encoded, chosen)]
    firsts = [len(e) for e in encoded]
    reference_lp = prompt_pass(reference, sequences, firsts)
    alternative = stepwise(reference, sequences, firsts)
    noise = max(deviation(ref, alt, c) for ref, alt, c in zip(reference_lp, alternative, chosen))
    gap = deviation_gap = 0.0
    for i, ref in enumerate(reference_lp):
        seen = np.stack([lp for _, lp in steps[i]])
        deviation_gap = max(deviation_gap, deviation(seen, ref[: len(seen)], chosen[i]))
        for step, token in enumerate(chosen[i]):
            gap = max(gap, float(ref[step].max() - ref[step][token]))
    figures = {"noise": noise, "deviation": deviation_gap, "gap": gap, "steps": sum(map(len, chosen))}
    assert deviation_gap <= bound(noise), figures
    assert gap <= 2 * bound(noise), figures
    return texts, figures


def test_gguf_references_use_llama_cpp_when_installed(runtime):
    from cai_engine.models.files import default_model_file

    cls, _ = runtime.backend_options(str(default_model_file()))
    assert cls.name == "llamacpp"
    assert runtime.backend_options("smollm2")[0].name == "transformers"  # training and base stay on transformers
    assert (
        runtime.backend_options({"backend": "transformers", "model": str(default_model_file())})[0].name
        == "transformers"
    )


def test_batched_greedy_decoding_is_greedy_one_at_a_time(runtime, backend):
    """Batched greedy decoding (5 prompts, 4 slots: one slot is refilled) picks, at every step, the token a pass
    over that sequence alone ranks first, up to rounding: the log-probs it chose from are within the bound of the
    one-at-a-time pass's (llama.cpp's kernels round differently for one token per step, several sequences per step
    and prompt processing, by an amount that depends on the CPU, so two near-tied tokens may swap; the texts are
    not compared)."""
    reference = runtime.backend(
        {"backend": "llamacpp", "model": "smollm2", "parallel": 4, "n_ctx": 1024, "share_prefix": 0}
    )
    assert reference.layout == backend.layout
    _, figures = check_greedy_generation(backend, reference, conversations(), GenerationSettings(max_new_tokens=24))
    assert figures["steps"] >= 5 * 2


@pytest.mark.parametrize("weights", ["original", "f16"])
def test_shared_prefix_is_computed_once_and_changes_nothing(runtime, weights):
    """A shared prefix changes results only by rounding. The prefix is decoded in its own batch, and llama.cpp tiles
    (and, on Q4_1 weights, quantises the activations of) a batch differently by its shape, so upper layers see
    slightly different keys: by how much depends on the CPU's kernels, so the bound is measured (see above)."""
    prefix = "You answer in one short sentence. " * 12
    prompts = [ChatPrompt([Message(role="system", content=prefix), Message(role="user", content=q)]) for q in QUESTIONS]
    settings = GenerationSettings(max_new_tokens=16)
    common = {"backend": "llamacpp", "model": "smollm2", "parallel": 4, "n_ctx": 1024, "weights": weights}
    shared = runtime.backend(common)
    plain = runtime.backend({**common, "share_prefix": 0})
    before = shared.shared_prefix_tokens
    check_greedy_generation(shared, plain, prompts, settings)
    assert shared.shared_prefix_tokens - before >= 60 * (len(prompts) - 1)
    options = [["Yes", "No", "The answer"]] * len(prompts)
    with_prefix = shared.continuation_logprobs(prompts, options)
    without, noise = reference_scores(plain, prompts, options)
    assert plain.shared_prefix_tokens == 0
    assert largest_difference(with_prefix, without) <= bound(noise), (largest_difference(with_prefix, without), noise)
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
    expected, noise = reference_scores(separate, prompts, options)
    assert largest_difference(scores, expected) <= bound(noise), (largest_difference(scores, expected), noise)
    check_greedy_generation(unified, separate, prompts, GenerationSettings(max_new_tokens=16))


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
    _, noise = reference_scores(plain, prompts, options * len(prompts))
    new_tokens = []
    for prompt in [*prompts, *prompts]:  # two prefixes alternate; both stay cached
        before = cached.prompt_tokens
        scores, plain_scores = [b.continuation_logprobs([prompt], options) for b in (cached, plain)]
        assert largest_difference(scores, plain_scores) <= bound(noise), (scores, plain_scores, noise)
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
    before, plain_before = grouped.prompt_tokens, plain.prompt_tokens
    scores = grouped.continuation_logprobs(prompts, options)
    unshared, noise = reference_scores(plain, prompts, options)
    assert largest_difference(scores, unshared) <= bound(noise), (largest_difference(scores, unshared), noise)
    assert grouped.prompt_tokens - before < (plain.prompt_tokens - plain_before) / 2


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
    before, plain_before = grouped.prompt_tokens, plain.prompt_tokens
    scores = grouped.continuation_logprobs(prompts, options)
    unshared, noise = reference_scores(plain, prompts, options)
    assert largest_difference(scores, unshared) <= bound(noise), (largest_difference(scores, unshared), noise)
    assert grouped.prompt_tokens - before < (plain.prompt_tokens - plain_before) / 2


def test_weights_are_stored_for_batched_kernels_once(runtime, tmp_path, monkeypatch):
    """A Q4_1 file decoded in batches runs from an F16 copy made once in the cache (llama.cpp has tiled batch
    kernels for F16, not for Q4_1); 'original' keeps the file."""
    from cai_engine.models import files as model_files

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
    """llama.cpp scores what transformers scores from the same GGUF, up to rounding. The backend runs the F16 copy
    (weights, matrix inputs and KV cache rounded to f16; transformers runs float32), so the bound is these scores'
    own sensitivity to f16 rounding, measured here (transformers in float16 against float32), plus llama.cpp's
    batch-shape noise, both on the running machine."""
    assert backend.layout == "f16"
    hf = runtime.backend("smollm2")
    hf16 = runtime.backend({"model": "smollm2", "dtype": "float16"})
    prompts = [ChatPrompt(c, assistant_prefix="The answer is: (") for c in conversations()[:3]]
    prompts.append("The capital of France is")
    options = [["A", "B"]] * 3 + [[" Paris", " Paris, France", " London"]]  # options of different token lengths
    ours, noise = reference_scores(backend, prompts, options)
    theirs = hf.continuation_logprobs(prompts, options)
    sensitivity = largest_difference(hf16.continuation_logprobs(prompts, options), theirs)
    assert largest_difference(ours, theirs) <= bound(noise + sensitivity), (ours, theirs, noise, sensitivity)
    multi = ours[-1]
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


def test_weight_repacking_is_off_where_the_cpu_has_amx(runtime, backend):
    # llama.cpp's AMX matrix product crashes the whole process on some Intel CPUs (ggml-org/llama.cpp#20824, seen
    # here on a 2-core Xeon): 'auto' leaves llama.cpp's extra buffer types, where it repacks weights, off there
    import llama_cpp.llama_cpp as low

    from cai_engine.default_plugins.backends.llama_cpp import cpu_has_amx, model_params, repack_enabled

    amx = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile amx_int8\n"
    plain = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
    assert cpu_has_amx(amx) and not cpu_has_amx(plain) and not cpu_has_amx("")
    assert not repack_enabled("auto", amx) and repack_enabled("auto", plain)
    assert repack_enabled("on", amx) and not repack_enabled("off", plain)
    with pytest.raises(ValueError, match="auto, on or off"):
        repack_enabled("maybe", plain)
    # the parameters llama-cpp-python opens a model with change inside the block only
    assert low.llama_model_default_params().use_extra_bufts
    with model_params(repack=False):
        assert not low.llama_model_default_params().use_extra_bufts
    assert low.llama_model_default_params().use_extra_bufts
    # the backend chose for this CPU and says so; with repacking off it still answers
    assert backend.repack is not cpu_has_amx()
    assert ("no weight repacking" in backend.path_summary) is cpu_has_amx()
    off = runtime.backend({"backend": "llamacpp", "model": "smollm2", "parallel": 2, "n_ctx": 512, "repack": "off"})
    assert not off.repack and "no weight repacking" in off.path_summary
    assert not off._llm.model_params.use_extra_bufts and backend._llm.model_params.use_extra_bufts is backend.repack
    assert any(c.isdigit() for c in off.generate(["1, 2, 3, 4, 5, 6,"], GenerationSettings(max_new_tokens=8))[0])
