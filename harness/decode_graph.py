"""Capturing the decoding step (``model.decode_capture``): one greedy step of the model over
a :class:`~harness.static_cache.StaticCache`, recorded once and replayed for every token.

Eager decoding pays Python and kernel launches per layer per token: on an H200, 1.47x the
time of transformers' static cache at 8k and 7.9-10.7x the copy-bandwidth floor (issue 23).
A captured step launches once. Two ways to capture the same step:

- ``graph``: a CUDA graph (``torch.cuda.CUDAGraph``), warmed up on a side stream first;
- ``replay``: the CPU's stand-in. The step's aten operations are recorded as they run (a
  ``TorchDispatchMode``) and replayed, with their arguments as recorded, on the same tensors.
  Like a CUDA graph, it bakes in every Python value the step computed while it was recorded,
  so a step that reads Python state that changes per token decodes wrong tokens here, on the
  CPU, in CI; and it refuses reading a device value on the host (``.item()``, ``nonzero``),
  which a CUDA graph cannot capture. It is no faster than eager decoding.

What can be captured is decided before the model loads (:func:`plan`): CUDA graphs on CUDA
(``auto``), unless a cache method changes the cache while decoding (H2O, SpindleKV), the
attention is not sdpa, the layers soft-cap their logits, or the sdpa backend named takes no
mask; those decode eagerly, and the record says why (``provenance.decode_capture``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from harness.static_cache import LayerShape, StaticCache, capacity, static_attention
from methods.base import CacheMethod, Method, cache_kwarg
from methods.cache.attention import attention_override
from methods.cache.layers import attention_modules, cache_methods_bypassed

CHOICES = ("auto", "graph", "replay", "off")
CAPTURED = ("graph", "replay")  # the plans that capture (the others: "eager: <why>")
EAGER = "eager"

_aten = torch.ops.aten
HOST_READS = (_aten.item, _aten._local_scalar_dense, _aten.is_nonzero, _aten.nonzero, _aten.equal)


class CaptureError(RuntimeError):
    """A decoding step that cannot be captured: it reads a device value on the host."""


def plan(
    choice: str, device: str, method: Method, config: Any, attn: str, sdpa_backend: str
) -> str:
    """How requests decode: ``graph``, ``replay`` or ``eager: <why>``. ``choice`` is
    ``model.decode_capture``: ``auto`` (CUDA graphs on CUDA where the method allows, else
    eagerly), ``graph`` (CUDA graphs, or refused), ``replay`` (the CPU's stand-in, for tests)
    or ``off``. ``device`` is ``model.device``, or ``device_map`` for a model spread over
    devices (``model.device_map``: eager decoding, one device's step cannot be captured). A
    ``graph`` or ``replay`` that cannot be had raises ``ValueError`` (one line, naming the
    field and what to use instead)."""
    if choice not in CHOICES:
        raise ValueError(unknown(choice))
    if choice == "off":
        return f"{EAGER}: model.decode_capture=off"
    if device == "device_map":
        if choice != "auto":
            raise ValueError(
                f"model.decode_capture={choice} captures one device's step, and "
                "model.device_map spreads the model over several: use auto (decodes eagerly)"
            )
        return f"{EAGER}: model.device_map spreads the model over devices"
    if choice == "auto" and not device.startswith("cuda"):
        return f"{EAGER}: CUDA graphs need CUDA (model.device={device})"
    why = why_eager(method, config, attn, sdpa_backend)
    if why is not None:
        if choice != "auto":
            raise ValueError(f"model.decode_capture={choice}: {why}; use auto (decodes eagerly)")
        return f"{EAGER}: {why}"
    if choice == "graph" and not device.startswith("cuda"):
        raise ValueError(
            f"model.decode_capture=graph captures CUDA graphs, and model.device={device}: use "
            "auto, or replay (the CPU's stand-in, for tests: no faster than eager)"
        )
    return "graph" if choice in ("auto", "graph") else "replay"


def unknown(choice: str) -> str:
    return f"model.decode_capture={choice!r} is unknown: use one of {', '.join(CHOICES)}"


def why_eager(method: Method, config: Any, attn: str, sdpa_backend: str) -> str | None:
    """Why the decoding step cannot be captured for ``method`` on this model, wherever it runs
    (None: it can)."""
    for member in method.flatten():
        if isinstance(member, CacheMethod) and member.acts_while_decoding:
            return f"method {member.name} changes the cache while decoding"
    if attn != "sdpa":
        return f"a captured step runs sdpa attention, and model.attn_implementation={attn}"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "attn_logit_softcapping", None):
        return "the model soft-caps its attention logits, which the captured step does not"
    if sdpa_backend in ("flash", "cudnn"):
        return f"model.sdpa_backend={sdpa_backend} takes no mask, which the captured step needs"
    return None


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in HOST_READS:
            raise CaptureError(
                f"the decoding step reads a device value on the host ({func}): a CUDA graph "
                "cannot capture it; keep the value on the device"
            )
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))  # holds every tensor: ids stay unique
        return out


def _tensor_id(x: Any) -> int | None:
    return id(x) if isinstance(x, torch.Tensor) else None


class Replay:
    """The CPU's stand-in for a CUDA graph of ``step`` (see the module docstring)."""

    def __init__(self, step: Callable[[], None], state: list[torch.Tensor]) -> None:
        saved = [t.clone() for t in state]
        recorder = _Recorder()
        with recorder:
            step()
        for tensor, value in zip(state, saved, strict=True):  # recording ran the step once
            tensor.copy_(value)
        # each op's arguments as recorded, but a tensor an earlier op made is read from its
        # slot (what that op makes when replayed); every other argument is as it was
        slots: dict[int, int] = {}
        self.program: list[tuple] = []
        self.slots = 0
        for func, args, kwargs, out in recorder.ops:
            flat, spec = tree_flatten((args, kwargs))
            reads = [(i, slots[id(x)]) for i, x in enumerate(flat) if _tensor_id(x) in slots]
            for i, _ in reads:
                flat[i] = None  # not held: it is read from its slot
            writes = []
            for j, x in enumerate(tree_flatten(out)[0]):
                if isinstance(x, torch.Tensor):
                    writes.append((j, self.slots))
                    slots[id(x)] = self.slots
                    self.slots += 1
            self.program.append((func, flat, spec, reads, writes))

    def replay(self) -> None:
        made: list[Any] = [None] * self.slots
        for func, flat, spec, reads, writes in self.program:
            if reads:
                flat = list(flat)
                for i, slot in reads:
                    flat[i] = made[slot]
            args, kwargs = tree_unflatten(flat, spec)
            result = func(*args, **kwargs)
            if writes:
                results = tree_flatten(result)[0]
                for j, slot in writes:
                    made[slot] = results[j]


class Graph:
    """``step`` captured in a CUDA graph, after a warm-up run on a side stream (which
    initialises lazy state such as cuBLAS workspaces); ``state`` is restored after it."""

    def __init__(self, step: Callable[[], None], state: list[torch.Tensor]) -> None:
        saved = [t.clone() for t in state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        for tensor, value in zip(state, saved, strict=True):
            tensor.copy_(value)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records the kernels without running them
            step()

    def replay(self) -> None:
        self.graph.replay()


class CapturedStep:
    """A greedy decoding step of ``model`` over its own :class:`StaticCache`, captured:
    :meth:`replay` feeds :attr:`token` at :attr:`position`, leaves the logits in
    :attr:`logits` and the next token in :attr:`token`, and moves both on by one."""

    def __init__(self, model: nn.Module, shapes: tuple[LayerShape, ...], mode: str) -> None:
        device = next(model.parameters()).device
        self.shapes = shapes
        self.cache = StaticCache(model, shapes)
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros((1, 1), dtype=torch.long, device=device)
        vocab = model.get_output_embeddings().weight.shape[0]
        self.logits = torch.zeros(vocab, dtype=torch.float32, device=device)
        self._model = model
        self._modules = attention_modules(model)
        self._attend = static_attention(self.cache, device.type == "cuda")
        # a 4-D mask makes transformers skip building its own: the step's attention masks
        self._mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
        state = [self.token, self.position, *(layer.length for layer in self.cache.layers)]
        self._captured = (Graph if mode == "graph" else Replay)(self._step, state)

    def _step(self) -> None:
        # cache methods that can be captured do nothing while decoding: their hooks sit out
        with cache_methods_bypassed(), attention_override(self._modules, self._attend, True):
            out = self._model(
                input_ids=self.token,
                position_ids=self.position,
                attention_mask=self._mask,
                **cache_kwarg(self._model, self.cache),
                use_cache=True,
                logits_to_keep=1,
            )
        logits = out.logits[0, -1]
        self.logits.copy_(logits)
        self.token.copy_(logits.argmax().view(1, 1))
        self.position.add_(1)

    def start(self, cache: Any, token: int, position: int) -> int:
        """Load a prefilled dynamic ``cache`` (whose tensors it drops), the first new
        ``token`` and its ``position``; returns the cache's ``get_seq_length()``."""
        seen = self.cache.load(cache)
        self.token.fill_(token)
        self.position.fill_(position)
        return seen

    def replay(self) -> None:
        self._captured.replay()


class DecodeGraphs:
    """A session's captured decoding steps, reused while requests have their shapes: the
    ``keep`` last used (2: a generation's and the scoring of its reference answer, which a
    cache method runs token by token). Their buffers stay allocated between requests, and a
    prefill that fits writes into them (:meth:`buffers_for`). ``mode``: ``graph`` or
    ``replay``."""

    def __init__(self, mode: str, keep: int = 2) -> None:
        if mode not in CAPTURED or keep < 1:
            raise ValueError(f"mode={mode!r}, keep={keep}: use one of {CAPTURED}, keep >= 1")
        self.mode, self.keep = mode, keep
        self.steps: dict[tuple[LayerShape, ...], CapturedStep] = {}  # least recent first
        self.captures = 0  # steps captured so far (a new shape: a new capture)

    @property
    def step(self) -> CapturedStep | None:
        """The step used last."""
        return next(reversed(self.steps.values()), None)

    def buffers_for(
        self, tokens: int, reserve: int
    ) -> list[tuple[torch.Tensor, torch.Tensor] | None] | None:
        """For a prefill of ``tokens`` with ``reserve`` to come: each full-attention layer's
        buffers where a captured step's capacity is the one that request needs."""
        need = capacity(tokens + reserve)  # an uncompressed layer's, as after_prefill counts
        for step in reversed(self.steps.values()):
            fits = [
                buffers if shape.window is None and shape.capacity == need else None
                for shape, buffers in zip(step.shapes, step.cache.buffers(), strict=True)
            ]
            if any(f is not None for f in fits):
                return fits
        return None

    def start(
        self, model: nn.Module, cache: Any, token: int, position: int, reserve: int
    ) -> tuple[CapturedStep, int]:
        """The captured step for a prefilled ``cache`` (captured now if its shapes are new)
        with ``token`` at ``position`` loaded; and the cache's ``get_seq_length()``."""
        shapes = tuple(LayerShape.after_prefill(layer, reserve) for layer in cache.layers)
        step = self.steps.pop(shapes, None)
        if step is None:
            while len(self.steps) >= self.keep:  # free before making the new one
                del self.steps[next(iter(self.steps))]
            step = CapturedStep(model, shapes, self.mode)
            self.captures += 1
        self.steps[shapes] = step
        return step, step.start(cache, token, position)

    def close(self) -> None:
        self.steps.clear()


@contextmanager
def decode_steps(capture: str | DecodeGraphs | None) -> Iterator[DecodeGraphs | None]:
    """The captured steps requests decode in: for a plan of ``graph`` or ``replay`` (from
    ``ModelSpec.decode_plan``), new ones, freed on exit; a :class:`DecodeGraphs` the caller
    holds across sessions of one model and method (a benchmark's requests), as it is; for
    anything else (``eager: ...``, None), None: requests decode eagerly."""
    if isinstance(capture, DecodeGraphs) or capture not in CAPTURED:
        yield capture if isinstance(capture, DecodeGraphs) else None
        return
    graphs = DecodeGraphs(capture)
    try:
        yield graphs
    finally:
        graphs.close()  # its buffers and graph
