"""DAC's cost against the compressor's own forward pass.

    OMP_WAIT_POLICY=PASSIVE flock /tmp/kvbench-timing.lock \\
        python bench/prompt_costs.py --tokens 1000 1500 [--profile]

For each input length n (GSM8K train solutions, ``Question: ...\\nAnswer: ...`` shots, cut to
exactly n compressor tokens) every row is timed in the same process, the best of
``--repeats`` rounds in which the passes take turns:

- ``plain forward``: one forward pass of the compressor over the n tokens (the model's own
  forward, sdpa, logits for every position, no cache): the unit of every ratio;
- ``eager + output_attentions``: the authors' scoring pass (eager attention, every layer's
  and head's (n, n) map returned, cross-entropy losses);
- ``kvbench before``: the reference scoring pass (sdpa plus hooks that
  recompute each layer's full (n, n) attention in query chunks of 256, masked and
  soft-maxed as a whole; full logits and log-softmax for the self-information);
- ``kvbench now``: :meth:`methods.prompt.compressor.Compressor.token_scores` (blockwise column
  sums that skip the causal upper triangle, the LM head applied in chunks).

The DAC rows run a whole compression (``rate``, the authors' schedule, T steps) with the
``before`` and ``now`` scoring passes and report ``compression / (T x plain forward)``, the
target (at most 2.0), and whether both kept the same positions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.api import build  # noqa: E402
from harness.provenance import device_description  # noqa: E402
from methods.base import cache_of  # noqa: E402
from methods.cache.attention import accumulated_attention  # noqa: E402
from methods.prompt.compressor import Compressor, TokenScores  # noqa: E402
from methods.storage import data_dir  # noqa: E402

DATA = data_dir() / "gsm8k" / "train.jsonl"


class BeforeCompressor(Compressor):
    """The reference scoring pass (each layer's full (n, n) attention), compared with the
    blockwise :meth:`Compressor.score`."""

    @torch.no_grad()
    def token_scores(self, ids: list[int] | torch.Tensor, attention: bool) -> TokenScores:
        input_ids = torch.as_tensor(ids, device=self.device).reshape(1, -1)
        self.forward_passes += 1
        received = torch.zeros(input_ids.shape[1], dtype=torch.float32)

        def hook(module, args, kwargs, output):
            keys = cache_of(kwargs).layers[module.layer_idx].keys
            cols = accumulated_attention(module, kwargs["hidden_states"], keys, kwargs, 256)
            received.add_(cols.sum(dim=(0, 1)))

        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in self._modules]
        try:
            logits = self.model(
                input_ids=input_ids, past_key_values=DynamicCache(), use_cache=True
            ).logits[0]
        finally:
            for handle in handles:
                handle.remove()
        ids_, n = input_ids[0], input_ids.shape[1]
        info = torch.zeros(n, dtype=torch.float32)
        for start in range(0, n - 1, 512):  # its self_information(logits, ids, chunk=512)
            end = min(start + 512, n - 1)
            logp = logits[start:end].float().log_softmax(dim=-1)
            info[start + 1 : end + 1] = -logp.gather(1, ids_[start + 1 : end + 1, None])[:, 0]
        return TokenScores(self_info=info, attention=received)


def eager_pass(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The authors' scoring pass: eager attention, every (n, n) map materialised."""
    out = model(input_ids=ids, output_attentions=True)
    losses = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:], reduction="none")
    return sum(a[0].sum(dim=(0, 1)) for a in out.attentions), losses


def interleaved(candidates: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best wall seconds of each candidate over ``rounds`` rounds, the candidates taking turns
    within a round (so that a change in the machine's load hits them all alike)."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def text_ids(tokenizer, n: int) -> list[int]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    text = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in rows[:40])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"--tokens {n}: the text has only {len(ids)} tokens")
    return list(ids[:n])


@torch.no_grad()
def measure(model, eager, tokenizer, n: int, args) -> list[dict]:
    method = build("method", "dac", ratio=round(1 - args.rate, 12))  # --rate: share removed
    method.prepare(model, tokenizer)
    now = method.scorer
    before = BeforeCompressor(model, tokenizer, attention=True)
    ids = text_ids(tokenizer, n)
    x = torch.tensor([ids])
    steps = method.steps(n)
    candidates = {"plain forward": lambda: model(input_ids=x, use_cache=False)}
    if eager is not None:
        candidates["eager + output_attentions"] = lambda: eager_pass(eager, x)
    candidates["kvbench before"] = lambda: before.token_scores(ids, True)
    candidates["kvbench now"] = lambda: now.token_scores(ids, True)
    seconds = interleaved(candidates, args.repeats)
    plain = seconds["plain forward"]
    out = [
        {"n": n, "what": "one pass: " + w, "s": s, "ratio": s / plain} for w, s in seconds.items()
    ]
    kept = {}

    def compress(scorer: Compressor, name: str) -> None:
        method._compressor = scorer
        kept[name] = method.select(ids)

    runs = {"before": lambda: compress(before, "before"), "now": lambda: compress(now, "now")}
    for name, s in interleaved(runs, 1).items():
        out.append({"n": n, "what": f"DAC {name}, T={steps}", "s": s, "ratio": s / (steps * plain)})
    same = kept["before"] == kept["now"]
    for row in out:
        row["same kept"] = same if row["what"].startswith("DAC") else ""
    if args.profile:
        for name, scorer in (("before", before), ("now", now)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                scorer.token_scores(ids, True)
            print(f"\n### profile, one pass, {name}, n={n}\n")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1000, 1500])
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-eager", dest="eager", action="store_false")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = build("model", args.model).load()
    eager = (
        build("model", args.model, attn_implementation="eager").load()[0] if args.eager else None
    )
    rows = [row for n in args.tokens for row in measure(model, eager, tokenizer, n, args)]
    print(f"\nmodel={args.model} rate={args.rate} repeats={args.repeats} threads={args.threads} "
          f"device={device_description(torch.device('cpu'))}")  # fmt: skip
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
