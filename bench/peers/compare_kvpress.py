"""kvbench's eviction methods next to NVIDIA kvpress's presses on identical inputs: the token
positions each layer and KV head keeps, the greedy outputs, and the time.

    bash bench/peers/setup_kvpress.sh              # once: the peer's own venv (transformers<5.3)
    python bench/peers/compare_kvpress.py          # SmolLM2, 3 LongBench qasper prompts, 2k tokens
    python bench/peers/compare_kvpress.py --samples 5 --context 4096 --ratios 0.5 0.8 0.9

Both sides load the same saved model folder (kvbench's dequantised SmolLM2) and get the same
token ids: LongBench qasper prompts rendered by kvbench's lm-eval task, cut to ``--context``
tokens in the middle (LongBench's way). kvpress's ``compression_ratio`` c keeps
``int(S * (1 - c))`` tokens per head; kvbench gets exactly that as ``budget`` (its own
``ratio`` rounds instead, which can differ by one token). kvpress runs in its own process
(bench/peers/kvpress_driver.py); kept positions are read back from what each cache stores,
by matching every kept key to the full cache's keys (bench/peers/kept.py), the same way on
both sides.

Columns: ``overlap`` = |ours ∩ kvpress| / kept, over every (sample, layer, KV head);
``identical heads`` = share of (sample, layer, head) with the same kept set; ``logit_diff``
= largest |difference| between the two sides' next-token logits after the compressed prompt
(over samples), ``same_next`` = share of samples with the same next token; ``same output``
= share of samples whose greedy continuation is identical; ``agree`` = share of generated
tokens equal up to the first divergence; times are ours ÷ kvpress (same machine, one after
the other).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from bench.common import generate  # noqa: E402
from bench.peers.kept import kept_positions  # noqa: E402
from bench.peers.peer_io import run_driver  # noqa: E402
from harness.api import build  # noqa: E402
from harness.generation import new_cache  # noqa: E402
from harness.provenance import device_description  # noqa: E402
from harness.session import truncate  # noqa: E402
from methods.cache.knorm import KeyNorm  # noqa: E402
from methods.cache.snapkv import SnapKV  # noqa: E402
from methods.cache.streamingllm import StreamingLLM  # noqa: E402

PEER_PYTHON = HERE / ".venv-kvpress" / "bin" / "python"
# kvpress press -> (its arguments, the kvbench method built with the same algorithm choices)
PAIRS = {
    "snapkv": ("SnapKVPress", {"window_size": 64, "kernel_size": 5},
               lambda n: SnapKV(budget=n, window=64, kernel_size=5, pooling="avg")),
    "streamingllm": ("StreamingLLMPress", {"n_sink": 4},
                     lambda n: StreamingLLM(budget=n, sinks=4)),
    "knorm": ("KnormPress", {}, lambda n: KeyNorm(budget=n)),
    # each side's own defaults: kvpress window 64, avg-pool 5; kvbench (the authors'
    # release) window 32, max-pool 7: the difference is a documented algorithm choice
    "snapkv_defaults": ("SnapKVPress", {}, lambda n: SnapKV(budget=n)),
}  # fmt: skip


def qasper_prompts(tokenizer, count: int, context: int) -> list[list[int]]:
    """The first ``count`` qasper prompts as kvbench's lm-eval task renders them."""
    from lm_eval.tasks import get_task_dict

    task = build("task", "longbench_qasper")
    lm_task = get_task_dict(task.task_names(), task.task_manager())[task.task_names()[0]]
    docs = list(lm_task.test_docs())[:count]
    return [truncate(tokenizer.encode(lm_task.doc_to_text(d)), context, "middle") for d in docs]


def agreement(ours: list[int], theirs: list[int]) -> float:
    same = 0
    for a, b in zip(ours, theirs, strict=False):
        if a != b:
            break
        same += 1
    return same / max(len(ours), len(theirs), 1)


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, method=None) -> tuple[list, torch.Tensor]:
    """(per-layer keys (H_kv, n, D) the cache stores after the prompt, next-token logits)."""
    cache = new_cache(model)
    with (method or build("method", "full")).applied(model):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return [layer.keys[0].clone() for layer in cache.layers], out.logits[0, -1].float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.8])
    parser.add_argument("--methods", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--peer-python", default=str(PEER_PYTHON))
    args = parser.parse_args()
    if not Path(args.peer_python).exists():
        sys.exit(f"no kvpress environment at {args.peer_python}: bash bench/peers/setup_kvpress.sh")

    spec = build("model", "smollm2_135m")
    model, tokenizer = spec.load()
    samples = qasper_prompts(tokenizer, args.samples, args.context)
    presses = [
        {"label": f"{name}@{c}", "press": PAIRS[name][0],
         "kwargs": {**PAIRS[name][1], "compression_ratio": c}}
        for name in args.methods for c in args.ratios
    ]  # fmt: skip
    request = {
        "model_dir": spec.resolved_path(), "threads": torch.get_num_threads(),
        "max_new_tokens": args.max_new_tokens, "samples": samples, "presses": presses,
    }  # fmt: skip
    peer = run_driver(args.peer_python, "kvpress_driver.py", request, "out.pt", torch.load)
    theirs = {(r["label"], r["sample"]): r for r in peer["results"]}

    rows = []
    for index, sample in enumerate(samples):
        ids = torch.tensor([sample])
        full = generate(model, tokenizer, None, ids, args.max_new_tokens).generation
        full_keys, logits = prefill(model, ids)
        peer_full = theirs[("full", index)]
        rows.append(row("full", 1.0, full.tokens, full, logits, peer_full, None, None, 0.0))
        for press in presses:
            name, c = press["label"].rsplit("@", 1)
            n_kept = max(1, int(len(sample) * (1 - float(c))))
            method = PAIRS[name][2](n_kept)
            keys, logits = prefill(model, ids, method)
            matched = [kept_positions(f, k) for f, k in zip(full_keys, keys, strict=True)]
            positions, error = [p for p, _ in matched], max(e for _, e in matched)
            ours = generate(model, tokenizer, method, ids, args.max_new_tokens).generation
            peer_run = theirs[(press["label"], index)]
            rows.append(
                row(name, 1 - float(c), ours.tokens, ours, logits, peer_run, positions,
                    peer_run["positions"], max(error, peer_run["match_error"]))
            )  # fmt: skip
    table = summarize(pd.DataFrame(rows))
    print(f"# kvbench vs kvpress {peer['versions']} on {device_description(model.device)}")
    print(f"# SmolLM2-135M, {len(samples)} LongBench qasper prompts of {args.context} tokens,")
    print(f"# {args.max_new_tokens} greedy tokens; times: kvbench / kvpress, same run")
    print(table.to_markdown(index=False, floatfmt=".4g"))


def row(name, kept_ratio, tokens, ours, logits, peer, positions, peer_positions, error) -> dict:
    theirs = peer["first_logits"]
    out = {
        "method": name,
        "kept": kept_ratio,
        "logit_diff": float((logits - theirs).abs().max()),
        "same_next": float(logits.argmax() == theirs.argmax()),
        "same_output": float(tokens == peer["tokens"]),
        "agree": agreement(tokens, peer["tokens"]),
        "prefill_ours_s": ours.prefill_s,
        "prefill_peer_s": peer["prefill_s"],
        "decode_ours_s": ours.decode_s / max(ours.decode_steps, 1),
        "decode_peer_s": peer["decode_s"] / max(peer["decode_steps"], 1),
        "match_error": error,
    }
    if positions is not None:
        shared = kept = identical = heads = 0
        for mine, their in zip(positions, peer_positions, strict=True):
            for h in range(mine.shape[0]):
                common = len(set(mine[h].tolist()) & set(their[h].tolist()))
                shared += common
                kept += their.shape[1]
                identical += int(common == their.shape[1] == mine.shape[1])
                heads += 1
        out |= {"shared": shared, "kept_total": kept, "identical": identical, "heads": heads}
    return out


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    grouped = frame.groupby(["method", "kept"], sort=False)
    table = grouped.agg(
        logit_diff=("logit_diff", "max"),
        same_next=("same_next", "mean"),
        same_output=("same_output", "mean"),
        agree=("agree", "mean"),
        prefill_ours_s=("prefill_ours_s", "sum"),
        prefill_peer_s=("prefill_peer_s", "sum"),
        decode_ours_s=("decode_ours_s", "mean"),
        decode_peer_s=("decode_peer_s", "mean"),
        match_error=("match_error", "max"),
        shared=("shared", "sum"),
        kept_total=("kept_total", "sum"),
        identical=("identical", "sum"),
        heads=("heads", "sum"),
    ).reset_index()
    table["overlap"] = table["shared"] / table["kept_total"]
    table["identical heads"] = table["identical"] / table["heads"]
    table["prefill ours/kvpress"] = table["prefill_ours_s"] / table["prefill_peer_s"]
    table["decode ours/kvpress"] = table["decode_ours_s"] / table["decode_peer_s"]
    return table[
        ["method", "kept", "overlap", "identical heads", "logit_diff", "same_next",
         "same_output", "agree",
         "prefill ours/kvpress", "decode ours/kvpress", "match_error"]
    ]  # fmt: skip


if __name__ == "__main__":
    main()
