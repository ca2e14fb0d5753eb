"""Operator launches per decode step, per cache method, against the full cache in the same run.

    python bench/gpu/op_counts.py --out "$OUT"                         # on a GPU: CUDA kernels
    python bench/gpu/op_counts.py --dry-run --out /tmp/ops             # tiny shapes on the CPU
    python bench/gpu/op_counts.py --cpu --context 128 --steps 3        # SmolLM2 shapes, CPU

Each method runs kvbench's request path (``bench.common.generate``) twice under
``torch.profiler`` after a warm-up request: once with 2 new tokens and once with ``2 + steps``.
The difference of the two counts, divided by ``steps``, is what one decode step launches
(prefill, session setup and the first token cancel out). On CUDA a launch is a CUDA kernel
event; on the CPU it is an ``aten::`` operator call (nested calls included). ``ops vs full`` =
method / full cache. ``top extra ops`` names the operators a method calls per step more often
than the full cache does. Writes op_counts.md and op_counts.csv under ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import warnings
from pathlib import Path

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import generate  # noqa: E402
from bench.gpu.speed import LLAMA3_8B, TINY, prompt  # noqa: E402
from harness.api import build  # noqa: E402
from harness.models import ModelSpec  # noqa: E402

METHODS = ("full", "streamingllm", "knorm", "snapkv", "pyramidkv", "h2o", "spindlekv")
SMOLLM2_135M = dict(
    LLAMA3_8B, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, num_hidden_layers=30, rope_theta=100000.0,
    max_position_embeddings=8192, tie_word_embeddings=True, vocab_size=1024,
)  # fmt: skip


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (CI)")
    parser.add_argument("--cpu", action="store_true", help="SmolLM2-135M shapes on the CPU")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/gpu/out"))
    parser.add_argument("--context", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--layers", type=int, default=4, help="layers of the Llama-3-8B shapes")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1: raise it")
    if args.context is None:
        args.context = 64 if args.dry_run else 128 if args.cpu else 8192
    return args


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    on_cpu = args.dry_run or args.cpu
    if not on_cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible: run with --dry-run or --cpu")
    shapes = (
        dict(TINY, num_hidden_layers=2)
        if args.dry_run
        else SMOLLM2_135M
        if args.cpu
        else dict(LLAMA3_8B, num_hidden_layers=args.layers)
    )
    spec = ModelSpec(
        name="op_count_shapes", source="random", architecture=shapes,
        device="cpu" if on_cpu else "cuda", dtype="auto", attn_implementation="sdpa",
    )  # fmt: skip
    model, tokenizer = spec.load()
    model.generation_config.eos_token_id = []  # decode every step
    return model, tokenizer


def launches(model, tokenizer, name: str, ids: torch.Tensor, tokens: int, ratio: float):
    """Counter of launched kernels (CUDA) or aten operators (CPU) over one request."""
    method = None if name == "full" else build("method", name, ratio=ratio)
    cuda = next(model.parameters()).device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        generate(model, tokenizer, method, ids, tokens)
    counts = collections.Counter()
    for event in prof.events():
        if cuda and event.device_type == torch.autograd.DeviceType.CUDA:
            counts[event.name] += 1
        elif not cuda and event.name.startswith("aten::"):
            counts[event.name] += 1
    return counts


def per_step(model, tokenizer, name: str, ids: torch.Tensor, steps: int, ratio: float):
    """Launches of one decode step: (request with 2 + steps tokens - with 2) / steps."""
    generate(
        model, tokenizer, None if name == "full" else build("method", name, ratio=ratio), ids, 2
    )
    short = launches(model, tokenizer, name, ids, 2, ratio)
    long = launches(model, tokenizer, name, ids, 2 + steps, ratio)
    return {op: (long[op] - short[op]) / steps for op in long | short if long[op] != short[op]}


def table(steps: dict[str, dict[str, float]], unit: str) -> pd.DataFrame:
    full = steps["full"]
    rows = []
    for name, ops in steps.items():
        total = sum(ops.values())
        extra = {op: n - full.get(op, 0) for op, n in ops.items() if n > full.get(op, 0)}
        top = sorted(extra.items(), key=lambda item: -item[1])[:5]
        rows.append(
            {
                "method": name,
                "ops/step": round(total, 1),
                "ops vs full": round(total / max(sum(full.values()), 1e-9), 3),
                "unit": unit,
                "top extra ops": ", ".join(f"{op} +{n:g}" for op, n in top),
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = arguments()
    if args.dry_run or args.cpu:
        torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(args)
    cuda = next(model.parameters()).device.type == "cuda"
    ids = prompt(args.context, model.config.vocab_size)
    steps: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(["full", *args.methods]):
        try:
            steps[name] = per_step(model, tokenizer, name, ids, args.steps, args.ratio)
        except Exception as exc:  # noqa: BLE001 - a failing method is a result
            print(f"{name}: failed: {type(exc).__name__}: {exc}"[:200], flush=True)
        print(f"{name}: {sum(steps.get(name, {}).values()):.1f} ops/step", flush=True)
    frame = table(steps, "CUDA kernels" if cuda else "aten ops")
    frame.to_csv(out / "op_counts.csv", index=False)
    header = f"# Launches per decode step, context {args.context}, {args.steps} steps, {args.ratio:.0%} KV"
    command = f"- command: python bench/gpu/op_counts.py {' '.join(sys.argv[1:])}"
    markdown = "\n".join([header, "", command, "", frame.to_markdown(index=False), ""])
    (out / "op_counts.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
