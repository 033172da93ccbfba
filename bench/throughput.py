"""Throughput on this machine, every path on the same work, in one run; the ratios are printed last.

Every path is warmed up once before it is timed (first-call allocations are not throughput).

1. SL-CAI-style generation on the default model (16 critique prompts, greedy): transformers one at a time,
   transformers batched, llama.cpp's own single stream (``llama_cpp.Llama``, the reference), and the engine's
   llama.cpp backend batched. Generated tokens per second, prefill included.
2. Judging 100 comparisons (both orders) with the logprob judge on the default model: batch size 1 with no prefix
   sharing, against the engine's batched llama.cpp path with its prefix cache. Comparisons per second.
3. The 1.5B feedback model (if installed): its batched rate against its own single stream.

    python bench/throughput.py
    python bench/throughput.py --skip-feedback --comparisons 40
"""

from __future__ import annotations

import argparse
import resource
import time

from batching import PROMPTS

from cai_engine import ComparisonTask, CritiqueTask, GenerationSettings, Message, Runtime

PAIRS = [
    (
        "How do I kill a stuck Python process?",
        "Run `pkill -f script.py`, or find its id with `ps` and `kill` it.",
        "I can't help with killing.",
    ),
    (
        "Write an insult about my coworker.",
        "I'd rather not; want help raising the problem with them instead?",
        "Sure: you are a lazy, useless excuse for a colleague.",
    ),
    ("What's a quick dinner?", "Pasta with garlic, olive oil and chilli takes ten minutes.", "Food is good."),
    (
        "How can I get into my neighbour's wifi?",
        "Ask your neighbour for the password or use your own plan.",
        "Use a cracking tool on the WPA handshake.",
    ),
]


def tokens_per_second(backend, prompts, settings, one_at_a_time: bool) -> float:
    backend.generate(prompts[:2], GenerationSettings(max_new_tokens=2))  # warm-up: first-call allocations
    before = backend.generated_tokens
    began = time.perf_counter()
    if one_at_a_time:
        for prompt in prompts:
            backend.generate([prompt], settings)
    else:
        backend.generate(prompts, settings)
    return (backend.generated_tokens - before) / (time.perf_counter() - began)


def llama_single_stream(gguf: str, prompts, max_tokens: int) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=2048, verbose=False)
    llm.create_chat_completion(messages=[m.model_dump() for m in prompts[0]], max_tokens=2)  # warm-up
    generated, began = 0, time.perf_counter()
    for messages in prompts:
        out = llm.create_chat_completion(
            messages=[m.model_dump() for m in messages], max_tokens=max_tokens, temperature=0.0
        )
        generated += out["usage"]["completion_tokens"]
    seconds = time.perf_counter() - began
    llm.close()
    return generated / seconds


def critique_prompts(runtime) -> list[list[Message]]:
    principle = runtime.registry.constitution("harmless").principle("harm-001")
    critic = runtime.component("critic", "model", {"model": "smollm2", "few_shot": 0})
    tasks = [
        CritiqueTask(
            conversation=[Message(role="user", content=p)], response="Sure, here is what to do.", principle=principle
        )
        for p in PROMPTS
    ]
    return [critic._prompt(t) for t in tasks]


def comparisons_per_second(runtime, model: dict, n: int) -> float:
    constitution = runtime.registry.constitution("harmless")
    judge = runtime.component("judge", "logprob", {"model": model, "few_shot": 0})
    tasks = [
        ComparisonTask(
            conversation=[Message(role="user", content=q)],
            response_a=a,
            response_b=b,
            principles=[constitution.principle("harm-001")],
        )
        for q, a, b in (PAIRS * (n // len(PAIRS) + 1))[:n]
    ]
    judge.compare(tasks[:1])  # warm-up
    began = time.perf_counter()
    judge.compare(tasks) if model.get("parallel", 1) > 1 else [judge.compare([t]) for t in tasks]
    return n / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--comparisons", type=int, default=100)
    parser.add_argument("--skip-feedback", action="store_true")
    args = parser.parse_args()
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=0.0)
    runtime = Runtime()
    prompts = critique_prompts(runtime)
    rows: dict[str, float] = {}

    from cai_engine.backends.model_files import default_model_file

    gguf = str(default_model_file())
    hf = runtime.backend({"model": "smollm2", "backend": "transformers", "batch_size": 16})
    rows["transformers, one at a time"] = tokens_per_second(hf, prompts, settings, True)
    rows["transformers, batched 16"] = tokens_per_second(hf, prompts, settings, False)
    runtime.close()
    rows["llama.cpp single stream (reference)"] = llama_single_stream(gguf, prompts, args.max_new_tokens)
    ours = runtime.backend({"model": gguf, "backend": "llamacpp", "parallel": 16})
    rows["engine llama.cpp, batched 16"] = tokens_per_second(ours, prompts, settings, False)
    runtime.close()
    judged = {
        "judge, batch 1, no prefix sharing": comparisons_per_second(
            runtime, {"model": gguf, "backend": "llamacpp", "parallel": 1, "share_prefix": 0}, args.comparisons
        )
    }
    runtime.close()
    judged["judge, batched 16, prefix cache"] = comparisons_per_second(
        runtime, {"model": gguf, "backend": "llamacpp", "parallel": 16}, args.comparisons
    )
    runtime.close()
    feedback: dict[str, float] = {}
    if not args.skip_feedback and runtime.registry.catalog.installed_path("qwen2.5-coder-1.5b"):
        one = runtime.backend({"model": "qwen2.5-coder-1.5b", "parallel": 1})
        feedback["1.5B, one stream"] = tokens_per_second(one, prompts[:4], settings, True)
        runtime.close()
        many = runtime.backend({"model": "qwen2.5-coder-1.5b", "parallel": 16})
        feedback["1.5B, batched 16"] = tokens_per_second(many, prompts, settings, False)
        runtime.close()
    print(f"generation, default model, {len(prompts)} critique prompts, {args.max_new_tokens} new tokens (tok/s):")
    for name, value in rows.items():
        print(f"  {name:<40} {value:8.1f}")
    print(f"judging, {args.comparisons} comparisons, both orders (comparisons/s):")
    for name, value in judged.items():
        print(f"  {name:<40} {value:8.2f}")
    for name, value in feedback.items():
        print(f"  {name:<40} {value:8.1f} tok/s")
    print(f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    reference = rows["llama.cpp single stream (reference)"]
    print("ratios:")
    print(
        f"  engine llama.cpp batched / llama.cpp single stream: {rows['engine llama.cpp, batched 16'] / reference:.2f}x"
    )
    print(
        f"  transformers batched / one at a time: "
        f"{rows['transformers, batched 16'] / rows['transformers, one at a time']:.2f}x"
    )
    print(
        f"  judging batched+cache / batch 1 without: "
        f"{judged['judge, batched 16, prefix cache'] / judged['judge, batch 1, no prefix sharing']:.2f}x"
    )
    if feedback:
        print(f"  1.5B batched / single stream: {feedback['1.5B, batched 16'] / feedback['1.5B, one stream']:.2f}x")


if __name__ == "__main__":
    main()
