"""The method interface: three kinds of KV reduction, one small dataclass each.

| kind   | acts on                                  | hook the runner calls                       |
|--------|------------------------------------------|---------------------------------------------|
| prompt | the request text before tokenising        | ``prepare(model, tokenizer)``, ``compress(prompt)`` |
| cache  | the KV cache while a request is processed | ``apply(model)`` context manager            |
| model  | the attention weights and shapes, once    | ``apply(model, tokenizer)``                 |

A method validates its own fields in ``__post_init__`` (so a bad config fails before
any model loads) and, where it depends on the model's shapes, in
``validate_for(config)``, which the runner calls with the model's ``PretrainedConfig``
before the weights load. Methods are built by Hydra from ``_target_``; several methods
compose through :class:`Compose` (a list in the config).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


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


@dataclass
class Method:
    """Base of every method. ``name`` labels the method in records and reports."""

    kind: ClassVar[str] = "abstract"
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            self.name = type(self).__name__.lower()

    def validate_for(self, config: Any) -> None:
        """Check the method against the model's config before the weights load."""

    def params(self) -> dict[str, Any]:
        """The method's fields, for records and reports (JSON-serialisable)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "name" or isinstance(value, Method | list):
                continue
            out[f.name] = value
        return out

    def flatten(self) -> list[Method]:
        return [self]


@dataclass
class PromptParts:
    """A request's prompt split into what a prompt method may shorten and what it must keep.

    ``compressible`` holds the task description, the few-shot demonstrations or the long
    context; ``protected`` holds the final question and the answer-format line and is
    never changed. ``compressible + protected`` is the original prompt.
    """

    compressible: str
    protected: str

    @property
    def text(self) -> str:
        return self.compressible + self.protected


@dataclass
class PromptMethod(Method):
    """Shortens the text of each request before it is tokenised."""

    kind: ClassVar[str] = "prompt"

    def prepare(self, model: nn.Module, tokenizer: Any) -> None:
        """Called once with the benchmarked model (a compressor may reuse it)."""

    def compress(self, prompt: PromptParts) -> str:
        """Return the prompt to send to the model (``prompt.protected`` kept verbatim)."""
        raise NotImplementedError

    def last_stats(self) -> dict[str, float] | None:
        """What the last :meth:`compress` call asked for and did, for the records:
        ``requested_rate`` and ``achieved_rate`` (fractions of the compressible tokens
        removed, in the method's own tokens), ``compressor_tokens``, ``compressor_passes``,
        ``compress_s``. None when the method reports nothing."""
        return None


@dataclass
class CacheMethod(Method):
    """Shrinks the KV cache while a request runs, through forward hooks on the attention
    modules that are registered in :meth:`apply` and always removed on exit.

    Subclasses implement :meth:`compress` (called once per layer after the prefill of a
    request) and, if they keep a budget while decoding, :meth:`compress_decode`.
    They replace the cache layer's ``keys``/``values`` with smaller tensors (never a
    mask): the stored bytes are what the measurements see.
    """

    kind: ClassVar[str] = "cache"

    @contextmanager
    def apply(self, model: nn.Module) -> Iterator[None]:
        handles = []
        try:
            for module in attention_modules(model):
                handles.append(module.register_forward_hook(self._forward_hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        cache = cache_of(kwargs)
        if cache is None:  # never silently a no-op: the method would measure the full cache
            raise RuntimeError(
                f"{self.name}: attention layer {module.layer_idx} was called without a KV cache "
                "(kvbench looks for `cache` or `past_key_values` in its arguments): run the model "
                "with a Cache, or check how this transformers version passes it"
            )
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        layer = cache.layers[module.layer_idx]
        q_len = hidden_states.shape[1]
        if not self.compresses_layer(module, layer):
            return output
        if layer.get_seq_length() == q_len and q_len > 1:
            keys, values = self.compress(module, hidden_states, layer.keys, layer.values, kwargs)
        else:
            keys, values = self.compress_decode(
                module, hidden_states, layer.keys, layer.values, kwargs
            )
        # `compress` may have installed its own cache layer (a compressed form): re-fetch it
        layer = cache.layers[module.layer_idx]
        layer.keys, layer.values = keys, values
        return output

    def compresses_layer(self, module: nn.Module, layer: Any) -> bool:
        """Whether this method acts on a layer. Default: not on sliding-window layers,
        whose cache is already bounded by the window (Gemma-3's local layers)."""
        return not hasattr(layer, "sliding_window")

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """After prefill. hidden_states (B, S, hidden); keys/values (B, H_kv, S, D).
        Returns the tensors to store, (B, H_kv, S', D) with S' <= S. It may replace
        ``cache_of(kwargs).layers[module.layer_idx]`` by its own cache layer class;
        the returned tensors are then set as that new layer's ``keys``/``values``."""
        return keys, values

    def compress_decode(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """After each decoding step (hidden_states (B, 1, hidden)). Default: keep all."""
        return keys, values


@dataclass
class ModelMethod(Method):
    """Changes the model's attention once, before evaluation (e.g. smaller heads)."""

    kind: ClassVar[str] = "model"

    def apply(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        raise NotImplementedError


@dataclass
class Compose(Method):
    """Several methods at once, e.g. a prompt method and a cache method.

    Model methods are applied in list order; prompt methods run in list order on each
    request; every cache method's hooks are registered and act in list order per layer.
    """

    methods: list[Method] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = "+".join(m.name for m in self.methods) or "full"
        for m in self.methods:
            if not isinstance(m, Method):
                raise MethodConfigError(
                    f"method.methods holds {m!r}, which is not a kvbench method: each entry "
                    "needs a `_target_` naming a class from methods/"
                )

    def validate_for(self, config: Any) -> None:
        for m in self.methods:
            m.validate_for(config)

    def params(self) -> dict[str, Any]:
        return {m.name: m.params() for m in self.methods}

    def flatten(self) -> list[Method]:
        return [leaf for m in self.methods for leaf in m.flatten()]


def cache_of(kwargs: dict) -> Any:
    """The KV cache (a transformers ``Cache``) an attention module was called with, or None:
    transformers >= 5.24 passes it as ``cache``, earlier versions as ``past_key_values``."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a decoder, in layer order (those with ``layer_idx``)."""
    found = [
        m
        for name, m in model.named_modules()
        if name.endswith("self_attn") and hasattr(m, "layer_idx")
    ]
    if not found:
        raise MethodConfigError(
            f"{type(model).__name__} has no `*.self_attn` modules with a `layer_idx`: "
            "kvbench's cache methods support decoder-only transformers models"
        )
    return sorted(found, key=lambda m: m.layer_idx)
