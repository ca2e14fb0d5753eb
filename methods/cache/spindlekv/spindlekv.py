"""SpindleKV (ACL 2025): attention-based eviction, deeper layers evicting more, then a
codebook of similar keys and values (shallow layers' tokens are the most alike)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from methods.base import MethodConfigError, attention_modules, cache_of
from methods.cache.attention import layer_rope, pool
from methods.cache.budget import compressed_layers, refuse_eager, require_ragged_ok
from methods.cache.snapkv import SnapKV
from methods.cache.spindlekv import codebook_attention, codebook_kernels, codebook_triton
from methods.cache.spindlekv.codebook import SCOPES
from methods.cache.spindlekv.codebook_layer import CodebookLayer, RopeTable, model_rope
from methods.cache.spindlekv.spindle_plan import keep_order, spindle_budgets
from methods.cache.spindlekv.spindle_prefill import Pending, plan

__all__ = ["SpindleKV", "model_rope", "round_robin", "spindle_budgets"]

GQA_MODES = ("repeat", "union", "group_average")
BUDGET_MODES = ("bytes", "tokens")
DECODE_ATTENTION = ("fused", "triton", "codebook", "materialize")


def round_robin(scores: torch.Tensor) -> torch.Tensor:
    """Per-query-head scores (B, H_kv, G, S) -> per-KV-head scores (B, H_kv, S) whose top-n
    is the first n distinct tokens of a round-robin over the G query heads' own rankings
    (head 0's best, head 1's best, ..., head 0's second best, ...)."""
    groups = scores.shape[2]
    rank = scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    turn = rank * groups + torch.arange(groups, device=rank.device).view(1, 1, -1, 1)
    return -turn.min(dim=2).values.float()  # earlier in the round-robin = higher


@dataclass
class SpindleKV(SnapKV):
    """SpindleKV, per METHODS.md section 2.

    Scores: per query head, ``ac[a] = sum_{b in window} A[b, a] / (l - a)`` over the last
    ``window`` queries [open: 32], then ``pooling`` with ``kernel_size`` [open: max, 7].
    Budget: :func:`spindle_budgets`, the paper's pyramid over the compressed layers (``beta``
    0.05), window always kept.

    GQA (``gqa``): ``repeat`` (the paper, default) repeats each KV head once per query head;
    every copy keeps its own query head's best tokens. The copies are identical, so a KV head
    stores the union of its copies' tokens once (coded once; the greedy codebook counts a
    token once per copy keeping it, as the paper's loop over the repeated heads would) plus,
    per copy, which of them it keeps (one byte per token and query head), all counted in the
    bytes; each query head attends to exactly its own tokens. While decoding, a new token goes
    to every copy. ``union`` (ours, the earlier default) keeps per KV head the round-robin
    union of its query heads' rankings, the same for the whole group; ``group_average`` (the
    paper's ablation) averages a group's scores. On MHA models the three are the same.

    Budget (``budget_mode``): ``bytes`` (default) stores ``ratio`` of the full cache's bytes
    over the compressed layers, measured: the pyramid's mean token count is searched
    (:func:`search_target`) until the layers' codebooks, refs, magnitudes and positions fill
    the byte budget to within ``ratio_tolerance`` of the full bytes (never above it); the
    codebook's savings become more kept tokens. ``tokens`` is the paper's token count
    (``ratio`` of the prompt's tokens per query head, or per KV head without head repeat),
    for the ablation. With ``budget`` (a
    token count) instead of ``ratio``, the byte budget is that of a full cache of ``budget``
    tokens. The budgets of all compressed layers are chosen together once the last one has
    run its prefill (prefill attention never sees a compressed layer, so nothing changes);
    a chunked prefill scores and codes at its last chunk, which holds the window's queries
    (the RoPE of the earlier chunks' keys is recomputed from their positions).

    Codebook: the kept keys are taken back to pre-RoPE (exactly, from the cached keys and the
    layer's cos/sin) and coded with threshold ``key_threshold`` (0.98), the values with
    ``value_threshold`` (0.95), by the paper's greedy algorithm (exact; only the pairs above
    the threshold are kept, the similarities computed ``similarity_block`` rows at a time and
    reused by the budget search). ``codebook_scope`` [open]: ``head`` (a KV head and
    its copies share a codebook) or ``layer``. ``magnitude: false`` (the paper's ablation)
    stores no magnitudes: tokens decode to their entry's centre vector. Decoding: each new
    key/value joins its group's best entry if cos > threshold, else becomes an entry.

    ``fold_every`` [ours]: the new tokens join the codebooks after every step (1, the paper)
    or every n steps, meanwhile attended as they are and counted in the bytes; the entries
    they join or open are the same either way (they are decided in order).

    Decode attention (``decode_attention``): ``fused`` (default) reads the codebooks in one
    pass per KV head and matches new tokens against their own group's entries, in the C++
    kernels of ``methods.cache.spindlekv.codebook_kernels`` on a CPU (float32), and attends by the
    Triton kernels of ``methods.cache.spindlekv.codebook_triton`` on a GPU (``triton`` asks for those
    anywhere: on a CPU under ``TRITON_INTERPRET=1``, as the tests run them). Where the
    kernel cannot run (no Triton, a dtype or head dim it does not take) the PyTorch operations
    run instead, with one warning naming why, recorded in the stats
    (``decode_kernel_fallback``; ``decode_kernel`` says what ran); ``codebook`` does the same with PyTorch operations (see
    ``methods.cache.spindlekv.codebook_attention``: gathered, rotated keys; values summed per entry);
    ``materialize`` decodes every token each step (the plain reading). ``ratio: 1.0`` (with
    no ``budget``) is the full cache, untouched. Sliding-window layers keep their own window
    and are not counted, unless ``compress_sliding``: then each sliding layer is coded alone
    (the tokens it holds, no pyramid) to ``ratio`` of its bytes, and drops the tokens its
    window passes while decoding. Eager attention is refused (per-layer cache lengths).
    """

    acts_while_decoding: ClassVar[bool] = True  # changes the cache as it decodes

    name: str = "spindlekv"
    beta: float = 0.05
    gqa: str = "repeat"
    budget_mode: str = "bytes"
    ratio_tolerance: float = 0.004
    key_threshold: float = 0.98
    value_threshold: float = 0.95
    magnitude: bool = True
    codebook_scope: str = "head"
    similarity_block: int = 1024
    decode_attention: str = "fused"
    fold_every: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.beta < 1:
            raise MethodConfigError(
                f"method.beta={self.beta} must be in [0, 1): the deepest layer's kept fraction "
                "in the pyramid (the paper uses 0.05)"
            )
        choices = {
            "gqa": (GQA_MODES, "repeat (the paper), union or group_average (its ablation)"),
            "budget_mode": (BUDGET_MODES, "bytes (equal memory) or tokens (the paper's count)"),
            "codebook_scope": (SCOPES, "head or layer"),
            "decode_attention": (DECODE_ATTENTION, "fused, triton, codebook or materialize"),
        }
        for field, (allowed, hint) in choices.items():
            if getattr(self, field) not in allowed:
                raise MethodConfigError(
                    f"method.{field}={getattr(self, field)!r} is unknown: use {hint}"
                )
        for name in ("key_threshold", "value_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise MethodConfigError(
                    f"method.{name}={getattr(self, name)} must be a cosine in (0, 1] (1.0 "
                    "shares no entry); the paper uses 0.98 for keys, 0.95 for values"
                )
        if not 0 < self.ratio_tolerance < 0.1:
            raise MethodConfigError(
                f"method.ratio_tolerance={self.ratio_tolerance} must be in (0, 0.1): how far "
                "below the requested ratio the byte search may stop, e.g. 0.004"
            )
        if self.fold_every < 1:
            raise MethodConfigError(
                f"method.fold_every={self.fold_every} must be >= 1: after how many decoding "
                "steps the newest tokens join the codebooks (1: every step, as in the paper)"
            )
        if self.similarity_block < 1:
            raise MethodConfigError(f"method.similarity_block={self.similarity_block} must be >= 1")
        self._rope: dict[int, tuple[Any, RopeTable]] = {}  # layer -> RoPE, while applied
        self._tables: dict[tuple, RopeTable] = {}
        self._pending: dict[int, Pending] = {}
        self._stats: dict[str, Any] | None = None
        self._sliding: dict[int, dict[str, Any]] = {}  # sliding layer -> its plan's stats
        self._model: nn.Module | None = None
        self.decode_kernel = self.decode_attention  # what runs, once applied to a model
        self._kernel_fallback: str | None = None

    def validate_for(self, config: Any) -> None:
        require_ragged_ok(self.name, config)

    def validate_runtime(self, device: Any, dtype: Any, attn_implementation: str) -> None:
        refuse_eager(self.name, attn_implementation)

    @property
    def untouched(self) -> bool:
        return self.budget is None and self.ratio == 1.0

    @contextmanager
    def hooks(self, model: nn.Module) -> Iterator[None]:
        """Hooks (scoring after prefill, binding each layer's codebook before its attention)
        and, unless ``ratio`` is 1, the codebook attention as the model's attention
        implementation; all undone on exit."""
        self.validate_for(model.config)
        base = model.config._attn_implementation
        modules = attention_modules(model)
        handles = []
        with super().hooks(model):
            self._model = model
            try:
                if not self.untouched:
                    self._resolve_kernel(model)
                    if self.decode_kernel == "fused":
                        codebook_kernels.extension()  # built (or loaded) now, not mid-request
                    model.set_attn_implementation(codebook_attention.register(base))
                    for module in modules:
                        handles.append(
                            module.register_forward_pre_hook(self._bind, with_kwargs=True)
                        )
                yield
            finally:
                for handle in handles:
                    handle.remove()
                for module in modules:
                    codebook_attention.bind(module, None)
                if model.config._attn_implementation != base:
                    model.set_attn_implementation(base)
                self._model = None
                self._rope.clear()
                self._tables.clear()
                self._pending = {}

    def _resolve_kernel(self, model: nn.Module) -> None:
        """Set ``decode_kernel`` for this model (:func:`codebook_triton.resolve`), with one
        warning naming why when the kernel asked for cannot run."""
        dims = {int(m.head_dim) for m in attention_modules(model) if hasattr(m, "head_dim")}
        asked = self.decode_attention
        kernel, why = codebook_triton.resolve(asked, model.device, model.dtype, dims)
        self.decode_kernel, self._kernel_fallback = kernel, why
        if why:
            warnings.warn(
                f"SpindleKV: decode_attention={asked} runs the PyTorch operations "
                f"(decode_attention=codebook) on this model: {why}",
                RuntimeWarning,
                stacklevel=3,
            )

    def _bind(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        layers = getattr(cache_of(kwargs), "layers", ())
        layer = layers[module.layer_idx] if module.layer_idx < len(layers) else None
        codebook_attention.bind(module, layer if isinstance(layer, CodebookLayer) else None)

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        kwargs: dict,
    ) -> torch.Tensor:
        """Scores per stored head: (B, H_q, S) for ``repeat``, else (B, H_kv, S)."""
        scores = self.window_scores(module, hidden_states, keys, kwargs)  # (B, H_kv, G, S)
        seq_len = keys.shape[-2]
        scores = scores / torch.arange(seq_len, 0, -1, device=scores.device)  # / (l - a)
        prefix = seq_len - min(self.window, seq_len)
        scores[..., :prefix] = pool(scores[..., :prefix], self.kernel_size, self.pooling)
        groups = scores.shape[2]
        if self.gqa == "group_average" or groups == 1:
            return scores.mean(dim=2)
        if self.gqa == "repeat":
            return scores.flatten(1, 2)  # query head h copies KV head h // G
        scores[..., prefix:] = torch.inf  # kept anyway: rank only the evictable tokens
        return round_robin(scores)

    def reduce_kv(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.untouched:
            return keys, values
        order = compressed_layers(module.config)
        if module.layer_idx == (0 if self.compress_sliding else order[0]):
            self._pending, self._sliding = {}, {}
        scores = self.score(module, hidden_states, keys, values, kwargs)
        held = keys.shape[-2]  # a sliding layer holds the prompt's last window - 1 tokens
        cos, sin = layer_rope(module, kwargs)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(hidden_states.shape[1], device=keys.device).unsqueeze(0)
        positions = positions.expand(keys.shape[0], -1)
        rope, table = self._layer_rope(module, positions, cos, sin)
        if held > positions.shape[-1]:  # a chunked prefill's last chunk: the earlier ones too
            positions = positions[:, -1:] + torch.arange(1 - held, 1, device=keys.device)
            cos, sin = rope(positions, cos)
        positions, cos, sin = positions[:, -held:], cos[:, -held:], sin[:, -held:]
        window = getattr(module, "sliding_window", None)
        pending = Pending(
            module.layer_idx,
            keep_order(scores, self.sinks, self.window),
            keys,
            values,
            cos,
            sin,
            positions,
            rope,
            table,
            window if module.layer_idx not in order else None,
        )
        if module.layer_idx not in order:  # a sliding layer (compress_sliding): r of it alone
            (layer,), self._sliding[module.layer_idx] = plan(self, [pending])
            cache_of(kwargs).layers[module.layer_idx] = layer
            return layer.keys, layer.values
        self._pending[module.layer_idx] = pending
        if module.layer_idx != order[-1]:
            return keys, values  # compressed with the others once the last layer has run
        pending, self._pending = list(self._pending.values()), {}
        layers, self._stats = plan(self, pending)
        cache = cache_of(kwargs)
        for p, layer in zip(pending, layers, strict=True):
            cache.layers[p.layer_idx] = layer
        return layer.keys, layer.values

    def last_stats(self) -> dict[str, Any] | None:
        """What SpindleKV did to the last request's prefill, JSON-able, for the records: the
        base per-layer stats (``compressed_layers``, ``tokens_before``; ``tokens_kept`` is
        the mean over KV heads of the distinct tokens each stores) plus ``target_tokens``
        (the pyramid's mean tokens per stored head; the paper's own count is
        ``paper_target_tokens``), ``search`` (every target tried -> its bytes / full),
        ``ratio_compressed_layers`` (stored / full bytes over the pyramid's layers;
        ``ratio_requested`` the byte budget's share, None in ``tokens`` mode), ``bytes`` and
        ``full_bytes``, and per compressed layer (``layers``): ``kept_tokens`` per stored
        head, ``unique_tokens`` per KV head, ``key_entries``/``value_entries`` and per head
        (``*_entries_per_head``, per batch row for scope ``layer``), ``bytes``,
        ``full_bytes`` and ``bytes_by_part`` (codebook entries, refs, magnitudes for keys and
        values, positions, per-query-head token sets, not-yet-folded tokens). With
        ``compress_sliding``, sliding layers (each coded alone, ``sliding: true``) are in
        ``layers`` too and ``sliding`` sums them. ``rope_table_bytes``: the tabulated RoPE
        the codebook attention reads (a function of the position, not part of the cache).
        ``decode_kernel``: what the decoding steps ran (``fused``: C++, ``triton``,
        ``codebook``: PyTorch operations, ``materialize``) and, where it is not the kernel
        asked for, ``decode_kernel_fallback``: why. None before the first request."""
        base = super().last_stats()
        if self._stats is None and not self._sliding:
            return base
        out = dict(base or {})
        out.update(self._stats or {})
        layers = [dict(layer) for layer in out.get("layers", [])]
        for stats in self._sliding.values():
            layers += [dict(layer, sliding=True) for layer in stats["layers"]]
        out["layers"] = sorted(layers, key=lambda layer: layer["layer"])
        out["decode_kernel"] = self.decode_kernel
        if self._kernel_fallback:
            out["decode_kernel_fallback"] = self._kernel_fallback
        if self._sliding:
            stored = sum(s["bytes"] for s in self._sliding.values())
            full = sum(s["full_bytes"] for s in self._sliding.values())
            out["sliding"] = {"bytes": stored, "full_bytes": full, "ratio": stored / full}
        if out.get("tokens_kept") is not None:
            kept = list(out["tokens_kept"])
            for layer in out["layers"]:
                unique = layer["unique_tokens"]
                kept[layer["layer"]] = sum(unique) / len(unique)
            out["tokens_kept"] = kept
        return out

    def reduce_kv_decode(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = cache_of(kwargs).layers[module.layer_idx]
        if not isinstance(layer, CodebookLayer):
            return keys, values
        if layer.attending and not layer.served:  # its update gave the attention the tail only
            raise RuntimeError(
                f"{type(module).__name__} (layer {module.layer_idx}) attended without "
                "transformers' attention interface, so it never read SpindleKV's codebooks: "
                "this attention module is not supported by SpindleKV's codebook cache"
            )
        new = layer.keys.shape[-2] - layer.tail_positions.shape[-1]
        positions = kwargs.get("position_ids")
        if positions is None:  # the model passes them; else they continue the stored ones
            waiting = layer.tail_positions
            start = int(waiting.max()) + 1 if waiting.numel() else layer.last_position + 1
            positions = torch.arange(start, start + new, device=keys.device).unsqueeze(0)
        layer.settle(positions.expand(keys.shape[0], -1)[:, -new:])
        return layer.keys, layer.values

    def _layer_rope(
        self, module: nn.Module, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[Any, RopeTable]:
        """The model's RoPE for this layer (checked once against what the layer received)
        and its table, shared by the layers with the same RoPE."""
        if module.layer_idx not in self._rope:
            if self._model is None:
                raise MethodConfigError("SpindleKV compresses only inside `method.hooks(model)`")
            key, rope = model_rope(self._model, module)
            ref_cos, ref_sin = rope(positions, cos)
            same = torch.allclose(ref_cos, cos, atol=1e-4) and torch.allclose(
                ref_sin, sin, atol=1e-4
            )
            if not same:
                raise MethodConfigError(
                    f"{type(module).__name__}: the model's rotary_emb does not reproduce the "
                    "layer's cos/sin, so SpindleKV cannot re-apply RoPE to its codebook keys"
                )
            table = self._tables.setdefault(key, RopeTable(rope))
            self._rope[module.layer_idx] = (rope, table)
        return self._rope[module.layer_idx]
