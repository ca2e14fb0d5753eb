"""Cache methods on a shared CPU: prefill and decode time with a fixed background load, as a
ratio to the same run on a quiet machine, under each OpenMP wait policy.

    python bench/contention.py                                   # SmolLM2, 1k, full/knorm/h2o/snapkv
    python bench/contention.py --length 2048 --load 3 --policies PASSIVE ACTIVE

Each (wait policy, load) cell runs in a fresh Python process (OpenMP reads its wait policy
once, at start-up), which times every method ``--repeats`` times and keeps the fastest. The
load is ``--load`` processes spinning on the CPU for the whole cell (a new user's machine with a
compiler or a browser busy), started before the cell and stopped after it. ``vs quiet`` is the
cell's time ÷ the same policy's quiet time: 1.0 would mean the method shares the CPU without
slowing down beyond its share. Under ``ACTIVE`` (OpenMP's spin-waiting threads, libgomp's
default spin before sleeping) a method of many small operations wakes threads that the load
has descheduled, once per operation; ``PASSIVE`` threads sleep between operations.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("full", "knorm", "h2o", "snapkv")


def spin(stop: multiprocessing.Event) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def cell(args: argparse.Namespace) -> list[dict]:
    """Time every method once per repeat in this process (the policy is the environment's)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.cache_costs import prompt_ids
    from bench.common import generate
    from harness.api import build

    model, tokenizer = build("model", args.model).load()
    ids = prompt_ids(tokenizer, args.length)
    rows = []
    for name in args.methods:
        best = None
        for _ in range(args.repeats):
            method = None if name == "full" else build("method", name, ratio=args.ratio)
            m = generate(model, tokenizer, method, ids, args.decode_tokens).measurement
            steps = max(m.decode_steps, 1)
            found = (m.prefill_s, m.decode_s / steps)
            best = (
                found
                if best is None
                else tuple(min(a, b) for a, b in zip(best, found, strict=True))
            )
        rows.append({"method": name, "prefill_s": best[0], "decode_s_per_token": best[1]})
    rows.append({"method": "_threads", "prefill_s": torch.get_num_threads()})
    return rows


def run_cell(args: argparse.Namespace, policy: str, load_procs: int) -> list[dict]:
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=spin, args=(stop,)) for _ in range(load_procs)]
    for p in spinners:
        p.start()
    try:
        argv = [sys.executable, __file__, "--cell", *sys.argv[1:]]
        env = {**os.environ, "OMP_WAIT_POLICY": policy}
        out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    finally:
        stop.set()
        for p in spinners:
            p.join()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--load", type=int, default=2, help="spinning processes in the load")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--policies", nargs="+", default=["PASSIVE", "ACTIVE"])
    parser.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(cell(args)))
        return
    rows = []
    for policy in args.policies:
        quiet = {r["method"]: r for r in run_cell(args, policy, 0)}
        loaded = {r["method"]: r for r in run_cell(args, policy, args.load)}
        for name in args.methods:
            q, c = quiet[name], loaded[name]
            rows.append(
                {
                    "policy": policy,
                    "method": name,
                    "prefill quiet s": round(q["prefill_s"], 3),
                    "prefill loaded s": round(c["prefill_s"], 3),
                    "prefill vs quiet": round(c["prefill_s"] / q["prefill_s"], 2),
                    "decode quiet ms/tok": round(1000 * q["decode_s_per_token"], 1),
                    "decode loaded ms/tok": round(1000 * c["decode_s_per_token"], 1),
                    "decode vs quiet": round(c["decode_s_per_token"] / q["decode_s_per_token"], 2),
                }
            )
        print(f"{policy}: {quiet['_threads']['prefill_s']:.0f} threads", file=sys.stderr)
    started = time.strftime("%Y-%m-%d %H:%M")
    print(f"contention at {args.length} tokens, {args.load} spinning processes ({started})")
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
