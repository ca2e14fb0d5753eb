"""SpindleKV decode speed against the full cache, measured in one run (and a profile).

    python bench/spindle_decode.py                                  # SmolLM2, 4k and 8k, 20 % KV
    python bench/spindle_decode.py --lengths 4096 --variants fused codebook materialize union
    python bench/spindle_decode.py --lengths 4096 --profile fused   # torch.profiler top ops

For each context length the prompt is real text (LongBench multi_news) cut to that length.
Each method prefills once (SpindleKV compresses then: ``prefill s``, one measurement); its
cache is kept. Then, ``--repeats``
times, every method decodes ``--decode-tokens`` greedy tokens from a copy of its cache, the
methods taking turns (the order rotates each round), so that a change in the machine's load
falls on all of them; a method's figure is its fastest round (``median`` too), per token.
``vs full`` = method ÷ full cache, fastest rounds. Variants: ``fused`` (the default: head
repeat, attention over the codebooks by the C++ kernels), ``codebook`` (the same with PyTorch
operations), ``materialize`` (every token decoded each step: the
plain reading), ``union`` (one token set per KV head), ``fold8`` (new tokens join the
codebooks every 8 steps instead of every step). ``--profile VARIANT`` prints the top
operators of that variant's decode steps (prefill excluded) from ``torch.profiler`` instead.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cache_costs import prompt_ids  # noqa: E402
from bench.common import generate  # noqa: E402
from harness.api import build  # noqa: E402
from harness.kvcache import decode_attention, new_cache  # noqa: E402
from harness.measure import stored_kv_bytes  # noqa: E402
from harness.provenance import device_description  # noqa: E402
from methods.base import cache_kwarg  # noqa: E402

VARIANTS = {
    "fused": {},
    "codebook": {"decode_attention": "codebook"},
    "materialize": {"decode_attention": "materialize"},
    "union": {"gqa": "union"},
    "fold8": {"fold_every": 8},
}


def method_for(variant: str, ratio: float):
    if variant == "full":
        return build("method", "full")
    return build("method", "spindlekv", ratio=ratio, **VARIANTS[variant])


def codebook_sizes(method) -> dict[str, float]:
    """SpindleKV's mean slots (distinct tokens stored) and key / value entries per KV head
    over its compressed layers after prefill, from its stats (empty for the full cache)."""
    stats = method.last_stats() if hasattr(method, "last_stats") else None
    layers = (stats or {}).get("layers") or []
    if not layers:
        return {}

    def mean(field: str) -> float:
        return statistics.mean(statistics.mean(layer[field]) for layer in layers)

    return {
        "slots/KV head": mean("unique_tokens"),
        "key entries/KV head": mean("key_entries_per_head"),
        "value entries/KV head": mean("value_entries_per_head"),
    }


@torch.inference_mode()
def prefill(model, ids, method, reserve: int) -> tuple:
    """The cache after prefill (compressed by ``method``), the first generated token and the
    prefill's seconds (compression included; one measurement). The cache is the harness's
    (:func:`harness.kvcache.new_cache`, room for ``reserve`` more tokens)."""
    cache = new_cache(model, reserve=reserve)
    with method.applied(model):
        begin = time.perf_counter()
        logits = model(input_ids=ids, **cache_kwarg(model, cache), logits_to_keep=1)
        seconds = time.perf_counter() - begin
    return cache, logits.logits[0, -1].argmax().view(1, 1), seconds


@torch.inference_mode()
def decode(model, method, cache, token, start: int, steps: int) -> tuple[float, list[int]]:
    """Seconds per token of ``steps`` greedy steps from ``cache``, and the tokens; decoding
    as the harness's loop does (``decode_attention``: the full cache's steps pack each KV
    group's query heads; SpindleKV's codebook attention is left as it is)."""
    tokens = []
    with method.applied(model), decode_attention(model):
        begin = time.perf_counter()
        for step in range(steps):
            out = model(
                input_ids=token,
                position_ids=torch.tensor([[start + step]]),
                **cache_kwarg(model, cache),
            )
            token = out.logits[0, -1].argmax().view(1, 1)
            tokens.append(int(token))
        elapsed = time.perf_counter() - begin
    return elapsed / steps, tokens


def profile(model, ids, variant: str, ratio: float, steps: int) -> None:
    """Where the decode steps' time goes (prefill and compression run before profiling):
    torch.profiler's top operators, then cProfile's top functions, which also count the
    fused kernels (calls into the C++ extension, not operators torch.profiler sees)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    method = method_for(variant, ratio)
    cache, token, _ = prefill(model, ids, method, 2 * steps)
    start = ids.shape[1]
    decode(model, method, copy.deepcopy(cache), token, start, 2)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode(model, method, copy.deepcopy(cache), token, start, steps)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    profiler = cProfile.Profile()
    profiler.enable()
    per_token, _ = decode(model, method, cache, token, start, steps)
    profiler.disable()
    print(f"\ncProfile, {steps} decode steps, {per_token * 1000:.1f} ms/token under it")
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(15)
    stats.sort_stats("cumulative").print_stats("codebook", 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--variants", nargs="+", default=["fused"], choices=list(VARIANTS))
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", choices=[*VARIANTS, "full"])
    args = parser.parse_args()

    model, tokenizer = build("model", args.model).load()
    generate(model, tokenizer, None, prompt_ids(tokenizer, 256), 4)  # warm-up
    if args.profile:
        for length in args.lengths:
            print(f"\n## {args.profile}, context {length}")
            ids = prompt_ids(tokenizer, length)
            profile(model, ids, args.profile, args.ratio, args.decode_tokens)
        return
    rows = []
    names = ["full", *args.variants]
    for length in args.lengths:
        ids = prompt_ids(tokenizer, length)
        start = {name: (method_for(name, args.ratio),) for name in names}
        for name in names:
            start[name] += prefill(model, ids, start[name][0], args.decode_tokens)
        times: dict[str, list[float]] = {name: [] for name in names}
        tokens: dict[str, list[int]] = {}
        for round_ in range(args.repeats):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                method, cache, token, _ = start[name]
                cache = copy.deepcopy(cache)
                per_token, tokens[name] = decode(
                    model, method, cache, token, length, args.decode_tokens
                )
                times[name].append(per_token)
        for name in names:
            rows.append(
                {
                    "context": length,
                    "method": name if name == "full" else f"spindlekv ({name})",
                    "KV MB": stored_kv_bytes(start[name][1]) / 2**20,
                    "prefill s": start[name][3],
                    "decode ms/tok": min(times[name]) * 1000,
                    "median ms/tok": statistics.median(times[name]) * 1000,
                    "vs full": min(times[name]) / min(times["full"]),
                    "same tokens": tokens[name] == tokens["full"],
                    "same as codebook": tokens[name] == tokens.get("codebook", tokens[name]),
                    **codebook_sizes(start[name][0]),
                }
            )
            print(rows[-1], file=sys.stderr, flush=True)
    print(
        f"\nmodel={args.model} ratio={args.ratio} decode_tokens={args.decode_tokens} "
        f"repeats={args.repeats} device={device_description(model.device)} "
        f"threads={torch.get_num_threads()}"
    )
    print(pd.DataFrame(rows).round(3).to_markdown(index=False))


if __name__ == "__main__":
    main()
