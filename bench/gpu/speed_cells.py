"""One cell of bench/gpu/speed.py's table: a method's requests at one context and workload,
through kvbench's own request path (``bench.common.generate``), and the plan of the table.

A cell's requests share their captured decoding steps (``harness.decode_graph``: what a run's
requests share), freed after the cell; a request's time capturing a new shape is its
``capture_s``, which its ``decode_s`` (and so the decode time per token) leaves out.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import generate  # noqa: E402
from bench.gpu.baseline import generate_static  # noqa: E402
from harness.api import build  # noqa: E402
from harness.decode_graph import EAGER, DecodeGraphs, decode_steps, why_eager  # noqa: E402
from harness.models import ModelSpec  # noqa: E402
from methods.base import Method  # noqa: E402

BASELINE = "transformers"
EAGER_FULL = "full_eager"  # the full cache, decoding steps not captured
# repeat: one prompt per context, best of --repeats; new_lengths: NEW_LENGTHS requests of
# lengths no other request had (each method its own), as real tasks bring
WORKLOADS = ("repeat", "new_lengths")
NEW_LENGTHS = 8


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
    workloads: list[str] = field(default_factory=lambda: list(WORKLOADS))
    new_lengths: int = NEW_LENGTHS
    prefill_chunk: int | None = None
    decode: dict[str, str] = field(default_factory=dict)  # method -> decode plan
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def projected_s(self, method: str, context: int) -> float | None:
        """A run's seconds at ``context``, from the method's runs at smaller contexts: the
        growth between its last two (an exponent in [1, 2]), else an exponent of 1.5 (prefill
        attention grows quadratically, the rest linearly; SpindleKV's codebook loop less).
        ``method`` is a history key: a method, or ``method/workload``."""
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


def prompt(context: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(context)
    return torch.randint(0, vocab, (1, context), generator=generator, device="cpu")


def method_of(name: str, plan: Plan) -> Method:
    full = ("full", EAGER_FULL)
    return build("method", "full") if name in full else build("method", name, ratio=plan.ratio)


def decode_plans(spec: ModelSpec, config, plan: Plan) -> dict[str, str]:
    """Per row, how it decodes (``graph``/``replay``/``eager: why``; see the docstring)."""
    names = ["full", *(m for m in plan.methods if m not in (BASELINE, EAGER_FULL))]
    plans = {}
    for name in names:  # a method that cannot be captured decodes eagerly, whatever was asked
        why = why_eager(method_of(name, plan), config, "sdpa", spec.sdpa_backend)
        plans[name] = f"{EAGER}: {why}" if why else spec.decode_plan(method_of(name, plan), config)
    plans[EAGER_FULL] = "eager: the full cache's steps, not captured (for comparison)"
    plans[BASELINE] = "eager: model.generate with the static cache, not compiled"
    return plans


def request(
    model, tokenizer, name: str, ids: torch.Tensor, plan: Plan, graphs: DecodeGraphs | None
) -> dict:
    """One request of ``name`` (a method, ``full``, ``full_eager`` or ``transformers``): its
    times, peak memory, KV bytes and tokens; decoding steps in ``graphs`` (None: eager)."""
    if name == BASELINE:
        return generate_static(model, ids, plan.decode_tokens)
    start = time.perf_counter()
    out = generate(
        model,
        tokenizer,
        method_of(name, plan),
        ids,
        plan.decode_tokens,
        plan.prefill_chunk,
        decode_capture=graphs,
    )
    wall = time.perf_counter() - start
    gen, m = out.generation, out.measurement
    return {
        "capture_s": gen.capture_s,
        "prefill_s": gen.prefill_s,
        "decode_total_s": gen.decode_s,
        "decode_steps": gen.decode_steps,
        "peak_bytes": m.peak_memory_bytes,
        "kv_bytes": gen.kv_bytes_prefill,
        "kv_bytes_final": gen.kv_bytes_final,
        "kv_full_bytes": m.kv_full_bytes_prefill,
        "tokens": gen.tokens,
        "wall_s": wall,
    }


def new_lengths(context: int, slot: int, count: int = NEW_LENGTHS) -> list[int]:
    """``count`` prompt lengths just above ``context`` that no other request has: slot
    ``slot`` (a row's index) gets its own, so no method finds a shape another one warmed."""
    step = max(1, context // 1024)
    return [context + step * (1 + slot * count + i) for i in range(count)]


def run_cell(model, tokenizer, name: str, workload: str, context: int, plan: Plan) -> dict:
    """One (method, workload, context), its requests sharing their captured decoding steps
    (freed after the cell)."""
    with decode_steps(plan.decode.get(name)) as graphs:
        cell = _run_cell(model, tokenizer, name, workload, context, plan, graphs)
    return {**cell, "decode": plan.decode.get(name, EAGER).split(":")[0]}


def _run_cell(model, tokenizer, name, workload, context, plan, graphs) -> dict:
    """``repeat``: best of the repeats of one prompt. ``new_lengths``: a request per new
    length, medians of its times, mean wall time."""
    vocab = model.config.vocab_size
    ask = partial(request, model, tokenizer, name, plan=plan, graphs=graphs)
    if workload == "new_lengths":
        slot = list(dict.fromkeys(["full", *plan.methods])).index(name)
        lengths = new_lengths(context, slot, plan.new_lengths)
        runs = [ask(prompt(n, vocab)) for n in lengths]
        kv = ("kv_bytes", "kv_bytes_final", "kv_full_bytes")
        return {
            "prefill_s": statistics.median(r["prefill_s"] for r in runs),
            "decode_s": statistics.median(per_token(r) for r in runs),
            "peak_bytes": max(r["peak_bytes"] for r in runs),
            **{k: statistics.mean(r[k] for r in runs) for k in kv},
            "prompt_tokens": statistics.mean(lengths),
            "tokens": [r["tokens"] for r in runs],
            "wall_s": statistics.mean(r["wall_s"] for r in runs),
            "capture_s": max(r.get("capture_s", 0.0) for r in runs),
            "repeats": len(runs),
        }
    ids, best = prompt(context, vocab), {}
    for _ in range(plan.repeats):
        r = ask(ids)
        best = {
            **r,
            "prefill_s": min(best.get("prefill_s", math.inf), r["prefill_s"]),
            "decode_s": min(best.get("decode_s", math.inf), per_token(r)),
            "peak_bytes": max(best.get("peak_bytes", 0), r["peak_bytes"]),
            "prompt_tokens": context,
            "wall_s": min(best.get("wall_s", math.inf), r["wall_s"]),
            "capture_s": max(best.get("capture_s", 0.0), r.get("capture_s", 0.0)),
            "repeats": best.get("repeats", 0) + 1,
        }
        if r["wall_s"] > plan.repeat_below_s:
            break
    return best


def per_token(run: dict) -> float:
    """Decoding seconds per token (a request's ``decode_s`` leaves its capture time out)."""
    return run["decode_total_s"] / max(run["decode_steps"], 1)
