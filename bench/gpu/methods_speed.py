"""The GPU table of the model and prompt methods: KV-Latent and kvheads against the full cache,
DAC, self-information and LLMLingua against one plain forward pass of their compressor.

    python bench/gpu/methods_speed.py --out "$OUT"              # on a GPU (bench/gpu/run.sh)
    python bench/gpu/methods_speed.py --dry-run --out /tmp/ms   # tiny shapes on the CPU (CI)

Model methods (``kind`` model): kvlatent_k, kvlatent_v and kvlatent_kv (surgery only,
``train: false``: recovery training changes weights, not shapes or bytes) and kvheads
(conf/method/kvheads.yaml: one KV head per layer, merged by a PCA of calibration text), each
applied once, timed (``transform s``), to a copy of bench/gpu/speed.py's model: random weights
with Llama-3-8B's shapes x ``--layers`` layers, bfloat16, sdpa (tiny shapes under --dry-run).
Each context's request (seeded random ids, greedy, EOS off) runs through kvbench's request
path on the transformed model (``bench.common.generate``), after a short warm-up: prefill and
per-token decode times (best of ``--repeats``), KV bytes held after prefill, the weights, the
allocator's peak. Ratios are to the ``full`` row at the same context; ``decode vs floor`` =
decode time / ((weights + KV) read once at the copy bandwidth measured in this run).

Prompt methods (``kind`` prompt): selfinfo, llmlingua and dac (conf/method/, half the tokens
kept) shorten a prompt whose compressible part is ``context`` compressor tokens of GSM8K train
problems (the offline data; repeated if short) and whose question stays. Time: the whole
``shorten`` call (the session's prompt step), once, after a warm-up on a shorter prompt; the
``forward`` row is one plain forward pass of the compressor over the same tokens (best of
``--repeats``). The compressor: random weights with SmolLM2-135M's shapes (30 layers, 9 query
and 3 KV heads of 64, vocabulary 49152, window 8192: a longer input is scored in chunks) and a
byte-level tokenizer, bfloat16 on the GPU (times depend on the shapes and token counts, not on
the weights); under --dry-run the tiny model of the CPU tests (conf/model/tiny_llama_gqa.yaml).

Each row's failure (out of memory included) is caught and named in its row; a method that
failed is named in its later rows, and every other method still runs. A row projected (from the
method's smaller context) to take longer than what is left of ``--budget-s`` is skipped. The
files methods_speed.md and methods_speed.csv under ``--out`` are rewritten after every row.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import generate  # noqa: E402
from bench.gpu import ceilings  # noqa: E402
from bench.gpu.methods_table import (  # noqa: E402
    FORWARD,
    FULL,
    csv_frame,
    markdown,
    model_frame,
    prompt_frame,
)
from bench.gpu.op_counts import SMOLLM2_135M  # noqa: E402
from bench.gpu.speed import LLAMA3_8B, TINY, guarded, prompt  # noqa: E402
from harness.api import build  # noqa: E402
from harness.measure import synchronized_clock  # noqa: E402
from harness.models import ModelSpec  # noqa: E402
from harness.provenance import device_description  # noqa: E402
from methods.base import PromptParts  # noqa: E402
from methods.model.data import gsm8k_train_texts  # noqa: E402
from methods.model.layers import HeadShape  # noqa: E402

MODEL_METHODS = ("kvlatent_k", "kvlatent_v", "kvlatent_kv", "kvheads")
PROMPT_METHODS = ("selfinfo", "llmlingua", "dac")  # cheapest first
MODEL_FIELDS = {name: {"train": False} for name in MODEL_METHODS}  # surgery only
COMPRESSOR = dict(SMOLLM2_135M, vocab_size=49152)  # SmolLM2-135M's own vocabulary
DRY_RUN_COMPRESSOR = "tiny_llama_gqa"
QUESTION = "\n\nQuestion: Weng earns $12 an hour for babysitting. How much did she earn?\nAnswer:"
WARM_TOKENS = 1024  # the warm-up's prompt length (at most the first context)


@dataclass
class Budget:
    """The rows' time: a method that failed, or whose next row is projected (exponent 1.5
    from its last) past what is left of ``seconds``, is skipped and named."""

    seconds: float
    start: float = field(default_factory=time.perf_counter)
    last: dict[str, tuple[int, float]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def why_not(self, name: str, context: int) -> str | None:
        if name in self.failed:
            return f"skipped: {self.failed[name]} at a smaller context"
        left = self.seconds - (time.perf_counter() - self.start)
        if left <= 0:
            return f"skipped: the table's {self.seconds:.0f} s budget is spent"
        if name in self.last:
            ran, seconds = self.last[name]
            projected = seconds * (context / ran) ** 1.5
            if projected > left:
                return f"skipped: projected {projected:.0f} s > {left:.0f} s left"
        return None

    def run(self, row: dict, measure: Callable[[], dict], device: torch.device) -> dict:
        """``row`` with ``measure()``'s fields and its status ("ok", or why not)."""
        name, context = row["method"], row["context"]
        status = self.why_not(name, context)
        if status is None:
            start = time.perf_counter()
            cell, status = guarded(measure, device)
            row |= cell
            if status == "ok":
                self.last[name] = (context, time.perf_counter() - start)
            else:
                self.failed[name] = status
        row["status"] = status
        return row


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (CI)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/gpu/out"))
    parser.add_argument("--contexts", type=int, nargs="+")
    parser.add_argument("--model-methods", nargs="*", default=list(MODEL_METHODS))
    parser.add_argument("--prompt-methods", nargs="*", default=list(PROMPT_METHODS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=60.0, help="for all the rows")
    parser.add_argument("--sdpa-backend", default="auto", help="model.sdpa_backend")
    args = parser.parse_args(argv)
    if args.contexts is None:
        args.contexts = [256, 512] if args.dry_run else [8192, 32768]
    if args.dry_run:
        args.decode_tokens = min(args.decode_tokens, 4)
        args.repeats = 1
        torch.set_num_threads(1)  # tiny shapes: one thread is fastest (and kind to CI)
    return args


def random_spec(name: str, shapes: dict, args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(
        name=name,
        source="random",
        architecture=shapes,
        device="cpu" if args.dry_run else "cuda",
        dtype="auto",
        attn_implementation="sdpa",
        sdpa_backend=args.sdpa_backend,
    )


def load_models(args: argparse.Namespace) -> tuple[tuple, tuple, ModelSpec]:
    """(model, tokenizer) of the model methods (EOS off), (model, tokenizer) of the
    compressor, and the first's spec."""
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible: run with --dry-run (tiny shapes on the CPU)")
    shapes = dict(TINY if args.dry_run else LLAMA3_8B, num_hidden_layers=args.layers)
    spec = random_spec("tiny_shapes" if args.dry_run else "llama3_8b_shapes", shapes, args)
    model, tokenizer = spec.load()
    model.generation_config.eos_token_id = []  # decode every step, whatever the model says
    if args.dry_run:
        compressor = build("model", DRY_RUN_COMPRESSOR).load()
    else:
        compressor = random_spec("smollm2_135m_shapes", COMPRESSOR, args).load()
    return (model, tokenizer), compressor, spec


def heads(model: torch.nn.Module, described: dict) -> str:
    """The heads a model's cache stores, from the method's ``describe()``."""
    shape = HeadShape.held_by(model)
    if "d_qk" in described:
        return f"{shape.num_kv_heads} x (K {described['d_qk']} + V {described['d_vo']})"
    return f"{shape.num_kv_heads} x (K {shape.head_dim} + V {shape.head_dim})"


class ModelRows:
    """The full cache and each model method's transformed copy (made once, then kept)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, args: argparse.Namespace):
        self.base, self.tokenizer, self.args = model, tokenizer, args
        self.models: dict[str, tuple[torch.nn.Module, dict]] = {}

    def transformed(self, name: str) -> tuple[torch.nn.Module, dict]:
        if name not in self.models:
            model, device, seconds, described = self.base, self.base.device, 0.0, {}
            if name != FULL:
                method = build("method", name, **MODEL_FIELDS.get(name, {}))
                attn = getattr(self.base.config, "_attn_implementation", None) or ""
                method.validate_runtime(device, self.base.dtype, attn)
                start = synchronized_clock(device)
                model = method.transform(copy.deepcopy(self.base), self.tokenizer)
                seconds, described = synchronized_clock(device) - start, method.describe()
            warm = prompt(min(WARM_TOKENS, self.args.contexts[0]), model.config.vocab_size)
            generate(model, self.tokenizer, None, warm, 2)
            info = {
                "heads": heads(model, described),
                "transform_s": seconds,
                "weight_bytes": ceilings.weight_bytes(model),
            }
            self.models[name] = (model, info)
        return self.models[name]

    def measure(self, name: str, context: int) -> dict:
        """Best of the repeats of one request of ``context`` random tokens."""
        model, info = self.transformed(name)
        ids, best = prompt(context, model.config.vocab_size), {}
        for _ in range(self.args.repeats):
            out = generate(model, self.tokenizer, None, ids, self.args.decode_tokens)
            gen = out.generation
            run = {
                "prefill_s": gen.prefill_s,
                "decode_s": gen.decode_s / max(gen.decode_steps, 1),
                "peak_bytes": out.measurement.peak_memory_bytes,
                "kv_bytes": gen.kv_bytes_prefill,
                "kv_bytes_final": gen.kv_bytes_final,
            }
            for key, pick in (("prefill_s", min), ("decode_s", min), ("peak_bytes", max)):
                run[key] = pick(run[key], best.get(key, run[key]))
            best = run
        return {**info, **best}


def prompt_text(tokenizer: Any, tokens: int) -> tuple[PromptParts, list[int]]:
    """A prompt whose compressible part is ``tokens`` tokens of GSM8K train problems (one
    after another, separated by blank lines, repeated if the data are short), and its ids."""
    problems, text, ids = itertools.cycle(gsm8k_train_texts()), "", []
    while len(ids) < tokens:
        text += "".join(f"{next(problems)}\n\n" for _ in range(32))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    compressible = tokenizer.decode(ids[:tokens], clean_up_tokenization_spaces=False)
    ids = tokenizer(compressible, add_special_tokens=False)["input_ids"]
    return PromptParts(compressible, QUESTION), list(ids)


class PromptRows:
    """The compressor's plain forward pass and each prompt method (prepared once, warmed)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, args: argparse.Namespace):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.device = next(model.parameters()).device
        self.methods: dict[str, Any] = {}
        self.warm, _ = prompt_text(tokenizer, min(WARM_TOKENS, args.contexts[0]))

    def method(self, name: str) -> Any:
        if name not in self.methods:
            method = build("method", name)
            method.prepare(self.model, self.tokenizer)  # the compressor: the model given
            method.shorten(self.warm)
            self.methods[name] = method
        return self.methods[name]

    @torch.no_grad()
    def forward(self, ids: list[int]) -> dict:
        x = torch.tensor([ids], device=self.device)
        times = []
        for _ in range(self.args.repeats + 1):  # the first one warms up
            start = synchronized_clock(self.device)
            self.model(input_ids=x, use_cache=False)
            times.append(synchronized_clock(self.device) - start)
        return {"seconds": min(times[1:]), "tokens": len(ids), "kept": 1.0, "passes": 1,
                "chunks": 1}  # fmt: skip

    def measure(self, name: str, parts: PromptParts, ids: list[int]) -> dict:
        if name == FORWARD:
            return self.forward(ids)
        method = self.method(name)
        start = synchronized_clock(self.device)
        method.shorten(parts)
        seconds = synchronized_clock(self.device) - start
        stats = method.last_stats()
        return {
            "seconds": seconds,
            "tokens": int(stats["compressor_tokens"]),
            "kept": 1.0 - stats["achieved_rate"],
            "passes": int(stats["compressor_passes"]),
            "chunks": int(stats["compressor_chunks"]),
        }


def measure(
    models: ModelRows, prompts: PromptRows, budget: Budget, on_row: Callable[[list], None]
) -> list[dict]:
    """Each context in turn: the full cache and the model methods, then the compressor's
    forward pass and the prompt methods; ``on_row(rows)`` after each row."""
    args, rows = models.args, []

    def add(row: dict, fn: Callable[[], dict], device: torch.device) -> None:
        rows.append(budget.run(row, fn, device))
        print(f"{row['context']:>7} {row['kind']:<6} {row['method']:<12} {row['status']}")
        on_row(rows)

    for context in args.contexts:
        for name in [FULL, *args.model_methods]:
            row = {"kind": "model", "context": context, "method": name}
            add(row, partial(models.measure, name, context), models.base.device)
        parts, ids = prompt_text(prompts.tokenizer, context)
        for name in [FORWARD, *args.prompt_methods]:
            row = {"kind": "prompt", "context": context, "method": name}
            add(row, partial(prompts.measure, name, parts, ids), prompts.device)
    return rows


def header(
    args: argparse.Namespace,
    spec: ModelSpec,
    model: torch.nn.Module,
    compressor: torch.nn.Module,
    bandwidth: float,
) -> list[str]:
    import transformers

    device = model.device
    shapes = "DRY RUN, tiny random shapes on the CPU" if args.dry_run else "Llama-3-8B shapes"
    return [
        f"# Model and prompt methods: {device_description(device)}",
        "",
        f"- model methods: random weights, {shapes} x {args.layers} layers, dtype "
        f"{spec.resolved_dtype}, sdpa ({spec.resolved_sdpa_backend(model.config)}), greedy "
        f"decode of {args.decode_tokens} tokens (EOS off), best of {args.repeats}; KV-Latent "
        "surgery only (no recovery training), kvheads as conf/method/kvheads.yaml",
        f"- prompt methods: half the compressible tokens kept, GSM8K train text; compressor "
        f"{'conf/model/' + DRY_RUN_COMPRESSOR if args.dry_run else 'random SmolLM2-135M shapes'}"
        f" ({compressor.config.num_hidden_layers} layers, window "
        f"{compressor.config.max_position_embeddings}), byte-level tokenizer",
        *(["- DRY RUN: tiny shapes on the CPU, not a measurement"] if args.dry_run else []),
        f"- copy bandwidth measured in this run: {bandwidth / 1e9:.0f} GB/s (read + write)",
        f"- torch {torch.__version__}, transformers {transformers.__version__}",
        f"- command: python bench/gpu/methods_speed.py {' '.join(sys.argv[1:])}",
    ]


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames
    args = arguments()
    clock_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (model, tokenizer), (compressor, compressor_tokenizer), spec = load_models(args)
    bandwidth = ceilings.copy_bandwidth(model.device, 32 if args.dry_run else 4096)
    top = header(args, spec, model, compressor, bandwidth)
    budget = Budget(args.budget_s)

    def write(rows: list[dict]) -> str:
        model_rows, prompt_rows = model_frame(rows, bandwidth), prompt_frame(rows)
        took = f"- {len(rows)} rows in {time.perf_counter() - clock_start:.0f} s"
        text = markdown([*top, took], model_rows, prompt_rows)
        (out / "methods_speed.md").write_text(text)
        csv_frame(model_rows, prompt_rows).to_csv(out / "methods_speed.csv", index=False)
        return text

    models = ModelRows(model, tokenizer, args)
    prompts = PromptRows(compressor, compressor_tokenizer, args)
    print(write(measure(models, prompts, budget, write)))


if __name__ == "__main__":
    main()
