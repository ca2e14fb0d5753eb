"""One ratio convention in the report: ``ratio`` is the fraction kept, for every method kind.

Prompt methods were once configured with ``rate``, the fraction of the compressible prompt
tokens removed. :func:`normalise_params` rewrites such a record's params to ``ratio`` (kept)
as soon as the report reads it, so an old record and a new one of the same setting get the
same params, label and ``prompt_kept`` column.
"""

from __future__ import annotations

import math
from typing import Any


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def is_prompt_params(params: dict[str, Any]) -> bool:
    """Whether a method's own params dict is a prompt method's (they name a ``compressor``;
    old ones a ``rate``)."""
    return "compressor" in params or "rate" in params


def normalise_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """``params`` with every prompt method's ``rate`` (fraction removed) turned into ``ratio``
    (fraction kept, ``1 - rate`` rounded to 12 digits); composed methods' members too."""
    out: dict[str, Any] = {}
    for key, value in (params or {}).items():
        out[key] = normalise_params(value) if isinstance(value, dict) else value
    if not is_prompt_params(out):
        return out
    rate = _number(out.pop("rate", None))
    if not math.isnan(rate) and math.isnan(_number(out.get("ratio"))):
        out["ratio"] = round(1.0 - rate, 12)
    return out


def prompt_kept(params: dict[str, Any] | None) -> float:
    """The fraction of the compressible prompt kept that a prompt method was configured with
    (the first prompt method's ``ratio``, depth first, old ``rate`` converted); NaN if none."""
    stack = [params or {}]
    while stack:
        current = stack.pop(0)
        if is_prompt_params(current):
            return _number(normalise_params(current).get("ratio"))
        stack.extend(v for v in current.values() if isinstance(v, dict))
    return math.nan


def kv_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """``params`` without its prompt methods' dicts: where the KV ``ratio`` is looked up."""
    out = {k: kv_params(v) for k, v in (params or {}).items() if isinstance(v, dict)}
    if is_prompt_params(params or {}):
        return out
    return {**{k: v for k, v in (params or {}).items() if not isinstance(v, dict)}, **out}
