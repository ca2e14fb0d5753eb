"""The GPU speed table's rows as a frame: each (context, workload, method) with its ratios to
the full cache at the same context and workload and to the floors of bench/gpu/ceilings.py,
and the lines that name what failed, was skipped, or is slower than the full cache."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.gpu import ceilings

MB = 2**20


def table(rows: list[dict], weights: int, config, ceiling: dict) -> pd.DataFrame:
    """The rows with their ratios to the full cache and to the floors."""

    def cell(r: dict) -> tuple[int, str]:
        return r["context"], r["workload"]

    full = {cell(r): r for r in rows if r["method"] == "full" and r["status"] == "ok"}
    out = []
    for r in rows:
        base = full.get(cell(r))
        row = {k: r[k] for k in ("context", "workload", "method", "status")}
        row["decode"] = r.get("decode")
        if r["status"] == "ok":
            same_prompts = base is not None and r["workload"] == "repeat"
            flops = ceilings.prefill_flops(config, round(r["prompt_tokens"]))
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
                "request ms": r["wall_s"] * 1e3,
                "request vs full": r["wall_s"] / base["wall_s"] if base else None,
                "capture ms": r.get("capture_s", 0.0) * 1e3,
                "same tokens": r["tokens"] == base["tokens"] if same_prompts else None,
                "requests": r["repeats"],
            }
        out.append(row)
    return pd.DataFrame(out)


def with_op_counts(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The frame with ``ops/step`` and ``ops vs full`` per method from bench/gpu/op_counts.py's
    csv at ``path`` (counted at one context; the columns are absent without that file)."""
    if not path.is_file():
        return frame
    ops = pd.read_csv(path)[["method", "ops/step", "ops vs full"]]
    return frame.merge(ops, on="method", how="left")


def verdicts(frame: pd.DataFrame) -> list[str]:
    """The lines a reader needs: which methods failed or were skipped, which are slower than
    the full cache."""
    lines = []
    ok = frame[frame["status"] == "ok"]
    if "decode vs full" in ok:
        slow = ok[(ok["method"] != "full") & (ok["decode vs full"] > 1.0)]
        for _, r in slow.iterrows():
            lines.append(
                f"- slower than the full cache at decode: {r['method']} at {r['context']} tokens, "
                f"{r['workload']} ({r['decode vs full']:.2f}x)"
            )
        slow = ok[(ok["method"] != "full") & (ok["prefill vs full"] > 1.0)]
        for _, r in slow.iterrows():
            lines.append(
                f"- slower prefill (compression included): {r['method']} at {r['context']} "
                f"tokens, {r['workload']} ({r['prefill vs full']:.2f}x)"
            )
    for _, r in frame[frame["status"] != "ok"].iterrows():
        lines.append(f"- {r['method']} at {r['context']} tokens, {r['workload']}: {r['status']}")
    return lines or ["- every method ran at every context and none was slower than the full cache"]
