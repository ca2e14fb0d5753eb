"""SpindleKV decode speed against the full cache, measured in one run (and a profile).

    python bench/spindle_decode.py                                  # SmolLM2, 4k and 8k, 20 % KV
    python bench/spindle_decode.py --lengths 4096 --variants codebook materialize union
    python bench/spindle_decode.py --lengths 4096 --profile codebook   # torch.profiler top ops

For each context length the prompt is real text (LongBench multi_news) cut to that length;
the full cache and each SpindleKV variant decode ``--decode-tokens`` greedy tokens (always
to the end), best of ``--repeats`` per-token decode time; ``vs full`` = variant ÷ full in
this run. Variants: ``codebook`` (the default: head repeat, attention over the codebooks),
``materialize`` (head repeat, every token decoded each step: the plain reading), ``union``
(KV heads only, codebook attention). ``--profile VARIANT`` prints the top operators of that
variant's decode steps (prefill excluded) from ``torch.profiler`` instead of the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cache_costs import prompt_ids  # noqa: E402
from bench.common import load  # noqa: E402
from harness.generation import greedy_generate  # noqa: E402
from harness.provenance import device_description  # noqa: E402

VARIANTS = {
    "codebook": {},
    "materialize": {"decode_attention": "materialize"},
    "union": {"gqa": "union"},
}


def method(variant: str | None, ratio: float):
    if variant is None:
        return []
    return [load("method", "spindlekv", ratio=ratio, **VARIANTS[variant])]


def decode_time(model, ids, variant, ratio, tokens: int, repeats: int) -> dict:
    best = None
    for _ in range(repeats):
        run = greedy_generate(
            model, ids, max_new_tokens=tokens, cache_methods=method(variant, ratio)
        )
        per_token = run.decode_s / max(run.decode_steps, 1)
        if best is None or per_token < best["decode_s"]:
            best = {"decode_s": per_token, "kv_bytes": run.kv_bytes_prefill, "tokens": run.tokens}
    return best


def profile(model, ids, variant: str, ratio: float, tokens: int) -> None:
    """Top operators of the decode steps: prefill and compression run before profiling."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from harness.generation import cache_methods_applied, new_cache

    methods = method(variant, ratio)
    cache = new_cache(model)
    with torch.inference_mode(), cache_methods_applied(model, methods):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = logits.logits[0, -1].argmax().view(1, 1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for step in range(tokens):
                with record_function("decode_step"):
                    out = model(
                        input_ids=token,
                        position_ids=torch.tensor([[ids.shape[1] + step]]),
                        past_key_values=cache,
                        use_cache=True,
                    )
                token = out.logits[0, -1].argmax().view(1, 1)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--variants", nargs="+", default=["codebook"], choices=list(VARIANTS))
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", choices=[*VARIANTS, "full"])
    args = parser.parse_args()

    model, tokenizer = load("model", args.model).load()
    greedy_generate(model, prompt_ids(tokenizer, 256), max_new_tokens=4)  # warm-up
    if args.profile:
        variant = None if args.profile == "full" else args.profile
        for length in args.lengths:
            print(f"\n## {args.profile}, context {length}")
            profile(model, prompt_ids(tokenizer, length), variant, args.ratio, args.decode_tokens)
        return
    rows = []
    for length in args.lengths:
        ids = prompt_ids(tokenizer, length)
        full = decode_time(model, ids, None, args.ratio, args.decode_tokens, args.repeats)
        rows.append({"context": length, "method": "full", "KV MB": full["kv_bytes"] / 2**20,
                     "decode ms/tok": full["decode_s"] * 1000, "vs full": 1.0})  # fmt: skip
        for variant in args.variants:
            got = decode_time(model, ids, variant, args.ratio, args.decode_tokens, args.repeats)
            rows.append(
                {
                    "context": length,
                    "method": f"spindlekv ({variant})",
                    "KV MB": got["kv_bytes"] / 2**20,
                    "decode ms/tok": got["decode_s"] * 1000,
                    "vs full": got["decode_s"] / full["decode_s"],
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
