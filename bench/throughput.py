"""Throughput on this machine, every path on the same work, in one run; the ratios are printed last.

Each figure is measured in a fresh process (torch's and llama.cpp's OpenMP thread pools slow each other down when
they share one), after one warm-up call (first-call allocations are not throughput); the fast paths are timed
``--repeats`` times and the median is reported (runs on this machine vary by about 10%):

1. SL-CAI critique generation on the default model (16 critique prompts, 64 new tokens, greedy, prefill included):
   transformers one at a time, transformers batched (with oneDNN-packed weights, and without), llama.cpp's own
   single chat-completion stream on the same GGUF (``llama_cpp.Llama``, the reference), and the engine's llama.cpp
   backend batched (its defaults: the Q4_1 file's F16 copy, flash attention, shared prefixes), also on the file's
   own Q4_1 weights.
2. Judging 100 distinct comparisons (both orders; the labelled judge pairs, then guard cases' answers paired so that
   no two comparisons share a conversation and first answer) with the logprob judge
   on the default model: batch size 1 without prefix sharing, against batched with the prefix caches; with no worked
   example, and at the judge's default of one worked example before each comparison (``few_shot: 1``).
3. The 1.5B feedback model (if installed): llama.cpp's own single stream against the engine's batched backend.
4. The guard with model critics on the default model, every runtime principle of the harmless constitution, over the
   labelled guard cases: one response per call (p50, p95) and 32 per call (seconds per response), for the
   per-principle verdicts (screen 'each') and the one combined verdict (screen 'combined'), then 'each' again with
   the backend's unified KV cache (``kv_cache: unified``).

    python bench/throughput.py
    python bench/throughput.py --skip-feedback --comparisons 40 --out throughput.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).parent
PAIRS = HERE.parent / "cai_engine" / "data" / "prompts" / "judge-pairs.jsonl"
CASES = HERE / "data" / "guard-cases.jsonl"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def critique_prompts(runtime, n: int):
    from batching import PROMPTS

    from cai_engine import CritiqueTask, Message

    principle = runtime.registry.constitution("harmless").principle("harm-001")
    critic = runtime.component("critic", "model", {"model": "smollm2", "few_shot": 0})
    replies = ["Sure, here is what to do.", "Here are the steps you asked for."]
    tasks = [
        CritiqueTask(conversation=[Message(role="user", content=p)], response=replies[i // 16 % 2], principle=principle)
        for i, p in enumerate((PROMPTS * (n // len(PROMPTS) + 1))[:n])
    ]
    return [critic._prompt(t) for t in tasks]


def generation(path: str, n: int, max_new_tokens: int, repeats: int) -> dict:
    """Generated tokens per second for one path on ``n`` critique prompts: the median of ``repeats`` timed calls
    (one for the slow one-at-a-time path)."""
    from cai_engine import GenerationSettings, Runtime
    from cai_engine.models.files import default_model_file

    runtime = Runtime()
    prompts = critique_prompts(runtime, n)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    gguf = str(default_model_file())
    if path.startswith("llama.cpp single"):
        model = gguf if "default" in path else _catalog_path(runtime)
        return _llama_single_stream(model, prompts, max_new_tokens, repeats)
    refs = {
        "transformers, one at a time": {"model": "smollm2", "backend": "transformers", "batch_size": 1},
        "transformers, batched": {"model": "smollm2", "backend": "transformers", "batch_size": n},
        "transformers, batched, stock weights": {
            "model": "smollm2",
            "backend": "transformers",
            "batch_size": n,
            "packed_weights": False,
        },
        "engine llama.cpp, batched": {"model": gguf, "backend": "llamacpp", "parallel": n},
        "engine llama.cpp, batched, Q4_1 weights": {
            "model": gguf,
            "backend": "llamacpp",
            "parallel": n,
            "weights": "original",
        },
        "1.5B engine llama.cpp, batched": {"model": "qwen2.5-coder-1.5b", "parallel": n},
    }
    backend = runtime.backend(refs[path])
    backend.generate(prompts[-2:], GenerationSettings(max_new_tokens=2))  # warm-up
    runs = []
    for _ in range(1 if "one at a time" in path else repeats):
        before = backend.generated_tokens
        began = time.perf_counter()
        if "one at a time" in path:
            for prompt in prompts:
                backend.generate([prompt], settings)
        else:
            backend.generate(prompts, settings)
        runs.append((backend.generated_tokens - before, time.perf_counter() - began))
    return _median_run(runs)


def _median_run(runs: list[tuple[int, float]]) -> dict:
    """The run with the median rate, of (tokens, seconds) runs; every rate is kept."""
    rates = sorted(tokens / seconds for tokens, seconds in runs)
    tokens, seconds = sorted(runs, key=lambda r: r[0] / r[1])[len(runs) // 2]
    return {"tok_s": tokens / seconds, "tokens": tokens, "seconds": seconds, "rates": rates, "peak_mb": _peak_mb()}


def _catalog_path(runtime) -> str:
    return str(runtime.registry.catalog.path("qwen2.5-coder-1.5b"))


def _llama_single_stream(gguf: str, prompts, max_tokens: int, repeats: int) -> dict:
    import os

    from llama_cpp import Llama

    from cai_engine.default_plugins.backends.llama_cpp import model_params, repack_enabled

    # opened as the engine opens it (weight repacking off on CPUs with AMX), so the two run the same kernels
    with model_params(repack=repack_enabled("auto")):
        llm = Llama(model_path=gguf, n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    llm.create_chat_completion(messages=[m.model_dump() for m in prompts[-1]], max_tokens=2)  # warm-up
    runs = []
    for _ in range(repeats):
        generated, began = 0, time.perf_counter()
        for messages in prompts:
            out = llm.create_chat_completion(
                messages=[m.model_dump() for m in messages], max_tokens=max_tokens, temperature=0.0
            )
            generated += out["usage"]["completion_tokens"]
        runs.append((generated, time.perf_counter() - began))
    llm.close()
    return _median_run(runs)


def comparisons(n: int):
    from cai_engine import ComparisonTask, Message, Runtime

    registry = Runtime().registry
    constitution = registry.constitution("harmless")
    known = {p.id: p for name in registry.constitution_names() for p in registry.constitution(name).principles}
    tasks = []
    for pair in _rows(PAIRS):
        principle = known.get(pair["principle"])
        tasks.append(
            ComparisonTask(
                conversation=[Message(role="user", content=pair["prompt"])],
                response_a=pair["better"],
                response_b=pair["worse"],
                principles=[principle or constitution.principle("harm-001")],
                examples=constitution.comparison_examples,  # as phase 2 and the evaluation pass them
            )
        )
    # each guard case's answer against the next case's, then a few cases again with two other answers: no two
    # comparisons share a conversation and a first answer (which a prefix cache would reuse)
    cases = _rows(CASES)
    triples = [(i, i, i + 1) for i in range(len(cases))] + [(i, i + 2, i + 3) for i in range(len(cases))]
    for conversation, first, second in triples:
        tasks.append(
            ComparisonTask(
                conversation=[Message(role="user", content=cases[conversation]["prompt"])],
                response_a=cases[first % len(cases)]["response"],
                response_b=cases[second % len(cases)]["response"],
                principles=[constitution.principle("harm-001")],
                examples=constitution.comparison_examples,
            )
        )
    return tasks[:n]


def judging(path: str, n: int, repeats: int, few_shot: int = 0) -> dict:
    """Comparisons per second for one judging path on ``n`` distinct comparisons, ``few_shot`` worked examples before
    each (the median of ``repeats`` timed calls for the batched path; the batch-1 paths, minutes each, once)."""
    from cai_engine import Runtime
    from cai_engine.models.files import default_model_file

    runtime = Runtime()
    tasks = comparisons(n + 1)
    warm, tasks = tasks[-1:], tasks[:-1]
    model = {"model": str(default_model_file()), "backend": "llamacpp"}
    if path == "judge, batch 1, no prefix sharing":
        model.update(parallel=1, share_prefix=0)
    elif path == "judge, batch 1, no prefix sharing, Q4_1 weights":
        model.update(parallel=1, share_prefix=0, weights="original")
    else:
        model.update(parallel=16)
    judge = runtime.component("judge", "logprob", {"model": model, "few_shot": few_shot})
    judge.compare(warm)
    runs = []
    for _ in range(1 if model["parallel"] == 1 else repeats):
        began = time.perf_counter()
        if model["parallel"] == 1:
            for task in tasks:
                judge.compare([task])
        else:
            judge.compare(tasks)
        runs.append((len(tasks), time.perf_counter() - began))
    row = _median_run(runs)
    backend = judge.backend
    return {
        "pairs_s": row.pop("tok_s"),
        **{k: v for k, v in row.items() if k != "tokens"},
        "prompt_tokens_decoded": backend.prompt_tokens,
        "prompt_tokens_reused": backend.shared_prefix_tokens,
    }


def guarding(screen: str, single: int, batch: int, kv_cache: str = "per_sequence") -> dict:
    """The guard (flag mode) with every runtime principle, on the default model through llama.cpp."""
    from cai_engine import Runtime
    from cai_engine.guard.engine import Engine
    from cai_engine.guard.policy import Policy

    policy = Policy.model_validate(
        {
            "name": "guard-speed",
            "version": "1",
            "constitutions": ["harmless"],
            "model": {"model": "smollm2", "backend": "llamacpp", "kv_cache": kv_cache},
            "critic": {"name": "model", "options": {"verdict_only": True, "few_shot": 0}},
            "guard": {"action": "flag", "model_critics": True, "screen": screen},
        }
    )
    engine = Engine(policy, runtime=Runtime())
    cases = _rows(CASES)
    items = [([{"role": "user", "content": c["prompt"]}], c["response"]) for c in cases]
    engine.guard_batch(items[-1:])  # warm-up (loads the model)
    latencies = []
    for item in items[:single]:
        began = time.perf_counter()
        engine.guard_batch([item])
        latencies.append(time.perf_counter() - began)
    began = time.perf_counter()
    results = engine.guard_batch(items[:batch])
    per_response = (time.perf_counter() - began) / batch
    quantiles = statistics.quantiles(latencies, n=20)
    return {
        "principles": len(engine.runtime_principles),
        "p50_s": statistics.median(latencies),
        "p95_s": quantiles[18],
        "batched_s_per_response": per_response,
        "flagged": sum(bool(r.violations) for r in results),
        "peak_mb": _peak_mb(),
    }


def machine() -> dict:
    """What the figures were measured on: they move with the CPU's vector units (llama.cpp is built for the CPU
    it is compiled on)."""
    import os
    import platform
    from importlib.metadata import version

    flags: set[str] = set()
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "vector units": " ".join(f for f in wanted if f in flags) or "unknown",
        "llama-cpp-python": version("llama-cpp-python"),
        "torch": version("torch"),
    }


def isolated(function, *args):
    """Run ``function(*args)`` in a fresh process and return its result."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_path) as pool:
        return pool.submit(function, *args).result()


def _path() -> None:
    sys.path.insert(0, str(HERE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16, help="Critique prompts generated from (default 16).")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--comparisons", type=int, default=100)
    parser.add_argument("--guard-single", type=int, default=20, help="Responses guarded one per call (p50).")
    parser.add_argument("--guard-batch", type=int, default=32, help="Responses guarded in one call.")
    parser.add_argument(
        "--repeats", type=int, default=3, help="Timed calls per fast path; the median is reported (default 3)."
    )
    parser.add_argument("--skip-feedback", action="store_true", help="Leave out the 1.5B feedback model.")
    parser.add_argument("--out", help="Also write every figure here (JSON).")
    parser.add_argument(
        "--report", metavar="JSON", help="Measure nothing: print the summary, ratios and targets of a saved --out file."
    )
    args = parser.parse_args()
    if args.report:
        summarize(json.loads(Path(args.report).read_text(encoding="utf-8")))
        return
    from cai_engine import Runtime

    has_feedback = not args.skip_feedback and Runtime().registry.catalog.installed_path("qwen2.5-coder-1.5b")
    settings = {
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "comparisons": args.comparisons,
        "guard_single": args.guard_single,
        "guard_batch": args.guard_batch,
        "repeats": args.repeats,
    }
    report: dict[str, dict] = {
        "machine": machine(),
        "settings": settings,
        "generation": {},
        "judging": {},
        "feedback": {},
        "guard": {},
    }
    print("machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()), flush=True)
    for path in (
        "transformers, one at a time",
        "transformers, batched",
        "transformers, batched, stock weights",
        "llama.cpp single stream, default model",
        "engine llama.cpp, batched",
        "engine llama.cpp, batched, Q4_1 weights",
    ):
        report["generation"][path] = isolated(generation, path, args.prompts, args.max_new_tokens, args.repeats)
        print(f"  {path:<44} {report['generation'][path]['tok_s']:8.1f} tok/s", flush=True)
    for few_shot in (0, 1):
        for path in (
            "judge, batch 1, no prefix sharing, Q4_1 weights",
            "judge, batch 1, no prefix sharing",
            "judge, batched 16, prefix caches",
        ):
            name = path if not few_shot else f"{path}, 1 example"
            report["judging"][name] = isolated(judging, path, args.comparisons, args.repeats, few_shot)
            print(f"  {name:<56} {report['judging'][name]['pairs_s']:8.2f} comparisons/s", flush=True)
    if has_feedback:
        for path in ("llama.cpp single stream, 1.5B", "1.5B engine llama.cpp, batched"):
            report["feedback"][path] = isolated(generation, path, args.prompts, args.max_new_tokens, args.repeats)
            print(f"  {path:<44} {report['feedback'][path]['tok_s']:8.1f} tok/s", flush=True)
    for screen, kv_cache in (("each", "per_sequence"), ("combined", "per_sequence"), ("each", "unified")):
        name = screen if kv_cache == "per_sequence" else f"{screen}, unified KV cache"
        report["guard"][name] = isolated(guarding, screen, args.guard_single, args.guard_batch, kv_cache)
        row = report["guard"][name]
        print(
            f"  guard, screen {name!r} ({row['principles']} principles): p50 {row['p50_s']:.2f} s, "
            f"p95 {row['p95_s']:.2f} s, {args.guard_batch} per call {row['batched_s_per_response']:.2f} s each",
            flush=True,
        )
    print()
    summarize(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def summarize(report: dict) -> None:
    """Print every figure side by side, then the ratios, then the issue's targets (met or not); the last two are also
    stored in ``report``."""
    settings = report["settings"]
    print("machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()))
    gen, judged, fb = report["generation"], report["judging"], report["feedback"]
    print(
        f"generation, default model, {settings['prompts']} critique prompts, {settings['max_new_tokens']} new tokens "
        "(tok/s):"
    )
    for name, row in gen.items():
        print(f"  {name:<44} {row['tok_s']:8.1f}   peak {row['peak_mb']:6.0f} MB")
    print(f"judging, {settings['comparisons']} distinct comparisons, both orders (comparisons/s):")
    for name, row in judged.items():
        print(f"  {name:<56} {row['pairs_s']:8.2f}   peak {row['peak_mb']:6.0f} MB")
    for name, row in fb.items():
        print(f"  {name:<44} {row['tok_s']:8.1f} tok/s   peak {row['peak_mb']:6.0f} MB")
    per_call = settings["guard_batch"]
    for screen, row in report["guard"].items():
        print(
            f"  guard, screen {screen!r} ({row['principles']} principles): p50 {row['p50_s']:.2f} s, "
            f"p95 {row['p95_s']:.2f} s, {per_call} per call {row['batched_s_per_response']:.2f} s each"
        )
    reference = gen["llama.cpp single stream, default model"]["tok_s"]
    ratios = {
        "engine llama.cpp batched / llama.cpp single stream": gen["engine llama.cpp, batched"]["tok_s"] / reference,
        "engine llama.cpp batched, Q4_1 weights / llama.cpp single stream": (
            gen["engine llama.cpp, batched, Q4_1 weights"]["tok_s"] / reference
        ),
        "transformers batched / one at a time": (
            gen["transformers, batched"]["tok_s"] / gen["transformers, one at a time"]["tok_s"]
        ),
        "transformers batched / 52.6 tok/s (the issue's figure)": gen["transformers, batched"]["tok_s"] / 52.6,
        "transformers batched, oneDNN-packed / stock weights": (
            gen["transformers, batched"]["tok_s"] / gen["transformers, batched, stock weights"]["tok_s"]
        ),
    }
    for suffix, label in (("", "judging"), (", 1 example", "judging, 1 example (the default),")):
        batched = judged[f"judge, batched 16, prefix caches{suffix}"]["pairs_s"]
        ratios[f"{label} batched+caches / batch 1 without (same weights)"] = (
            batched / judged[f"judge, batch 1, no prefix sharing{suffix}"]["pairs_s"]
        )
        ratios[f"{label} batched+caches / batch 1 without, Q4_1 weights"] = (
            batched / judged[f"judge, batch 1, no prefix sharing, Q4_1 weights{suffix}"]["pairs_s"]
        )
    if fb:
        ratios["1.5B batched / its llama.cpp single stream"] = (
            fb["1.5B engine llama.cpp, batched"]["tok_s"] / fb["llama.cpp single stream, 1.5B"]["tok_s"]
        )
    report["ratios"] = ratios
    print("ratios:")
    for name, value in ratios.items():
        print(f"  {name:<84} {value:5.2f}x")
    fastest = max(gen["engine llama.cpp, batched"]["tok_s"], gen["transformers, batched"]["tok_s"])
    guard = report["guard"]
    targets = [
        ("default model, fastest batched path / llama.cpp single stream", fastest / reference, ">=", 3.0),
        (
            "transformers batched / 52.6 tok/s",
            ratios["transformers batched / 52.6 tok/s (the issue's figure)"],
            ">=",
            2,
        ),
        (
            "judging batched+caches / the faster batch 1 without (the default judge: 1 example)",
            min(
                ratios["judging, 1 example (the default), batched+caches / batch 1 without (same weights)"],
                ratios["judging, 1 example (the default), batched+caches / batch 1 without, Q4_1 weights"],
            ),
            ">=",
            5.0,
        ),
        ("guard 'each', p50 seconds per response", guard["each"]["p50_s"], "<=", 2.0),
        (
            f"guard 'each', seconds per response, {per_call} per call",
            guard["each"]["batched_s_per_response"],
            "<=",
            1.0,
        ),
        ("guard 'combined', p50 seconds per response", guard["combined"]["p50_s"], "<=", 2.0),
        (
            f"guard 'combined', seconds per response, {per_call} per call",
            guard["combined"]["batched_s_per_response"],
            "<=",
            1.0,
        ),
    ]
    if "each, unified KV cache" in guard:
        unified = guard["each, unified KV cache"]
        targets += [
            ("guard 'each', unified KV cache, p50 seconds per response", unified["p50_s"], "<=", 2.0),
            (
                f"guard 'each', unified KV cache, seconds per response, {per_call} per call",
                unified["batched_s_per_response"],
                "<=",
                1.0,
            ),
        ]
    if fb:
        targets.insert(
            3, ("1.5B batched / its single stream", ratios["1.5B batched / its llama.cpp single stream"], ">=", 2.0)
        )
    report["targets"] = {
        name: {"value": v, "target": f"{op} {t}", "met": v >= t if op == ">=" else v <= t} for name, v, op, t in targets
    }
    print("the issue's targets:")
    for name, row in report["targets"].items():
        print(f"  {name:<84} {row['value']:5.2f} ({row['target']}: {'met' if row['met'] else 'NOT met'})")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
