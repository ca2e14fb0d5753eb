"""A CPU stand-in for a GPU's host boundary, for tests: :class:`OnDevice` tensors.

On a CUDA device, ``tensor.numpy()`` and ``np.asarray(tensor)`` raise ``TypeError: can't
convert cuda:0 device type tensor to numpy``, while ``.item()``, ``.tolist()``, ``bool()``,
``int()``, ``.nonzero()`` and ``.cpu()`` work but wait for the GPU (a host sync). On the CPU
all of these are free and silent, so a host-only call on a device tensor passes CI and fails
on the first GPU (SpindleKV's ``hits[:, 0].numpy()`` in ``Neighbours.among`` did).

:func:`guard` turns a model's parameters and buffers into :class:`OnDevice` tensors, a
``torch.Tensor`` subclass that stays a CPU tensor for every computation but spreads to every
tensor computed from it (``__torch_function__``), as the device does, and then:

- refuses ``.numpy()`` / ``__array__`` with CUDA's own error (``.numpy(force=True)``, which
  copies, is allowed: it works on CUDA);
- counts the host syncs a GPU would make (:data:`SYNCS`), per call name, in ``OnDevice.syncs``;
- returns a plain tensor from ``.cpu()`` and ``.to("cpu")``: the explicit host copy, after
  which NumPy is fine. (``.to(device)`` with a ``torch.device`` stays "on the device": on
  the CPU the model's device and the host are the same ``torch.device("cpu")``.)

Tensors made by factories (``torch.tensor(..., device=...)``) start plain; they become
:class:`OnDevice` as soon as they meet the model's tensors, which is everything a method
stores or scores. So the guard finds the host-only calls on anything derived from the
model's activations: a miss is possible only on a tensor that never touched them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

import torch
from torch import nn

# the Tensor methods that, on a CUDA tensor, copy to the host and wait for the GPU
SYNCS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__int__: "int",
    torch.Tensor.__float__: "float",
    torch.Tensor.__index__: "index",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.nonzero: "nonzero",
    torch.nonzero: "nonzero",
    torch.Tensor.numpy: "numpy(force)",
}
REFUSED = (torch.Tensor.numpy, torch.Tensor.__array__)


class OnDevice(torch.Tensor):
    """A CPU tensor that answers host access as a CUDA tensor does (module docstring)."""

    syncs: ClassVar[Counter] = Counter()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in REFUSED and not kwargs.get("force"):
            raise TypeError(
                "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy "
                "the tensor to host memory first. (tests/host_guard.py: a GPU fails here)"
            )
        host = func is torch.Tensor.cpu or (func is torch.Tensor.to and _to_host(args, kwargs))
        if func in SYNCS or host:
            cls.syncs[SYNCS.get(func, "to(cpu)")] += 1
        out = super().__torch_function__(func, types, args, kwargs)
        return out.as_subclass(torch.Tensor) if host else out

    def __deepcopy__(self, memo: dict) -> torch.Tensor:
        """A copy on the same "device" (model surgery deep-copies layers and parameters)."""
        with torch._C.DisableTorchFunctionSubclass():
            copied = self.clone().as_subclass(OnDevice)
        if getattr(self, "_is_param", False):
            copied = nn.Parameter(copied, requires_grad=self.requires_grad)
        memo[id(self)] = copied
        return copied


def _to_host(args: tuple, kwargs: dict) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` names the host as a string (``"cpu"``)."""
    return any(isinstance(a, str) and a == "cpu" for a in (*args[1:], kwargs.get("device")))


def guard(model: nn.Module) -> nn.Module:
    """``model`` with its parameters and buffers made :class:`OnDevice`, in place."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = nn.Parameter(
                    param.detach().as_subclass(OnDevice), requires_grad=param.requires_grad
                )
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = buffer.as_subclass(OnDevice)
    return model


def count_syncs(run: Any) -> Counter:
    """The host syncs (by call name) that ``run()`` makes on :class:`OnDevice` tensors."""
    OnDevice.syncs.clear()
    run()
    return Counter(OnDevice.syncs)
