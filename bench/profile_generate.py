"""Where the time of one generation goes: torch.profiler's top operators, prefill and decode
apart, for the full cache and cache methods at given context lengths.

    python bench/profile_generate.py --lengths 1024 8192 --methods full h2o --decode-tokens 16

Prompts are the same real text as ``bench/decode_scaling.py``. For each (length, method), one
warm generation runs under ``torch.profiler`` (CPU activities; CUDA too on a GPU) with the
prefill and the decode steps marked as ``record_function`` ranges, and the ``--top`` operators
by self time are printed for each phase. Profiling adds overhead per operator: read the shares,
not the absolute times.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cache_costs import prompt_ids  # noqa: E402
from bench.common import generate  # noqa: E402
from harness.api import build  # noqa: E402


def phase_table(prof, phase: str, top: int) -> str:
    """Operators inside the ``phase`` range, by self CPU time."""
    events = [e for e in prof.events() if _inside(e, phase)]
    totals: dict[str, list[float]] = {}
    for event in events:
        entry = totals.setdefault(event.name, [0.0, 0])
        entry[0] += event.self_cpu_time_total
        entry[1] += 1
    span = sum(e.cpu_time_total for e in prof.events() if e.name == phase)
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    lines = [f"{phase}: {span / 1e3:.0f} ms in the range", "  self ms   share  calls  op"]
    for name, (self_us, calls) in rows:
        lines.append(f"{self_us / 1e3:9.1f} {self_us / max(span, 1):7.1%} {calls:6d}  {name}")
    return "\n".join(lines)


def _inside(event, phase: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == phase:
            return True
        parent = parent.cpu_parent
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--methods", nargs="+", default=["full", "h2o"])
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()

    model, tokenizer = build("model", args.model).load()
    generate(model, tokenizer, None, prompt_ids(tokenizer, 256), 4)  # warm-up
    activities = [ProfilerActivity.CPU]
    if model.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    for length in args.lengths:
        ids = prompt_ids(tokenizer, length)
        for name in args.methods:
            method = None if name == "full" else build("method", name, ratio=args.ratio)
            with profile(activities=activities) as prof:
                out = generate(model, tokenizer, method, ids, args.decode_tokens)
            run = out.generation
            print(
                f"\n== {name} at {length} tokens: prefill {run.prefill_s:.2f} s, decode "
                f"{run.decode_s / max(run.decode_steps, 1) * 1e3:.1f} ms/token (profiled)"
            )
            for phase in ("prefill", "decode"):
                print(phase_table(prof, phase, args.top))


if __name__ == "__main__":
    main()
