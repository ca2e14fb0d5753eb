"""The one error a method raises for a bad configuration, and the check of a ratio field
(both importable from ``methods.base``)."""

from __future__ import annotations


class MethodConfigError(ValueError):
    """A method's configuration is invalid; the message names the field and the fix."""


def check_ratio(name: str, value: float | None, *, allow_none: bool = False) -> None:
    """Fail unless ``value`` is in (0, 1] (the fraction of the KV cache kept)."""
    if value is None and allow_none:
        return
    if value is None or not (0.0 < float(value) <= 1.0):
        raise MethodConfigError(
            f"method.{name}={value!r} is outside (0, 1]: it is the fraction of the KV cache "
            f"kept (1.0 keeps everything); pass e.g. method.{name}=0.2"
        )
