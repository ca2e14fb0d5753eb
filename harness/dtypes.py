"""``model.dtype``: the weights' dtype, and what ``auto`` (the default) stands for.

``auto`` is resolved from the config alone, never from the machine: ``bfloat16`` when
``model.device`` is a CUDA device, ``float32`` on the CPU. So a config means one computation
wherever it runs, and the run hash (``harness.records.config_hash``) is taken over the
resolved name: ``dtype: auto`` and the dtype it stands for are the same run (CPU records
written with ``float32`` keep their run ids), while a CPU and a GPU run never share one
(``model.device`` differs). A GPU without bfloat16 is refused before the weights load
(:class:`harness.models.ModelSpec`) rather than silently given another dtype.

No torch import here: the records (and the report, which reads them) use this too.
"""

from __future__ import annotations

DTYPE_NAMES = ("float32", "float16", "bfloat16")
AUTO = "auto"


def is_cuda(device: str) -> bool:
    """Whether ``device`` (``cpu``, ``cuda``, ``cuda:N``) names a CUDA device."""
    return str(device).split(":")[0] == "cuda"


def resolve_dtype(dtype: str, device: str) -> str:
    """The dtype name ``dtype`` stands for on ``device``: ``auto`` is ``bfloat16`` on CUDA
    and ``float32`` elsewhere; any other name is itself."""
    if dtype != AUTO:
        return dtype
    return "bfloat16" if is_cuda(device) else "float32"
