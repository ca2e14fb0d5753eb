"""What cache methods cost and buy: compression time as a share of prefill, and decode speed
with the compressed cache, against the full cache measured in the same run.

    python bench/cache_costs.py                                  # SmolLM2, 2k and 4k, ratio 0.2
    python bench/cache_costs.py --lengths 2048 4096 8192 --decode-tokens 32

For each context length, the prompt is real text (LongBench multi_news documents) cut to
exactly that many tokens. Prefill is timed with each method's hooks (eviction / codebook
included) and without any (the full cache); ``compress share`` = (prefill with the method -
full prefill) / full prefill. Decode is greedy for ``--decode-tokens`` tokens, always to the
end (no stop), so every method decodes the same number of steps. Best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import generate  # noqa: E402
from harness.api import build  # noqa: E402
from harness.provenance import device_description  # noqa: E402

METHODS = ("full", "streamingllm", "h2o", "snapkv", "pyramidkv", "spindlekv")


def prompt_ids(tokenizer, length: int) -> torch.Tensor:
    text = ""
    with open(REPO / "data" / "longbench" / "multi_news.jsonl") as f:
        for line in f:
            text += json.loads(line)["context"] + "\n\n"
            ids = tokenizer(text).input_ids
            if len(ids) >= length:
                return torch.tensor([ids[:length]])
    raise ValueError(f"not enough text for {length} tokens")


def measure(model, tokenizer, ids, method, decode_tokens: int, repeats: int) -> dict:
    runs = [
        generate(model, tokenizer, method, ids, decode_tokens).generation for _ in range(repeats)
    ]
    return {
        "prefill_s": min(r.prefill_s for r in runs),
        "decode_s_per_token": min(r.decode_s / max(r.decode_steps, 1) for r in runs),
        "kv_bytes": runs[0].kv_bytes_prefill,
        "tokens": runs[0].tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    spec = build("model", args.model)
    model, tokenizer = spec.load()
    generate(model, tokenizer, None, prompt_ids(tokenizer, 256), 4)  # warm-up
    rows = []
    for length in args.lengths:
        ids = prompt_ids(tokenizer, length)
        base = measure(model, tokenizer, ids, None, args.decode_tokens, args.repeats)
        for name in args.methods:
            if name == "full":
                result = base
            else:
                method = build("method", name, ratio=args.ratio)
                result = measure(model, tokenizer, ids, method, args.decode_tokens, args.repeats)
            rows.append(
                {
                    "context": length,
                    "method": name,
                    "prefill ms": round(result["prefill_s"] * 1000),
                    "compress share": round(
                        (result["prefill_s"] - base["prefill_s"]) / base["prefill_s"], 3
                    ),
                    "KV MB": round(result["kv_bytes"] / 2**20, 2),
                    "KV ratio": round(result["kv_bytes"] / base["kv_bytes"], 3),
                    "decode ms/tok": round(result["decode_s_per_token"] * 1000, 1),
                    "decode tok/s": round(1 / result["decode_s_per_token"], 2),
                    "decode vs full": round(
                        base["decode_s_per_token"] / result["decode_s_per_token"], 3
                    ),
                    "same tokens as full": result["tokens"] == base["tokens"],
                }
            )
    print(
        f"\nmodel={args.model} ratio={args.ratio} decode_tokens={args.decode_tokens} "
        f"repeats={args.repeats} device={device_description(model.device)} "
        f"threads={torch.get_num_threads()}"
    )
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
