"""Reading values out of records: what counts as a number, and nested-dict lookup."""

from __future__ import annotations

import math
from typing import Any


def is_number(value: Any, finite: bool = True) -> bool:
    """An int or float, not a bool; NaN and infinity count as absent unless ``finite=False``
    (aggregation averages them, so a NaN measurement stays visible in the mean)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    return not finite or math.isfinite(value)


def get(data: Any, *keys: str) -> Any:
    """``data[k1][k2]...``, None as soon as a level is missing or not a dict."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data
