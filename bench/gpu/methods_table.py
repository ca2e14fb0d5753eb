"""The model and prompt methods' table (bench/gpu/methods_speed.py) as frames: each model
method against the full cache at the same context, each prompt method against one plain forward
pass of its compressor over the same tokens, and the lines that name what failed, was skipped,
stored no fewer bytes than the full cache or decoded slower than it."""

from __future__ import annotations

import pandas as pd

MB = 2**20
FULL, FORWARD = "full", "forward"  # the reference row of each kind


def _reference(rows: list[dict], kind: str, name: str) -> dict[int, dict]:
    return {
        r["context"]: r
        for r in rows
        if r["kind"] == kind and r["method"] == name and r["status"] == "ok"
    }


def _ratio(value: float, base: dict | None, key: str) -> float | None:
    return value / base[key] if base and base[key] else None


def model_frame(rows: list[dict], bandwidth: float) -> pd.DataFrame:
    """Model rows: times, KV bytes and weights, each against the full cache at the same
    context; the decode floor is (weights + KV after decode) read once at ``bandwidth``."""
    full = _reference(rows, "model", FULL)
    out = []
    for r in (r for r in rows if r["kind"] == "model"):
        row = {k: r[k] for k in ("context", "method", "status")}
        if r["status"] == "ok":
            base = full.get(r["context"])
            floor = (r["weight_bytes"] + r["kv_bytes_final"]) / bandwidth
            row |= {
                "heads": r["heads"],
                "transform s": r["transform_s"],
                "prefill ms": r["prefill_s"] * 1e3,
                "prefill vs full": _ratio(r["prefill_s"], base, "prefill_s"),
                "decode ms/tok": r["decode_s"] * 1e3,
                "decode vs full": _ratio(r["decode_s"], base, "decode_s"),
                "decode vs floor": r["decode_s"] / floor,
                "KV MB": r["kv_bytes"] / MB,
                "KV vs full": _ratio(r["kv_bytes"], base, "kv_bytes"),
                "weights MB": r["weight_bytes"] / MB,
                "peak MB": r["peak_bytes"] / MB,
            }
        out.append(row)
    return pd.DataFrame(out)


def prompt_frame(rows: list[dict]) -> pd.DataFrame:
    """Prompt rows: the time to shorten the prompt against one plain forward pass of the
    compressor over the same tokens, whole and per compressor pass."""
    forward = _reference(rows, "prompt", FORWARD)
    out = []
    for r in (r for r in rows if r["kind"] == "prompt"):
        row = {k: r[k] for k in ("context", "method", "status")}
        if r["status"] == "ok":
            base = forward.get(r["context"])
            vs = _ratio(r["seconds"], base, "seconds")
            row |= {
                "tokens": r["tokens"],
                "kept": r["kept"],
                "passes": r["passes"],
                "chunks": r["chunks"],
                "ms": r["seconds"] * 1e3,
                "vs forward": vs,
                "per pass vs forward": vs / r["passes"] if vs and r["passes"] else None,
            }
        out.append(row)
    return pd.DataFrame(out)


def csv_frame(model: pd.DataFrame, prompt: pd.DataFrame) -> pd.DataFrame:
    """Both kinds in one frame, a ``kind`` column first (the csv)."""
    parts = [f.assign(kind=kind) for kind, f in (("model", model), ("prompt", prompt)) if len(f)]
    if not parts:
        return pd.DataFrame(columns=["kind", "context", "method", "status"])
    frame = pd.concat(parts, ignore_index=True)
    return frame[["kind", *[c for c in frame.columns if c != "kind"]]]


def verdicts(model: pd.DataFrame, prompt: pd.DataFrame) -> list[str]:
    """What failed or was skipped, which model method stored no fewer KV bytes than the full
    cache or decoded slower, and each prompt method's cost in plain forward passes."""
    lines = []
    for r in model.to_dict("records"):
        if r["status"] != "ok" or r["method"] == FULL:
            continue
        if pd.notna(r["KV vs full"]) and r["KV vs full"] >= 1:
            lines.append(f"- {r['method']} at {r['context']}: KV bytes not below the full cache")
        if pd.notna(r["decode vs full"]) and r["decode vs full"] > 1:
            lines.append(
                f"- {r['method']} at {r['context']}: decodes slower than the full cache "
                f"({r['decode vs full']:.2f}x) with {r['KV vs full']:.2f} of its KV bytes"
            )
    for r in prompt.to_dict("records"):
        if r["status"] == "ok" and r["method"] != FORWARD and pd.notna(r["vs forward"]):
            lines.append(
                f"- {r['method']} at {r['context']}: {r['vs forward']:.2f}x one plain forward "
                f"pass, in {r['passes']:.0f} compressor passes"
            )
    for frame in (model, prompt):
        for r in frame.to_dict("records"):
            if r["status"] != "ok":
                lines.append(f"- {r['method']} at {r['context']}: {r['status']}")
    return lines or ["- nothing to name"]


def markdown(header: list[str], model: pd.DataFrame, prompt: pd.DataFrame) -> str:
    """The header, both tables and the named lines."""
    lines = [*header, "", "## Model methods against the full cache", ""]
    lines.append(model.to_markdown(index=False, floatfmt=".3g") if len(model) else "(no rows)")
    lines += ["", "## Prompt methods against one plain forward pass of the compressor", ""]
    lines.append(prompt.to_markdown(index=False, floatfmt=".3g") if len(prompt) else "(no rows)")
    return "\n".join([*lines, "", "Named:", *verdicts(model, prompt), ""])
