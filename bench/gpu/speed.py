"""The GPU speed and memory table: the full cache and every cache method at Llama-3-8B's attention
and MLP shapes, long contexts, 20 % of the KV cache, against the full cache and against the
ceilings of the same GPU measured in the same run.

    python bench/gpu/speed.py --out "$OUT"              # on a GPU (bench/gpu/run.sh calls it)
    python bench/gpu/speed.py --dry-run --out /tmp/gs   # tiny shapes on the CPU, seconds (CI)

Model: random weights (seeded, drawn on the CPU) with Llama-3-8B's shapes (hidden 4096, 32 query
heads, 8 KV heads, head_dim 128, MLP 14336, RoPE theta 500000) but ``--layers`` layers (4) and a
small vocabulary (1024), in bfloat16 (``model.dtype: auto``) with sdpa attention. Prompts are
seeded random token ids. Each (method, context) runs through kvbench's own request path
(``bench.common.generate`` = ``harness.session.apply`` + ``Session.generate``): greedy decoding of
``--decode-tokens`` tokens with EOS disabled, so every method decodes the same number of steps.
Prefill and decode times are kvbench's (the clock synchronises the GPU), peak memory is the
allocator's peak during the request (reset per request, weights included), KV bytes are the
bytes the cache holds after prefill. Best of ``--repeats`` (one when a run takes longer than
``--repeat-below-s``).

Ratios: ``vs full`` = method / full cache at the same context (lower is better);
``decode vs floor`` = measured / (weights + KV bytes) / copy bandwidth; ``prefill vs floor`` =
measured / max(FLOPs / matrix rate, bytes / bandwidth) of a full-cache prefill (bench/gpu/
ceilings.py). A (method, context) whose run is projected (from its smaller contexts) to take
longer than ``--cell-s`` or the time left of ``--budget-s`` is skipped, and an out-of-memory or
any other failure is caught: the table says which and why.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import generate, load  # noqa: E402
from bench.gpu import ceilings  # noqa: E402
from harness.models import ModelSpec  # noqa: E402
from harness.provenance import device_description  # noqa: E402

# cheapest first: when the time budget runs out at a long context, the costly ones are skipped
METHODS = ("full", "streamingllm", "knorm", "snapkv", "pyramidkv", "h2o", "spindlekv")
LLAMA3_8B = dict(
    model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=1024, rope_theta=500000.0,
    max_position_embeddings=262144, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=256, eos_token_id=257, pad_token_id=258,
)  # fmt: skip
TINY = dict(
    LLAMA3_8B, hidden_size=64, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=300, max_position_embeddings=4096,
)  # fmt: skip
MB = 2**20


@dataclass
class Plan:
    """What to run and the time it may take."""

    contexts: list[int]
    methods: list[str]
    ratio: float
    decode_tokens: int
    repeats: int
    repeat_below_s: float
    cell_s: float
    budget_s: float
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def projected_s(self, method: str, context: int) -> float | None:
        """A run's seconds at ``context``, from the method's runs at smaller contexts: the
        growth between its last two (an exponent in [1, 2]), else an exponent of 1.5 (prefill
        attention grows quadratically, the rest linearly; SpindleKV's codebook loop less)."""
        runs = self.history.get(method, [])
        if not runs:
            return None
        (c1, t1), exponent = runs[-1], 1.5
        if len(runs) >= 2:
            c0, t0 = runs[-2]
            exponent = min(
                2.0, max(1.0, math.log(max(t1, 1e-6) / max(t0, 1e-6)) / math.log(c1 / c0))
            )
        return t1 * (context / c1) ** exponent


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (CI)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/gpu/out"))
    parser.add_argument("--contexts", type=int, nargs="+")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--repeat-below-s", type=float, default=5.0)
    parser.add_argument("--cell-s", type=float, default=120.0, help="longest run allowed")
    parser.add_argument("--budget-s", type=float, default=180.0, help="for the whole table")
    args = parser.parse_args()
    if args.contexts is None:
        args.contexts = [64, 128] if args.dry_run else [8192, 32768, 131072]
    if args.dry_run:
        args.decode_tokens = min(args.decode_tokens, 4)
        args.repeats = 1
        torch.set_num_threads(1)  # tiny shapes: one thread is fastest (and kind to CI)
    return args


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, object, ModelSpec]:
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible: run with --dry-run (tiny shapes on the CPU)")
    shapes = dict(TINY if args.dry_run else LLAMA3_8B, num_hidden_layers=args.layers)
    spec = ModelSpec(
        name="llama3_8b_shapes" if not args.dry_run else "tiny_shapes",
        source="random",
        architecture=shapes,
        device="cpu" if args.dry_run else "cuda",
        dtype="auto",
        attn_implementation="sdpa",
    )
    model, tokenizer = spec.load()
    model.generation_config.eos_token_id = []  # decode every step, whatever the random model says
    return model, tokenizer, spec


def prompt(context: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(context)
    return torch.randint(0, vocab, (1, context), generator=generator, device="cpu")


def run_cell(model, tokenizer, name: str, ids: torch.Tensor, plan: Plan) -> dict:
    """Best of the repeats of one (method, context): times, peak memory, KV bytes, tokens."""
    method = None if name == "full" else load("method", name, ratio=plan.ratio)
    best: dict = {}
    for _ in range(plan.repeats):
        start = time.perf_counter()
        out = generate(model, tokenizer, method, ids, plan.decode_tokens)
        wall = time.perf_counter() - start
        gen, m = out.generation, out.measurement
        per_token = gen.decode_s / max(gen.decode_steps, 1)
        best = {
            "prefill_s": min(best.get("prefill_s", math.inf), gen.prefill_s),
            "decode_s": min(best.get("decode_s", math.inf), per_token),
            "peak_bytes": max(best.get("peak_bytes", 0), m.peak_memory_bytes),
            "kv_bytes": gen.kv_bytes_prefill,
            "kv_bytes_final": gen.kv_bytes_final,
            "kv_full_bytes": m.kv_full_bytes_prefill,
            "decode_steps": gen.decode_steps,
            "tokens": gen.tokens,
            "wall_s": min(best.get("wall_s", math.inf), wall),
            "repeats": best.get("repeats", 0) + 1,
        }
        del out
        if wall > plan.repeat_below_s:
            break
    return best


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(model, tokenizer, plan: Plan, clock_start: float, on_row) -> list[dict]:
    """Every (context, method) in order, full cache first; ``on_row(rows)`` after each."""
    device = next(model.parameters()).device
    rows = []
    for context in plan.contexts:
        ids = prompt(context, model.config.vocab_size)
        for name in ["full"] + [m for m in plan.methods if m != "full"]:
            row = {"context": context, "method": name}
            projected = plan.projected_s(name, context)
            left = plan.budget_s - (time.perf_counter() - clock_start)
            if name in plan.failed:
                row["status"] = f"skipped: {plan.failed[name]} at a smaller context"
            elif left <= 0:
                row["status"] = f"skipped: the table's {plan.budget_s:.0f} s budget is spent"
            elif projected is not None and projected > min(plan.cell_s, left):
                row["status"] = (
                    f"skipped: projected {projected:.0f} s > {min(plan.cell_s, left):.0f} s"
                )
            else:
                try:
                    row |= run_cell(model, tokenizer, name, ids, plan)
                    row["status"] = "ok"
                    plan.history.setdefault(name, []).append((context, row["wall_s"]))
                except torch.OutOfMemoryError:
                    row["status"] = plan.failed[name] = "out of memory"
                except Exception as exc:  # noqa: BLE001 - a failing method is a result
                    row["status"] = plan.failed[name] = f"failed: {type(exc).__name__}: {exc}"[:200]
                free(device)
            rows.append(row)
            took = f"{row['wall_s']:.2f} s" if "wall_s" in row else ""
            print(f"{context:>7} {name:<13} {row['status']} {took}", flush=True)
            on_row(rows)
    return rows


def table(rows: list[dict], weights: int, config, ceiling: dict) -> pd.DataFrame:
    """The rows with their ratios to the full cache and to the floors."""
    full = {r["context"]: r for r in rows if r["method"] == "full" and r["status"] == "ok"}
    out = []
    for r in rows:
        base = full.get(r["context"])
        row = {"context": r["context"], "method": r["method"], "status": r["status"]}
        if r["status"] == "ok":
            flops = ceilings.prefill_flops(config, r["context"])
            prefill_floor = ceilings.prefill_floor_s(
                flops, weights + r["kv_full_bytes"], ceiling["matmul"], ceiling["bandwidth"]
            )
            decode_floor = ceilings.decode_floor_s(
                weights, r["kv_bytes_final"], ceiling["bandwidth"]
            )
            row |= {
                "prefill ms": r["prefill_s"] * 1e3,
                "prefill vs full": r["prefill_s"] / base["prefill_s"] if base else None,
                "prefill vs floor": r["prefill_s"] / prefill_floor,
                "decode ms/tok": r["decode_s"] * 1e3,
                "decode vs full": r["decode_s"] / base["decode_s"] if base else None,
                "decode vs floor": r["decode_s"] / decode_floor,
                "decode floor ms": decode_floor * 1e3,
                "peak MB": r["peak_bytes"] / MB,
                "peak vs full": r["peak_bytes"] / base["peak_bytes"] if base else None,
                "KV MB": r["kv_bytes"] / MB,
                "KV vs full": r["kv_bytes"] / r["kv_full_bytes"],
                "same tokens": r["tokens"] == base["tokens"] if base else None,
                "repeats": r["repeats"],
            }
        out.append(row)
    return pd.DataFrame(out)


def verdicts(frame: pd.DataFrame) -> list[str]:
    """The lines a reader needs: which methods failed or were skipped, which are slower than
    the full cache."""
    lines = []
    ok = frame[frame["status"] == "ok"]
    if "decode vs full" in ok:
        slow = ok[(ok["method"] != "full") & (ok["decode vs full"] > 1.0)]
        for _, r in slow.iterrows():
            lines.append(
                f"- slower than the full cache at decode: {r['method']} at {r['context']} tokens "
                f"({r['decode vs full']:.2f}x)"
            )
        slow = ok[(ok["method"] != "full") & (ok["prefill vs full"] > 1.0)]
        for _, r in slow.iterrows():
            lines.append(
                f"- slower prefill (compression included): {r['method']} at {r['context']} "
                f"tokens ({r['prefill vs full']:.2f}x)"
            )
    for _, r in frame[frame["status"] != "ok"].iterrows():
        lines.append(f"- {r['method']} at {r['context']} tokens: {r['status']}")
    return lines or ["- every method ran at every context and none was slower than the full cache"]


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames
    args = arguments()
    clock_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, spec = load_model(args)
    device = next(model.parameters()).device
    plan = Plan(
        contexts=sorted(args.contexts),
        methods=list(args.methods),
        ratio=args.ratio,
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        repeat_below_s=args.repeat_below_s,
        cell_s=args.cell_s,
        budget_s=args.budget_s,
    )
    ceiling = {
        "bandwidth": ceilings.copy_bandwidth(device, 32 if args.dry_run else 4096),
        "matmul": ceilings.matmul_rate(
            device, 256 if args.dry_run else 8192, next(model.parameters()).dtype
        ),
    }
    weights = ceilings.weight_bytes(model)
    warm = prompt(min(plan.contexts[0], 1024), model.config.vocab_size)
    for name in dict.fromkeys(
        ["full", *plan.methods]
    ):  # kernels, hooks and allocator warmed per method
        method = None if name == "full" else load("method", name, ratio=plan.ratio)
        generate(model, tokenizer, method, warm, 2)
    free(device)
    import transformers

    header = [
        f"# GPU speed and memory, {plan.ratio:.0%} KV: {device_description(device)}",
        "",
        f"- model: random weights, Llama-3-8B shapes x {args.layers} layers"
        if not args.dry_run
        else "- model: DRY RUN, tiny random shapes on the CPU (not a measurement)",
        f"- dtype {spec.resolved_dtype} (model.dtype=auto), sdpa attention, weights "
        f"{weights / MB:.0f} MB, greedy decode of {plan.decode_tokens} tokens (EOS off), best "
        f"of up to {plan.repeats}",
        f"- ceilings measured in this run: copy bandwidth {ceiling['bandwidth'] / 1e9:.0f} GB/s "
        f"(read + write), {next(model.parameters()).dtype} matrix rate "
        f"{ceiling['matmul'] / 1e12:.1f} TFLOP/s",
        f"- torch {torch.__version__}, transformers {transformers.__version__}",
        f"- command: python bench/gpu/speed.py {' '.join(sys.argv[1:])}",
    ]

    def write(rows: list[dict]) -> str:
        frame = table(rows, weights, model.config, ceiling)
        took = f"- {len(rows)} rows in {time.perf_counter() - clock_start:.0f} s"
        lines = [*header, took, "", frame.to_markdown(index=False, floatfmt=".3g"), ""]
        markdown = "\n".join([*lines, "Named:", *verdicts(frame), ""])
        (out / "gpu_speed.md").write_text(markdown)
        frame.to_csv(out / "gpu_speed.csv", index=False)
        return markdown

    print(write(measure(model, tokenizer, plan, clock_start, write)))


if __name__ == "__main__":
    main()
