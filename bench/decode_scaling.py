"""Decode scaling: prefill time, decode time per token and peak memory against context length,
for the full cache and every cache method at one KV ratio, each next to its memory-bandwidth
bound measured in the same run.

    python bench/decode_scaling.py                      # SmolLM2, 1k-8k, 20% KV, 32 tokens
    python bench/decode_scaling.py --lengths 1024 2048 --methods full snapkv --ratio 0.1

The bound: decoding one token reads every weight once and every stored KV byte once, so it
takes at least (weight bytes + KV bytes) / bandwidth, where bandwidth is this machine's copy
bandwidth (read + write bytes per second of a large tensor copy, best of several, measured in
this run with the same threads). ``KV MB`` is what the cache holds at the end (the bound reads
it); ``alloc MB`` the memory its tensors occupy, room reserved for the tokens still to come
included (kvbench's cache appends in place: ``harness/kvcache.py``). ``vs bound`` = measured / bound (1.0 would be a perfectly
memory-bound kernel); ``bound vs full`` is what the KV reduction can buy at most;
``decode vs full`` is what it bought (method ÷ full, lower is faster); ``prefill vs full`` is
the method's prefill (its scoring and eviction included) ÷ the full cache's. Prompts are real text
(LongBench multi_news) cut to each length; greedy decoding always runs ``--decode-tokens``
steps; best of ``--repeats`` rounds, each round timing every method once (interleaved, so
load drift on a shared machine hits all methods alike). Peak memory is the request's
``peak_memory_bytes``: on the CPU the weights plus the KV cache's allocated bytes (the resident
set does not show the cache), on CUDA ``max_memory_allocated``, weights included.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cache_costs import prompt_ids  # noqa: E402
from bench.common import generate  # noqa: E402
from harness.api import build  # noqa: E402
from harness.provenance import device_description  # noqa: E402

METHODS = ("full", "streamingllm", "h2o", "snapkv", "pyramidkv", "spindlekv", "knorm")


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second (read + written) of copying a ``megabytes`` float32 tensor."""
    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    best = min(_timed(lambda: target.copy_(source)) for _ in range(repeats))
    return 2 * source.nbytes / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct parameters (tied embeddings counted once)."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values())


def record(best: dict, out) -> None:
    """Fold one timed generation into ``best`` (fastest decode and prefill, lowest peak)."""
    run = out.generation
    per_token = run.decode_s / max(run.decode_steps, 1)
    peak_bytes = out.measurement.peak_memory_bytes
    if not best or per_token < best["decode_s"]:
        best |= {
            "decode_s": per_token,
            "kv_bytes": run.kv_bytes_final,
            "kv_allocated": run.kv_allocated_bytes_final,
            "tokens": run.tokens,
        }
    best["prefill_s"] = min(best.get("prefill_s", float("inf")), run.prefill_s)
    best["peak_bytes"] = min(best.get("peak_bytes", peak_bytes), peak_bytes)


def measure_interleaved(model, tokenizer, ids, methods: dict, decode_tokens: int, repeats: int):
    """Best of ``repeats`` per method, timed in rounds that visit every method once, so a
    change of load on a shared machine hits every method alike instead of one of them."""
    best: dict[str, dict] = {name: {} for name in methods}
    for _ in range(repeats):
        for name, method in methods.items():
            record(best[name], generate(model, tokenizer, method, ids, decode_tokens))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    model, tokenizer = build("model", args.model).load()
    generate(model, tokenizer, None, prompt_ids(tokenizer, 256), 4)  # warm-up
    bandwidth = copy_bandwidth()
    weights = weight_bytes(model)
    rows = []
    for length in args.lengths:
        ids = prompt_ids(tokenizer, length)
        names = ["full"] + [m for m in args.methods if m != "full"]
        methods = {n: None if n == "full" else build("method", n, ratio=args.ratio) for n in names}
        results = measure_interleaved(
            model, tokenizer, ids, methods, args.decode_tokens, args.repeats
        )
        base = None
        for name in names:
            result = results[name]
            bound = (weights + result["kv_bytes"]) / bandwidth
            base = base or {**result, "bound": bound}
            if name not in args.methods:
                continue
            rows.append(
                {
                    "context": length,
                    "method": name,
                    "prefill s": round(result["prefill_s"], 2),
                    "prefill vs full": round(result["prefill_s"] / base["prefill_s"], 2),
                    "peak MB": round(result["peak_bytes"] / 2**20),
                    "KV MB": round(result["kv_bytes"] / 2**20, 1),
                    "alloc MB": round(result["kv_allocated"] / 2**20, 1),
                    "decode ms/tok": round(result["decode_s"] * 1000, 1),
                    "bound ms/tok": round(bound * 1000, 1),
                    "vs bound": round(result["decode_s"] / bound, 2),
                    "decode vs full": round(result["decode_s"] / base["decode_s"], 3),
                    "bound vs full": round(bound / base["bound"], 3),
                    "same tokens": result["tokens"] == base["tokens"],
                }
            )
            print(rows[-1], file=sys.stderr, flush=True)
    print(
        f"\nmodel={args.model} ratio={args.ratio} decode_tokens={args.decode_tokens} "
        f"repeats={args.repeats} weights={weights / 2**20:.0f} MB "
        f"copy bandwidth={bandwidth / 1e9:.1f} GB/s device={device_description(model.device)} "
        f"threads={torch.get_num_threads()}"
    )
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
