"""Which kernel torch's ``scaled_dot_product_attention`` runs (``model.sdpa_backend``).

Left to itself, torch may pick cuDNN attention on a recent GPU, which builds an execution
plan for every new input shape: with a new prompt length at nearly every request, each
request paid the planning (1.7-2.7 s against 0.21-0.32 s with flash, on an H200). So on
CUDA ``auto`` asks for flash where it can run (16-bit weights, head_dim <= 256, compute
capability >= 8.0), else memory-efficient attention, with the math kernel last for the
calls neither takes; cuDNN only when named. On the CPU ``auto`` leaves the choice to torch.

A named backend is the only one allowed: a call it cannot run fails (torch's error), so what
it cannot run is refused before the weights load (:func:`resolve`: a float32 model or a
head_dim over 256 for flash, a sliding-window model's masks, CUDA-only kernels on the CPU). The choice is entered around every
forward pass of the model (:func:`attach`: forward hooks, so ``model.generate``, lm-eval's
calls and kvbench's own all run under it).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
DEFAULT = "default"  # ``auto`` on the CPU: torch's own choice
FLASH_MAX_HEAD_DIM = 256
SIXTEEN_BIT = ("float16", "bfloat16")
_HAS_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters


class SdpaBackendError(ValueError):
    """``model.sdpa_backend`` cannot run this model here; the message names what can."""


def head_dim(config: Any) -> int:
    """The attention head dim of a transformers config (``head_dim``, else hidden / heads)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    explicit = getattr(config, "head_dim", None)
    return int(explicit or config.hidden_size // config.num_attention_heads)


def has_sliding_layers(config: Any) -> bool:
    """Whether some layer attends through a sliding window (its calls carry a mask)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return "sliding_attention" in (getattr(config, "layer_types", None) or [])


def _flash_blocker(device: str, dtype: str, dim: int, sliding: bool) -> str | None:
    """Why torch's flash kernel cannot run this model on ``device`` (None: it can)."""
    if device.startswith("cuda"):
        if dtype not in SIXTEEN_BIT:
            return f"needs 16-bit weights, got model.dtype={dtype}"
        if torch.cuda.get_device_capability(_index(device)) < (8, 0):
            return "needs a GPU of compute capability >= 8.0"
    if dim > FLASH_MAX_HEAD_DIM:
        return f"takes head_dim <= {FLASH_MAX_HEAD_DIM}, the model's is {dim}"
    if sliding:
        return "takes no attention mask, which the model's sliding-window layers need"
    return None


def resolve(choice: str, device: str, dtype: str, config: Any) -> str:
    """The backend ``choice`` runs: ``auto`` resolved (``flash``, ``efficient`` on CUDA,
    ``default`` on the CPU), a named one checked (:class:`SdpaBackendError` if it cannot
    run: one line naming the field, why, and what runs instead)."""
    cuda = device.startswith("cuda")
    dim, sliding = head_dim(config), has_sliding_layers(config)
    flash_blocker = _flash_blocker(device, dtype, dim, sliding)
    instead = ("flash" if flash_blocker is None else "efficient") if cuda else DEFAULT
    if choice == "auto":
        return instead
    field = f"model.sdpa_backend={choice}"
    hint = f"use model.sdpa_backend=auto (runs {instead} here) or math"
    if choice in ("efficient", "cudnn") and not cuda:
        raise SdpaBackendError(f"{field} runs on CUDA only (model.device={device}): {hint}")
    if choice == "flash" and flash_blocker is not None:
        raise SdpaBackendError(f"{field} {flash_blocker}: {hint}")
    if choice == "cudnn" and (dtype not in SIXTEEN_BIT or sliding):
        why = "takes no sliding-window mask" if sliding else f"needs 16-bit, got {dtype}"
        raise SdpaBackendError(f"{field} {why}: {hint}")
    return choice


def kernels(choice: str, resolved: str) -> list[SDPBackend] | None:
    """The kernels allowed, in priority order (None: torch's own choice). ``auto``: its
    resolution first, then the memory-efficient and math kernels for the calls it cannot
    take (a masked call: a prompt compressor's chunked prefill); a named backend alone."""
    if resolved == DEFAULT:
        return None
    if choice != "auto":
        return [KERNELS[choice]]
    order = ["flash", "efficient", "math"]
    return [KERNELS[name] for name in order[order.index(resolved) :]]


class _Entered:
    """Enters ``sdpa_kernel(backends)`` before a forward pass and leaves it after."""

    def __init__(self, backends: list[SDPBackend]) -> None:
        self.backends = backends
        self.open: list[Any] = []

    def enter(self, module: nn.Module, args: Any) -> None:
        context = (
            sdpa_kernel(self.backends, set_priority=True)
            if _HAS_PRIORITY
            else sdpa_kernel(self.backends)  # torch < 2.6: its own order, flash first
        )
        context.__enter__()
        self.open.append(context)

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.open.pop().__exit__(None, None, None)


def attach(model: nn.Module, choice: str, resolved: str) -> None:
    """Run every forward pass of ``model`` under the kernels of ``choice`` (resolved as
    ``resolved``; nothing for ``default``). The hooks stay with the model (and its copies)."""
    allowed = kernels(choice, resolved)
    if allowed is None:
        return
    entered = _Entered(allowed)
    model.register_forward_pre_hook(entered.enter)
    model.register_forward_hook(entered.leave, always_call=True)


def _index(device: str) -> int:
    return int(device.partition(":")[2] or 0)
