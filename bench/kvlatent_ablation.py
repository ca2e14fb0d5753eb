"""KV-Latent's K-vs-V ablation at equal budgets (cache and training), before and after the
recovery training, on SmolLM2-135M (or another model config).

    python bench/kvlatent_ablation.py --threads 1       # k/v/kv x d=32,16 x aware/standard RoPE
    python bench/kvlatent_ablation.py --dims 16 --variants k v --training stage1_steps=48

Every configuration is evaluated after the surgery alone ("before") and after the recovery
training ("after"; trained once and cached in $KVBENCH_CACHE/kvlatent, so a re-run only
evaluates). On ``--eval-seqs`` sequences of ``--eval-len`` tokens of held-out text (the tail
of GSM8K train that no training source uses, see methods/model/data.py): perplexity, and
fidelity to the unmodified model on the same tokens (mean per-token KL(original || modified)
and top-1 agreement). KV bytes per token are what a DynamicCache stores after a prefill,
divided by the prompt length, and the ratio to the full cache. The value-only variant does
not cut the keys, so its RoPE is the model's own and it is run once per dim. Prints a
markdown table and writes it as CSV (rows are appended as they finish).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from transformers import DynamicCache

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.api import build  # noqa: E402
from harness.measure import KVLayout, stored_kv_bytes  # noqa: E402
from methods.base import cache_kwarg  # noqa: E402
from methods.model import data  # noqa: E402
from methods.model.kvlatent import KVLatent  # noqa: E402


def configurations(variants, dims, ropes):
    """(variant, dim, rope): the value-only variant once per dim (its keys keep their RoPE)."""
    out = []
    for dim in dims:
        for variant in variants:
            for rope in ropes[:1] if variant == "v" else ropes:
                out.append((variant, dim, rope))
    return out


@torch.no_grad()
def reference(model, chunks):
    """Log-probabilities (float16) of the unmodified model on every chunk."""
    return [F.log_softmax(model(ids[None]).logits[0, :-1].float(), -1).half() for ids in chunks]


@torch.no_grad()
def evaluate(model, chunks, ref, layout) -> dict:
    nll = kl = agree = tokens = 0.0
    for ids, ref_logp in zip(chunks, ref, strict=True):
        logp = F.log_softmax(model(ids[None]).logits[0, :-1].float(), -1)
        ref_logp = ref_logp.float()
        nll += float(-logp.gather(1, ids[1:, None]).sum())
        kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
        agree += float((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
        tokens += len(ids) - 1
    cache = DynamicCache(config=model.config)
    model(chunks[0][None], **cache_kwarg(model, cache), use_cache=True)
    seq = len(chunks[0])
    stored = stored_kv_bytes(cache)
    return {
        "ppl": float(torch.exp(torch.tensor(nll / tokens))),
        "kl": kl / tokens,
        "top1": agree / tokens,
        "kv_bytes_per_token": stored / seq,
        "kv_ratio": stored / layout.full_bytes(seq),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--variants", nargs="+", default=["k", "v", "kv"])
    parser.add_argument("--dims", nargs="+", type=int, default=[32, 16])
    parser.add_argument("--ropes", nargs="+", default=["frequency_aware", "standard"])
    parser.add_argument("--training", nargs="*", default=[], help="TrainConfig overrides k=v")
    parser.add_argument("--eval-seqs", type=int, default=6)
    parser.add_argument("--eval-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-train", action="store_true", help="only the 'before' rows")
    parser.add_argument("--out", default=str(REPO / "results" / "kvlatent_ablation.csv"))
    args = parser.parse_args()

    training = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.training)}
    training.setdefault("progress", False)
    spec = build("model", args.model, threads=args.threads)
    original, tokenizer = spec.load()
    layout = KVLayout.from_config(original.config, spec.torch_dtype)
    chunks = data.token_chunks(data.heldout_texts(), tokenizer, args.eval_len, args.eval_seqs)
    ref = reference(original, chunks)
    rows: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(row: dict) -> None:
        rows.append(row)
        pd.DataFrame(rows).to_csv(out, index=False)
        print(json.dumps(row), flush=True)

    record({"variant": "full", "stage": "-", **evaluate(original, chunks, ref, layout)})
    head_dim = original.config.head_dim
    for variant, dim, rope in configurations(args.variants, args.dims, args.ropes):
        stages = [("before", False)] + ([] if args.no_train else [("after", True)])
        for stage, train in stages:
            method = KVLatent(name=f"kvlatent_{variant}", variant=variant, dim=dim, rope=rope,
                              train=train, training=training)  # fmt: skip
            d_qk, d_vo = method.dims(head_dim)
            clock = time.perf_counter()
            with method.applied(copy.deepcopy(original), tokenizer) as model:
                seconds = time.perf_counter() - clock
                info = getattr(model, "kvbench_recovery", {})
                trained = {}
                if info:  # the loss at the first and last step; the whole log is in the folder
                    meta = json.loads((Path(info["folder"]) / "meta.json").read_text())
                    losses = meta["losses"].get("stage1", {})
                    trained = {"loss_first": losses.get("first"), "loss_last": losses.get("last"),
                               "train_s": meta["train_s"], "checkpoint": info["folder"]}  # fmt: skip
                row = {"variant": variant, "d_qk": d_qk, "d_vo": d_vo,
                       "rope": rope if d_qk < head_dim else "model", "stage": stage,
                       **evaluate(model, chunks, ref, layout), **trained,
                       "apply_s": seconds}  # fmt: skip
            record(row)
            del model
    table = pd.DataFrame(rows)
    print()
    print(table.to_markdown(index=False, floatfmt=".4g"))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
