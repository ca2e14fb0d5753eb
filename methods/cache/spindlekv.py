"""SpindleKV (ACL 2025): attention-based eviction, deeper layers evicting more, then a
codebook of similar keys and values (shallow layers' tokens are the most alike)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from methods.base import MethodConfigError, cache_of
from methods.cache.attention import layer_rope, pool, undo_rope
from methods.cache.budget import allocate, layer_rank, refuse_eager, require_ragged_ok
from methods.cache.codebook import SCOPES, Codebook, CodebookLayer
from methods.cache.scorer import gather_tokens, top_indices
from methods.cache.snapkv import SnapKV

GQA_MODES = ("repeat", "group_average")


def spindle_budgets(target: int, seq_len: int, window: int, layers: int, beta: float) -> list[int]:
    """Tokens kept per layer (window included), shallowest first, averaging ``target``.

    The paper's pyramid: ``l_c = l - l_w``, ``r_c = (target - l_w) / l_c``, ``alpha =
    (1 + beta) / 2``; if ``beta < r_c <= alpha`` the ratio runs linearly from ``2 r_c -
    beta`` (layer 0) to ``beta`` (last layer), if ``r_c > alpha`` from 1 to ``2 r_c - 1``
    (the printed ``1 - 2 r_c`` is a typo: the mean must be r_c). Below beta the paper gives
    no pyramid [open]: every layer keeps r_c. Layer λ keeps ``r_c(λ) * l_c`` tokens plus the
    window, floored, the remainders spread so the layers' total is exactly ``m * target``.
    """
    window = min(window, target)
    prefix = seq_len - window
    if prefix <= 0:
        return [seq_len] * layers
    r_c = (target - window) / prefix
    if r_c > (1 + beta) / 2:
        first, last = 1.0, 2 * r_c - 1
    elif r_c > beta:
        first, last = 2 * r_c - beta, beta
    else:
        first = last = r_c
    span = max(layers - 1, 1)
    shares = [(first + (last - first) * rank / span) * prefix for rank in range(layers)]
    return [n + window for n in allocate(shares, (target - window) * layers, prefix)]


def model_rope(model: nn.Module, module: nn.Module):
    """``rope(positions (B, n), like) -> (cos, sin)`` from the model's own rotary embedding
    (Gemma-3's takes the attention layer's type, local or global), or the layer's own when
    it defines ``position_embeddings`` (KV-Latent's reduced-dim attention)."""
    own = getattr(module, "position_embeddings", None)
    if callable(own):
        return lambda positions, like: own(positions, like.dtype)
    found = [m for name, m in model.named_modules() if name.endswith("rotary_emb")]
    if not found:
        raise MethodConfigError(
            f"{type(model).__name__} has no `rotary_emb` module: SpindleKV re-applies RoPE to "
            "its codebook keys and supports RoPE models only"
        )
    rotary = found[0]
    extra = ()
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        extra = (getattr(module, "layer_type", None) or "full_attention",)

    def rope(positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary(like, positions, *extra)

    return rope


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
    Budget: :func:`spindle_budgets` per compressed layer (``beta`` 0.05), window always kept.
    GQA (``gqa``): ``group_average`` (the paper's ablation) averages a group's scores;
    ``repeat`` lets every query head rank the tokens on its own. transformers' attention
    repeats the KV heads itself and takes its mask from the model, so one KV head cannot
    show each query head a different token set without patching: ``repeat`` keeps, per KV
    head, the union of its query heads' own rankings merged round-robin (each query head's
    best token, then each one's second best, ...) up to the layer's budget. No copy of a KV
    head is ever stored; on MHA models both options are the same, exact, per-head eviction.

    Codebook: the kept keys are taken back to pre-RoPE (exactly, from the cached keys and the
    layer's cos/sin) and coded with threshold ``key_threshold`` (0.98), the values with
    ``value_threshold`` (0.95), by the paper's greedy algorithm, the N x N similarity built
    ``similarity_block`` rows at a time. ``codebook_scope`` [open]: ``head`` (default: tokens
    of one KV head share a codebook) or ``layer`` (all KV heads of a layer share one; its
    graph is (H_kv N)^2 booleans). Stored: entries, an int32 owner per entry, an int32 ref
    and a magnitude per token (``magnitude: false``, the ablation, stores none: tokens decode
    to their entry's centre vector), an int32 position per kept token and head. Keys are
    decoded with the model's own RoPE at those positions. Decoding: each new key/value joins
    its group's best entry if cos > threshold, else becomes an entry. A threshold of 1.0
    shares nothing (eviction only, with the codebook's overhead).

    ``ratio: 1.0`` (with no ``budget``) is the full cache, untouched, as for every method;
    below it shallow layers may keep all tokens and still be coded. Sliding-window layers
    are left to their own window and not counted in the pyramid. Eager attention is refused
    (per-layer cache lengths, see budget.py).
    """

    name: str = "spindlekv"
    beta: float = 0.05
    gqa: str = "repeat"
    key_threshold: float = 0.98
    value_threshold: float = 0.95
    magnitude: bool = True
    codebook_scope: str = "head"
    similarity_block: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.beta < 1:
            raise MethodConfigError(
                f"method.beta={self.beta} must be in [0, 1): the deepest layer's kept fraction "
                "in the pyramid (the paper uses 0.05)"
            )
        if self.gqa not in GQA_MODES:
            raise MethodConfigError(
                f"method.gqa={self.gqa!r} is unknown: use repeat (the paper) or group_average "
                "(its ablation)"
            )
        for name in ("key_threshold", "value_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise MethodConfigError(
                    f"method.{name}={getattr(self, name)} must be a cosine in (0, 1] (1.0 "
                    "shares no entry); the paper uses 0.98 for keys, 0.95 for values"
                )
        if self.codebook_scope not in SCOPES:
            raise MethodConfigError(
                f"method.codebook_scope={self.codebook_scope!r} is unknown: use head or layer"
            )
        if self.similarity_block < 1:
            raise MethodConfigError(f"method.similarity_block={self.similarity_block} must be >= 1")
        self._rope: dict[int, Any] = {}  # layer -> the model's RoPE, while applied
        self._model: nn.Module | None = None

    def validate_for(self, config: Any) -> None:
        require_ragged_ok(self.name, config)

    def validate_runtime(self, device: Any, dtype: Any, attn_implementation: str) -> None:
        refuse_eager(self.name, attn_implementation)

    @contextmanager
    def apply(self, model: nn.Module) -> Iterator[None]:
        self.validate_for(model.config)
        with super().apply(model):
            self._model = model
            try:
                yield
            finally:
                self._model = None
                self._rope.clear()

    def layer_budget(self, module: nn.Module, seq_len: int) -> int:
        rank, layers = layer_rank(module)
        target = self.kept_tokens(seq_len)
        return spindle_budgets(target, seq_len, self.window + self.sinks, layers, self.beta)[rank]

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        kwargs: dict,
    ) -> torch.Tensor:
        scores = self.window_scores(module, hidden_states, keys, kwargs)  # (B, H_kv, G, S)
        seq_len = keys.shape[-2]
        scores = scores / torch.arange(seq_len, 0, -1, device=scores.device)  # / (l - a)
        prefix = seq_len - min(self.window, seq_len)
        scores[..., :prefix] = pool(scores[..., :prefix], self.kernel_size, self.pooling)
        groups = scores.shape[2]
        if self.gqa == "group_average" or groups == 1:
            return scores.mean(dim=2)
        scores[..., prefix:] = torch.inf  # kept anyway: rank only the evictable tokens
        return round_robin(scores)

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.budget is None and self.ratio == 1.0:
            return keys, values
        batch, heads, seq_len, _ = keys.shape
        n_kept = self.layer_budget(module, seq_len)
        if n_kept < seq_len:
            scores = self.score(module, hidden_states, keys, values, kwargs)
            idx = top_indices(scores, n_kept, self.sinks, self.recent_tokens(n_kept))
        else:
            idx = torch.arange(seq_len, device=keys.device).expand(batch, heads, seq_len)
        cos, sin = layer_rope(module, kwargs)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(seq_len, device=keys.device).unsqueeze(0)
        positions = positions.expand(batch, -1)
        rope = self._layer_rope(module, positions, cos, sin)
        pre_keys = undo_rope(keys.float(), cos.float().unsqueeze(1), sin.float().unsqueeze(1))
        kept_positions = positions.unsqueeze(1).expand(-1, heads, -1).gather(2, idx)
        layer = CodebookLayer(
            self._codebook(gather_tokens(pre_keys, idx), self.key_threshold, keys.dtype),
            self._codebook(gather_tokens(values, idx), self.value_threshold, values.dtype),
            kept_positions.int(),
            rope,
        )
        cache_of(kwargs).layers[module.layer_idx] = layer
        return layer.keys, layer.values

    def compress_decode(
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
        new = layer.keys.shape[-2]
        positions = kwargs.get("position_ids")
        if positions is None:  # the model passes them; else they continue the stored ones
            start = int(layer.positions.max()) + 1
            positions = torch.arange(start, start + new, device=keys.device).unsqueeze(0)
        cos, sin = layer_rope(module, kwargs)
        layer.fold(positions.expand(keys.shape[0], -1)[:, -new:], cos[:, -new:], sin[:, -new:])
        return layer.keys, layer.values

    def _codebook(self, vectors: torch.Tensor, theta: float, dtype: torch.dtype) -> Codebook:
        return Codebook.build(
            vectors, theta, self.codebook_scope, self.magnitude, self.similarity_block, dtype
        )

    def _layer_rope(
        self, module: nn.Module, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> Any:
        """The model's RoPE for this layer, checked once against what the layer received."""
        if module.layer_idx not in self._rope:
            if self._model is None:
                raise MethodConfigError("SpindleKV compresses only inside `method.apply(model)`")
            rope = model_rope(self._model, module)
            ref_cos, ref_sin = rope(positions, cos)
            same = torch.allclose(ref_cos, cos, atol=1e-4) and torch.allclose(
                ref_sin, sin, atol=1e-4
            )
            if not same:
                raise MethodConfigError(
                    f"{type(module).__name__}: the model's rotary_emb does not reproduce the "
                    "layer's cos/sin, so SpindleKV cannot re-apply RoPE to its codebook keys"
                )
            self._rope[module.layer_idx] = rope
        return self._rope[module.layer_idx]
