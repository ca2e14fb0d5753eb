"""The one error a method raises for a bad configuration (importable from ``methods.base``)."""

from __future__ import annotations


class MethodConfigError(ValueError):
    """A method's configuration is invalid; the message names the field and the fix."""
