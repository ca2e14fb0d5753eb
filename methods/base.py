"""The method interface: three kinds of KV reduction, one small dataclass each, one way in.

| kind   | acts on                                  | what it implements                          |
|--------|------------------------------------------|---------------------------------------------|
| prompt | the request text before tokenising        | ``prepare(model, tokenizer)``, ``shorten_text(prompt)`` |
| cache  | the KV cache while a request is processed | ``reduce_kv(...)`` per layer, in ``hooks(model)`` |
| model  | the attention weights and shapes, once    | ``transform(model, tokenizer)``: the new model |

Every method, of any kind, and every :class:`Compose` of methods is used the same way::

    with method.applied(model, tokenizer) as model:   # model methods may return a new model
        text = method.shorten(parts).text              # prompt methods (others: unchanged)
        model(...)                                     # cache methods act through their hooks

:meth:`Method.enter` is the one mechanism underneath (``harness.session.apply`` builds its
measured session on it); callers never ask what kind of method they hold.

A method validates its fields in ``__post_init__``, the model's shapes in
``validate_for(config)`` and where the model runs in ``validate_runtime(device, dtype,
attn_implementation)``, all before the weights load. Methods are built by Hydra from
``_target_``; several compose through :class:`Compose` (a list in the config).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from methods.cache.layers import (  # noqa: F401 (cache_kwarg: re-export)
    EvictedSlidingWindowLayer,
    LayerLog,
    attention_modules,
    bypassed,
    cache_kwarg,
    cache_methods_bypassed,
    cache_of,
    forward_phase,
    is_sliding,
)
from methods.errors import MethodConfigError, check_ratio  # noqa: F401 (check_ratio: re-export)
from methods.prompt.parts import PromptParts


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

    def validate_runtime(
        self, device: str | torch.device, dtype: torch.dtype, attn_implementation: str
    ) -> None:
        """Check the method can run where the model will: ``device`` (``cpu``, ``cuda``,
        ``cuda:N``), the weights' ``dtype`` and the attention implementation. Raises
        :class:`MethodConfigError` naming the field to change; by default anything goes."""

    def params(self) -> dict[str, Any]:
        """The method's fields, for records and reports (JSON-serialisable)."""
        fields = ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        return {k: v for k, v in fields if k != "name" and not isinstance(v, Method | list)}

    def flatten(self) -> list[Method]:
        return [self]

    def describe(self) -> dict[str, Any]:
        """Static facts about the method as applied, beyond its fields (e.g. KV-Latent's
        ``d_qk``/``d_vo`` and whether it was ``trained``), for the record; {} if none."""
        return {}

    def last_stats(self) -> dict[str, Any] | None:
        """What the method did on the last request (e.g. a cache method's per-layer kept
        tokens, a prompt method's achieved rate), for the record; None if it says nothing.
        The runner collects it after every measured request."""
        return None

    def kinds(self) -> set[str]:
        """The kinds of method this is made of (``{"cache"}``, ``{"prompt", "cache"}``, ...)."""
        return {m.kind for m in self.flatten()}

    def enter(self, stack: ExitStack, model: nn.Module, tokenizer: Any) -> nn.Module:
        """Apply the method to ``model`` until ``stack`` closes; return the model to run.

        The one mechanism behind :meth:`applied` (and the harness's measured session):
        each kind implements it once, :class:`Compose` enters its members in order.
        """
        raise NotImplementedError

    @contextmanager
    def applied(self, model: nn.Module, tokenizer: Any = None) -> Iterator[nn.Module]:
        """``with method.applied(model, tokenizer) as model:`` the method acts on ``model``
        inside the block; hooks are removed on exit, even on error. A model method changes
        the model in place and for good (it is not restored on exit)."""
        with ExitStack() as stack:
            yield self.enter(stack, model, tokenizer)

    def shorten(self, prompt: PromptParts) -> PromptParts:
        """The prompt to send: prompt methods shorten ``prompt.compressible``; other methods
        return it unchanged. Call inside :meth:`applied`."""
        return prompt

    def prompt_stats(self) -> dict[str, float] | None:
        """What the last :meth:`shorten` asked for and did (see
        :meth:`PromptMethod.last_stats`); None when no prompt method ran."""
        return None


@dataclass
class PromptMethod(Method):
    """Shortens the text of each request before it is tokenised."""

    kind: ClassVar[str] = "prompt"

    def prepare(self, model: nn.Module, tokenizer: Any) -> None:
        """Called once with the benchmarked model (a compressor may reuse it)."""

    def enter(self, stack: ExitStack, model: nn.Module, tokenizer: Any) -> nn.Module:
        self.prepare(model, tokenizer)
        return model

    def shorten(self, prompt: PromptParts) -> PromptParts:
        with cache_methods_bypassed():
            text = self.shorten_text(prompt)
        if not text.endswith(prompt.protected):
            raise RuntimeError(
                f"prompt method {self.name!r} changed the protected end of the prompt"
            )
        return PromptParts(text[: len(text) - len(prompt.protected)], prompt.protected)

    def prompt_stats(self) -> dict[str, float] | None:
        return self.last_stats()

    def shorten_text(self, prompt: PromptParts) -> str:
        """Return the prompt to send to the model (``prompt.protected`` kept verbatim)."""
        raise NotImplementedError

    def last_stats(self) -> dict[str, float] | None:
        """What the last :meth:`shorten_text` call asked for and did, for the records:
        ``requested_rate`` and ``achieved_rate`` (fractions of the compressible tokens
        removed, in the method's own tokens), ``compressor_tokens``, ``compressor_passes``,
        ``compress_s``. None when the method reports nothing."""
        return None


@dataclass
class CacheMethod(Method):
    """Shrinks the KV cache while a request runs, through forward hooks on the attention
    modules that are registered in :meth:`hooks` and always removed on exit.

    Subclasses implement :meth:`reduce_kv` (called once per layer after the prefill of a
    request) and, if they keep a budget while decoding, :meth:`reduce_kv_decode`.
    They replace the cache layer's ``keys``/``values`` with smaller tensors (never a
    mask): the stored bytes are what the measurements see. ``chunked_prefill``: whether
    :meth:`reduce_kv` keeps what it keeps when the prompt is prefilled in chunks
    (:func:`~methods.cache.layers.prefill_chunk`); a method that cannot be chunked says so.

    Sliding-window layers (Gemma-3's local layers) already hold at most ``window - 1``
    tokens; by default a method leaves them alone and applies its ratio to the other
    layers, so the measured ratio of the whole cache is above the one asked for (the
    record carries both, and the lowest reachable). ``compress_sliding: true`` applies the
    ratio to what a sliding layer holds as well, for equal memory.
    """

    kind: ClassVar[str] = "cache"
    chunked_prefill: ClassVar[bool] = False
    acts_while_decoding: ClassVar[bool] = False  # changes the cache as it decodes: not captured
    compress_sliding: bool = False

    def enter(self, stack: ExitStack, model: nn.Module, tokenizer: Any) -> nn.Module:
        stack.enter_context(self.hooks(model))
        return model

    @contextmanager
    def hooks(self, model: nn.Module) -> Iterator[None]:
        handles = []
        modules = attention_modules(model)
        self._log = LayerLog(len(modules))
        try:
            for module in modules:
                handles.append(module.register_forward_hook(self._forward_hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if bypassed():  # a prompt method's compressor sharing the model (not a request)
            return output
        cache = cache_of(kwargs)
        if cache is None:  # never silently a no-op: the method would measure the full cache
            raise RuntimeError(
                f"{self.name}: attention layer {module.layer_idx} was called without a KV cache "
                "(kvbench looks for `cache` or `past_key_values` in its arguments): run the model "
                "with a Cache, or check how this transformers version passes it"
            )
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        layer = cache.layers[module.layer_idx]
        if not self.compresses_layer(module, layer):
            return output
        phase = forward_phase(layer, hidden_states.shape[1])
        if phase == "chunk":  # the prompt so far is in the cache: compressed at the last chunk
            self.observe_chunk(module, hidden_states, layer.keys, layer.values, kwargs)
            return output
        if phase == "prefill":
            before = layer.keys.shape[-2]
            keys, values = self.reduce_kv(module, hidden_states, layer.keys, layer.values, kwargs)
            self._log.record(module.layer_idx, before, keys.shape[-2])
        else:
            keys, values = self.reduce_kv_decode(
                module, hidden_states, layer.keys, layer.values, kwargs
            )
        # `reduce_kv` may have installed its own cache layer (a compressed form): re-fetch it
        if cache.layers[module.layer_idx] is layer and is_sliding(layer):
            cache.layers[module.layer_idx] = EvictedSlidingWindowLayer.from_layer(layer)
        layer = cache.layers[module.layer_idx]
        layer.keys, layer.values = keys, values
        return output

    def compresses_layer(self, module: nn.Module, layer: Any) -> bool:
        """Whether this method acts on a layer. Default: on every layer but sliding-window
        ones (already bounded by their window), unless ``compress_sliding``."""
        return self.compress_sliding or not is_sliding(layer)

    def last_stats(self) -> dict[str, Any] | None:
        """Per layer, the tokens held and kept on the last request (:class:`LayerLog`); a
        method that stores more (codebook sizes) adds its own keys to ``super()``'s dict."""
        log = getattr(self, "_log", None)
        return log.stats() if log is not None else None

    def requested_ratio(self) -> float | None:
        """The fraction of the KV cache it was asked to keep (None: a token count, or none)."""
        return None

    def asks_reduction(self) -> bool:
        """Whether this configuration asks to store less than the full cache (a run that
        asks for a reduction and measures none is a silent no-op, refused by the runner)."""
        ratio = self.requested_ratio()
        return ratio is None or ratio < 1.0

    def check_prompt_lengths(self, shortest: int, longest: int) -> None:
        """Refuse (:class:`MethodConfigError`) what prompts of these lengths cannot honour:
        keeping every token of the longest, or fewer than promised of the shortest (checked
        with the model's window before loading, with the prompts before the first request)."""

    def min_kept_tokens(self) -> int:
        """The fewest tokens a compressed layer keeps, however small the ratio (tokens the
        method always keeps, e.g. sinks and an observation window): with the layers it
        leaves alone, this sets the lowest KV ratio reachable."""
        return 1

    def last_chunk_tokens(self, config: Any) -> int:
        """The fewest prompt tokens the last chunk of a chunked prefill must hold on a model
        of this ``config``: the last queries :meth:`reduce_kv` scores with (e.g. SnapKV's
        observation window)."""
        return 1

    def observe_chunk(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        kwargs: dict,
    ) -> None:
        """A chunk of a chunked prefill before its last went through the layer: keys/values
        hold the prompt so far. Default: nothing (the keys and the last chunk suffice)."""

    def reduce_kv(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """After prefill. keys/values (B, H_kv, S, D), hidden_states (B, q, hidden): the
        prompt's last q queries, all S of them unless the prefill was chunked (then its last
        chunk, q >= :meth:`last_chunk_tokens`; ``kwargs`` are that forward's).
        Returns the tensors to store, (B, H_kv, S', D) with S' <= S. It may replace
        ``cache_of(kwargs).layers[module.layer_idx]`` by its own cache layer class;
        the returned tensors are then set as that new layer's ``keys``/``values``."""
        return keys, values

    def reduce_kv_decode(
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

    def enter(self, stack: ExitStack, model: nn.Module, tokenizer: Any) -> nn.Module:
        return self.transform(model, tokenizer)

    def transform(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        """Change ``model`` (in place where possible) and return the model to run."""
        raise NotImplementedError


@dataclass
class Compose(Method):
    """Several methods at once, e.g. a prompt method and a cache method; itself a method.
    Entering it applies the model methods first (in list order), then prepares the prompt
    methods on the resulting model, then registers every cache method's hooks (acting in
    list order per layer). Prompt methods shorten each request in list order."""

    methods: list[Method] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = "+".join(m.name for m in self.methods) or "full"
        self._stats: list[dict[str, float]] = []  # the prompt members' last stats
        for m in self.methods:
            if not isinstance(m, Method):
                raise MethodConfigError(
                    f"method.methods holds {m!r}, which is not a kvbench method: each entry "
                    "needs a `_target_` naming a class from methods/"
                )

    def validate_for(self, config: Any) -> None:
        for m in self.methods:
            m.validate_for(config)

    def validate_runtime(
        self, device: str | torch.device, dtype: torch.dtype, attn_implementation: str
    ) -> None:
        for m in self.methods:
            m.validate_runtime(device, dtype, attn_implementation)

    def params(self) -> dict[str, Any]:
        return {m.name: m.params() for m in self.methods}

    def flatten(self) -> list[Method]:
        return [leaf for m in self.methods for leaf in m.flatten()]

    def describe(self) -> dict[str, Any]:
        return {m.name: d for m in self.flatten() if (d := m.describe())}

    def last_stats(self) -> dict[str, Any] | None:
        stats = {m.name: s for m in self.flatten() if (s := m.last_stats())}
        return stats or None

    def enter(self, stack: ExitStack, model: nn.Module, tokenizer: Any) -> nn.Module:
        leaves = self.flatten()
        for kind in ("model", "prompt", "cache"):
            for method in leaves:
                if method.kind == kind:
                    model = method.enter(stack, model, tokenizer)
        return model

    def shorten(self, prompt: PromptParts) -> PromptParts:
        self._stats = []
        for method in self.flatten():
            prompt = method.shorten(prompt)
            stats = method.prompt_stats()
            if stats is not None:
                self._stats.append(stats)
        return prompt

    def prompt_stats(self) -> dict[str, float] | None:
        """The members' stats combined: rates compose multiplicatively (each removes its
        share of what the previous left), passes and seconds add up, chunks is the most any
        member cut its input into."""
        stats = self._stats
        if not stats:
            return None
        kept_requested = kept_achieved = 1.0
        for s in stats:
            kept_requested *= 1.0 - s.get("requested_rate", 0.0)
            kept_achieved *= 1.0 - s.get("achieved_rate", 0.0)
        return {
            "requested_rate": 1.0 - kept_requested,
            "achieved_rate": 1.0 - kept_achieved,
            "compressor_passes": sum(s.get("compressor_passes", 0) for s in stats),
            "compressor_chunks": max(s.get("compressor_chunks", 0) for s in stats),
            "compress_s": sum(s.get("compress_s", 0.0) for s in stats),
        }
