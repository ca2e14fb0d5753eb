"""Harness overhead: kvbench's adapter (full cache) vs lm-eval's own ``hf`` backend, same
model object, same task slice, same generation settings, timed in one process.

    python bench/overhead.py                      # SmolLM2, gsm8k, 3 samples, 2 rounds
    python bench/overhead.py --task longbench_qasper --limit 2 --max-length 4096

Prints a table of wall seconds per backend (the best of the rounds, the two backends
alternating) and the ratio kvbench / hf. It also checks that both produced the same outputs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lm_eval
import pandas as pd
import torch
from lm_eval.models.huggingface import HFLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.api import build  # noqa: E402
from harness.job import load_session  # noqa: E402
from harness.lm import KVBenchLM  # noqa: E402
from harness.provenance import device_description  # noqa: E402


def timed_eval(lm, task, limit: int, max_gen_toks: int) -> tuple[float, list]:
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=task.task_names(),
        task_manager=task.task_manager(),
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
        gen_kwargs={"max_gen_toks": max_gen_toks},
        verbosity="WARNING",
    )
    seconds = time.perf_counter() - start
    samples = sorted(
        (s["doc_id"], s["resps"][0][0]) for entries in out["samples"].values() for s in entries
    )
    return seconds, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--limit", type=int, default=3)
    parser.add_argument("--max-gen-toks", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    spec = build("model", args.model, max_length=args.max_length)
    task = build("task", args.task)
    with load_session(spec, build("method", "full")) as session:
        hf = HFLM(
            pretrained=session.model,
            tokenizer=session.tokenizer,
            batch_size=1,
            max_length=session.max_length,
        )
        compare(KVBenchLM(session, truncation=task.truncation), hf, task, args, session.model)


def compare(ours, hf, task, args, model) -> None:
    timed_eval(ours, task, 1, 8)  # warm-up: first-call allocations, task index
    times: dict[str, list[float]] = {"lm-eval hf": [], "kvbench": []}
    outputs = {}
    for _ in range(args.rounds):
        for name, lm in (("lm-eval hf", hf), ("kvbench", ours)):
            seconds, outputs[name] = timed_eval(lm, task, args.limit, args.max_gen_toks)
            times[name].append(seconds)
    best = {name: min(values) for name, values in times.items()}
    table = pd.DataFrame(
        {
            "backend": list(best),
            "best wall s": [round(v, 2) for v in best.values()],
            "all rounds s": [", ".join(f"{v:.2f}" for v in times[n]) for n in best],
        }
    )
    print(
        f"\nmodel={args.model} task={args.task} limit={args.limit} "
        f"max_gen_toks={args.max_gen_toks} device={device_description(model.device)} "
        f"threads={torch.get_num_threads()}"
    )
    print(table.to_markdown(index=False))
    print(f"\nratio kvbench / lm-eval hf = {best['kvbench'] / best['lm-eval hf']:.3f}")
    print(f"same outputs: {outputs['kvbench'] == outputs['lm-eval hf']}")


if __name__ == "__main__":
    main()
