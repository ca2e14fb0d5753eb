"""The GPU speed and memory table: the full cache and every cache method at Llama-3-8B's attention
and MLP shapes, long contexts, 20 % of the KV cache, against the full cache and against the
ceilings of the same GPU measured in the same run.

    python bench/gpu/speed.py --out "$OUT"              # on a GPU (bench/gpu/run.sh calls it)
    python bench/gpu/speed.py --dry-run --out /tmp/gs   # tiny shapes on the CPU, seconds (CI)

Model: random weights (seeded, drawn on the CPU) with Llama-3-8B's shapes (hidden 4096, 32 query
heads, 8 KV heads, head_dim 128, MLP 14336, RoPE theta 500000) but ``--layers`` layers (4) and a
small vocabulary (1024), in bfloat16 (``model.dtype: auto``) with sdpa attention. Prompts are
seeded random token ids. Each (method, context) runs through kvbench's own request path
(``bench.common.generate`` = ``harness.session.open_session`` + ``Session.generate``): greedy decoding of
``--decode-tokens`` tokens with EOS disabled, so every method decodes the same number of steps.
Prefill and decode times are kvbench's (the clock synchronises the GPU), peak memory is the
allocator's peak during the request (reset per request, weights included), KV bytes are the
bytes the cache holds after prefill. Attention runs sdpa's kernel of ``--sdpa-backend``
(``model.sdpa_backend``, ``auto``: flash on the GPU, see harness/sdpa.py).

Workloads (the ``workload`` column): ``repeat``, one prompt per context, best of ``--repeats``
(one when a run takes longer than ``--repeat-below-s``); ``new_lengths``, 8 requests (``--new-lengths``; 2 in a dry run) whose
prompt lengths no other request had (just above the context, each method its own), as real
tasks bring: medians of their times and the mean wall time of a request (``request ms``), which
shows what a kernel that plans per input shape costs. Rows: the full cache, every cache method,
and ``transformers``: ``model.generate`` with the static cache (bench/gpu/baseline.py), the
baseline a user would otherwise reach for.

Decoding steps run as ``--decode-capture`` (``model.decode_capture``, harness/decode_graph.py)
plans for each method: ``auto`` captures them in a CUDA graph where the method allows (the
``decode`` column says ``graph``, or ``eager``: H2O and SpindleKV change the cache as they
decode); the ``full_eager`` row is the full cache decoding eagerly, what the capture buys. The
requests of a cell share their captured steps (as a run's requests do); the time a request
spent capturing a new shape is in ``capture ms``, left out of ``decode ms/tok``. The dry run
uses ``replay``, the CPU's stand-in for a CUDA graph.

Ratios: ``vs full`` = method / full cache at the same context (lower is better);
``decode vs floor`` = measured / (weights + KV bytes) / copy bandwidth; ``prefill vs floor`` =
measured / max(FLOPs / matrix rate, bytes / bandwidth) of a full-cache prefill (bench/gpu/
ceilings.py). A (method, workload, context) whose run is projected (from its smaller contexts)
to take longer than ``--cell-s`` or the time left of ``--budget-s`` is skipped, and an
out-of-memory or any other failure, the warm-up's included, is caught: the method's rows say
which and why, and every other method still runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.gpu import ceilings  # noqa: E402
from bench.gpu.speed_cells import (  # noqa: E402
    BASELINE,
    EAGER_FULL,
    NEW_LENGTHS,
    WORKLOADS,
    Plan,
    decode_plans,
    prompt,
    request,
    run_cell,
)
from bench.gpu.speed_table import MB, table, verdicts, with_op_counts  # noqa: E402
from harness.decode_graph import CHOICES, decode_steps  # noqa: E402
from harness.models import ModelSpec  # noqa: E402
from harness.provenance import device_description  # noqa: E402

# cheapest first: when the time budget runs out at a long context, the costly ones are skipped;
# ``transformers`` is model.generate with the static cache (bench/gpu/baseline.py)
METHODS = (
    "full",
    "transformers",
    "full_eager",
    "streamingllm",
    "knorm",
    "snapkv",
    "pyramidkv",
    "h2o",
    "spindlekv",
)
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


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
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
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--new-lengths", type=int, default=NEW_LENGTHS, help="requests per cell")
    parser.add_argument("--sdpa-backend", default="auto", help="model.sdpa_backend")
    parser.add_argument(
        "--decode-capture", choices=CHOICES, help="model.decode_capture (auto; dry run: replay)"
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        help="model.prefill_chunk: prompt tokens per prefill pass (default 4096; dry run 32; "
        "0: one pass)",
    )
    args = parser.parse_args(argv)
    if args.contexts is None:
        args.contexts = [64, 128] if args.dry_run else [8192, 32768, 131072]
    if args.dry_run:
        args.decode_tokens = min(args.decode_tokens, 4)
        args.repeats = 1
        args.new_lengths = min(args.new_lengths, 2)
    if args.decode_capture is None:
        args.decode_capture = "replay" if args.dry_run else "auto"
    if args.prefill_chunk is None:
        args.prefill_chunk = 32 if args.dry_run else 4096
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
        sdpa_backend=args.sdpa_backend,
        decode_capture=args.decode_capture,
    )
    model, tokenizer = spec.load()
    model.generation_config.eos_token_id = []  # decode every step, whatever the random model says
    return model, tokenizer, spec


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(measure, device: torch.device) -> tuple[dict, str]:
    """(``measure()``'s row, ``ok``), or ({}, why it failed): one method's failure (out of
    memory included) is a result named in its row, never the end of the table."""
    try:
        return measure(), "ok"
    except torch.OutOfMemoryError:
        return {}, "out of memory"
    except Exception as exc:  # noqa: BLE001 - a failing method is a result
        return {}, f"failed: {type(exc).__name__}: {exc}"[:240]
    finally:
        free(device)


def warm_up(model, tokenizer, plan: Plan) -> None:
    """A short request per method (kernels, hooks, the allocator): a method that fails here
    is named in each of its rows (``plan.failed``), and the others run."""
    device = next(model.parameters()).device
    warm = prompt(min(plan.contexts[0], 1024), model.config.vocab_size)
    brief = dataclasses.replace(plan, decode_tokens=2)
    for name in dict.fromkeys(["full", *plan.methods]):
        try:
            with decode_steps(plan.decode.get(name)) as graphs:  # a failed capture shows here
                request(model, tokenizer, name, warm, brief, graphs)
        except Exception as exc:  # noqa: BLE001 - a failing method is a result
            plan.failed[name] = f"failed at warm-up: {type(exc).__name__}: {exc}"[:200]
            print(f"warm-up {name}: {plan.failed[name]}", flush=True)
        free(device)


def cell_status(plan: Plan, name: str, key: str, context: int, clock_start: float) -> str | None:
    """Why a cell is not run (None: run it)."""
    projected = plan.projected_s(key, context)
    left = plan.budget_s - (time.perf_counter() - clock_start)
    if name in plan.failed:
        why = plan.failed[name]
        return (
            why if why.startswith("failed at warm-up") else f"skipped: {why} at a smaller context"
        )
    if left <= 0:
        return f"skipped: the table's {plan.budget_s:.0f} s budget is spent"
    if projected is not None and projected > min(plan.cell_s, left):
        return f"skipped: projected {projected:.0f} s > {min(plan.cell_s, left):.0f} s"
    return None


def measure(model, tokenizer, plan: Plan, clock_start: float, on_row) -> list[dict]:
    """Every (context, workload, method) in order, full cache first; ``on_row(rows)`` after
    each."""
    device = next(model.parameters()).device
    rows = []
    for context in plan.contexts:
        for workload in plan.workloads:
            for name in ["full"] + [m for m in plan.methods if m != "full"]:
                row = {"context": context, "workload": workload, "method": name}
                key = f"{name}/{workload}"
                status = cell_status(plan, name, key, context, clock_start)
                if status is None:
                    cell, status = guarded(
                        partial(run_cell, model, tokenizer, name, workload, context, plan), device
                    )
                    row |= cell
                    if status == "ok":
                        plan.history.setdefault(key, []).append((context, row["wall_s"]))
                    else:
                        plan.failed[name] = status
                row["status"] = status
                rows.append(row)
                took = f"{row['wall_s']:.2f} s" if "wall_s" in row else ""
                print(f"{context:>7} {workload:<11} {name:<13} {status} {took}", flush=True)
                on_row(rows)
    return rows


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
        workloads=list(args.workloads),
        new_lengths=args.new_lengths,
        prefill_chunk=args.prefill_chunk or None,
    )
    ceiling = {
        "bandwidth": ceilings.copy_bandwidth(device, 32 if args.dry_run else 4096),
        "matmul": ceilings.matmul_rate(
            device, 256 if args.dry_run else 8192, next(model.parameters()).dtype
        ),
    }
    weights = ceilings.weight_bytes(model)
    plan.decode = decode_plans(spec, model.config, plan)
    warm_up(model, tokenizer, plan)
    import transformers

    header = [
        f"# GPU speed and memory, {plan.ratio:.0%} KV: {device_description(device)}",
        "",
        f"- model: random weights, Llama-3-8B shapes x {args.layers} layers"
        if not args.dry_run
        else "- model: DRY RUN, tiny random shapes on the CPU (not a measurement)",
        f"- dtype {spec.resolved_dtype} (model.dtype=auto), sdpa attention (kernel "
        f"{spec.resolved_sdpa_backend(model.config)}: model.sdpa_backend={spec.sdpa_backend}), "
        f"weights {weights / MB:.0f} MB, greedy decode of {plan.decode_tokens} tokens (EOS off)",
        f"- workloads: repeat = one prompt per context, best of up to {plan.repeats}; "
        f"new_lengths = {plan.new_lengths} requests per method of lengths no other request had, "
        "just above the context (medians; request ms is the mean wall time of one request)",
        f"- prefill in chunks of {plan.prefill_chunk or 'all the'} tokens (model.prefill_chunk: "
        "peak memory without the whole prompt's activations; cache methods keep what a one-pass "
        f"prefill keeps, so they hold the full KV until the last chunk); {BASELINE} in one pass",
        f"- {BASELINE} = model.generate with the static cache, not compiled (bench/gpu/baseline.py)",
        f"- decoding steps: model.decode_capture={spec.decode_capture} (the decode column; "
        f"{EAGER_FULL} = the full cache decoding eagerly); capture ms is out of decode ms/tok",
        f"- ceilings measured in this run: copy bandwidth {ceiling['bandwidth'] / 1e9:.0f} GB/s "
        f"(read + write), {next(model.parameters()).dtype} matrix rate "
        f"{ceiling['matmul'] / 1e12:.1f} TFLOP/s",
        f"- torch {torch.__version__}, transformers {transformers.__version__}",
        f"- command: python bench/gpu/speed.py {' '.join(sys.argv[1:])}",
    ]

    def write(rows: list[dict]) -> str:
        frame = with_op_counts(table(rows, weights, model.config, ceiling), out / "op_counts.csv")
        took = f"- {len(rows)} rows in {time.perf_counter() - clock_start:.0f} s"
        lines = [*header, took, "", frame.to_markdown(index=False, floatfmt=".3g"), ""]
        markdown = "\n".join([*lines, "Named:", *verdicts(frame), ""])
        (out / "gpu_speed.md").write_text(markdown)
        frame.to_csv(out / "gpu_speed.csv", index=False)
        return markdown

    print(write(measure(model, tokenizer, plan, clock_start, write)))


if __name__ == "__main__":
    main()
