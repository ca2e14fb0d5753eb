"""KV-Latent (ACL 2025): smaller key and/or value heads, recovered by a short training run.

| variant | d_qk     | d_vo     | config            |
|---------|----------|----------|-------------------|
| ``k``   | ``dim``  | head_dim | ``kvlatent_k``    |
| ``v``   | head_dim | ``dim``  | ``kvlatent_v``    |
| ``kv``  | ``dim``  | ``dim``  | ``kvlatent_kv``   |

The surgery (:mod:`methods.model.latent`) down-samples the pretrained weights with a stride
(no SVD), the attention scale becomes 1/sqrt(d_qk), and RoPE runs at the reduced key dim
(``rope``: ``frequency_aware`` as in the authors' code, ``standard``, or
``frequency_matched``, ours: the frequency-aware frequencies on the key channels that had
them, see :mod:`methods.model.rope`; with the keys not cut, the model's RoPE is kept). With
``train: true`` the reduced model is then trained against the original one
(:mod:`methods.model.training`) and the result is cached under
``$KVBENCH_CACHE/kvlatent/<hash>`` keyed by (model weights, d_qk, d_vo, RoPE mode, training
config), so a sweep trains each key once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from methods.base import MethodConfigError, ModelMethod
from methods.model.checkpoint import CheckpointStore, surgery_with_recovery
from methods.model.latent import latent_surgery
from methods.model.layers import HeadShape, check_rotary
from methods.model.rope import ROPE_MODES
from methods.model.training import TrainConfig, require_budget, require_trainable_dtype
from methods.storage import cache_root

VARIANTS = ("k", "v", "kv")


def make_train_config(training: dict[str, Any]) -> TrainConfig:
    """``method.training`` as a validated :class:`TrainConfig` (unknown keys are errors)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(training) - known)
    if unknown:
        raise MethodConfigError(
            f"method.training.{unknown[0]} is not a training field: use {', '.join(sorted(known))}"
        )
    return TrainConfig(**training)


@dataclass
class KVLatent(ModelMethod):
    """Fields: ``variant`` (k | v | kv: which heads are cut), ``dim`` (the reduced per-head
    dim, null: head_dim / 2; must divide the model's head_dim, be even when keys are cut,
    divisible by 4 with frequency-aware RoPE, and leave an even head_dim/dim with
    frequency-matched RoPE), ``rope`` (frequency_aware | standard | frequency_matched),
    ``train`` (recovery training on/off) and ``training``
    (:class:`~methods.model.training.TrainConfig` fields)."""

    name: str = "kvlatent_kv"
    variant: str = "kv"
    dim: int | None = None
    rope: str = "frequency_aware"
    train: bool = True
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise MethodConfigError(
                f"method.variant={self.variant!r} is unknown: use k (keys), v (values) or kv"
            )
        if self.rope not in ROPE_MODES:
            raise MethodConfigError(
                f"method.rope={self.rope!r} is unknown: use one of {', '.join(ROPE_MODES)}"
            )
        if self.dim is not None:
            if not isinstance(self.dim, int) or self.dim < 1:
                raise MethodConfigError(f"method.dim={self.dim!r} must be a positive integer")
            self._check_key_dim(self.dim)
        self._train_cfg = make_train_config(self.training)
        require_budget(self.train, self._train_cfg, self.name)

    def _check_key_dim(self, dim: int) -> None:
        if self.cuts_keys and dim % 2:
            raise MethodConfigError(
                f"method.dim={dim} is odd, but the keys carry RoPE, which rotates channel "
                f"pairs: with variant={self.variant} d_qk must be even (e.g. {dim + 1})"
            )
        if self.cuts_keys and self.rope != "standard" and dim % 4:
            raise MethodConfigError(
                f"method.dim={dim}: {self.rope} RoPE needs d_qk divisible by 4; pick "
                "such a dim or set method.rope=standard"
            )

    def reduced_dim(self, head_dim: int) -> int:
        """``dim``, or head_dim / 2 when it is null."""
        return self.dim if self.dim is not None else head_dim // 2

    @property
    def cuts_keys(self) -> bool:
        return self.variant in ("k", "kv")

    @property
    def train_config(self) -> TrainConfig:
        return self._train_cfg

    def dims(self, head_dim: int) -> tuple[int, int]:
        """(d_qk, d_vo) for a model with ``head_dim`` channels per head."""
        dim = self.reduced_dim(head_dim)
        d_qk = dim if self.cuts_keys else head_dim
        d_vo = dim if self.variant in ("v", "kv") else head_dim
        return d_qk, d_vo

    def validate_for(self, config: Any) -> None:
        check_rotary(config, self.name)
        head_dim = HeadShape.of(config).head_dim
        dim = self.reduced_dim(head_dim)
        self._check_key_dim(dim)
        if dim > head_dim or head_dim % dim:
            divisors = [d for d in range(2, head_dim) if head_dim % d == 0 and d % 2 == 0]
            raise MethodConfigError(
                f"method.dim={dim} does not divide the model's head_dim={head_dim}: the "
                f"strided down-sampling keeps every (head_dim/dim)-th channel; use one of "
                f"{divisors}"
            )
        stride = head_dim // dim
        if self.cuts_keys and self.rope == "frequency_matched" and stride > 1 and stride % 2:
            raise MethodConfigError(
                f"method.dim={dim}: frequency_matched RoPE keeps channel a*r/2 for each "
                f"frequency-aware exponent a, so head_dim/dim={stride} must be even "
                "(or 1); pick such a dim or set method.rope=frequency_aware"
            )

    def validate_runtime(self, device: Any, dtype: Any, attn_implementation: str) -> None:
        require_trainable_dtype(self.train, dtype, self.name)
        if self.variant != "kv" and attn_implementation.startswith("flash_attention"):
            raise MethodConfigError(
                f"method={self.name} (variant {self.variant}) gives keys and values different "
                f"head dims, which the {attn_implementation} kernels do not take: use "
                "model.attn_implementation=sdpa, or variant kv (method=kvlatent_kv)"
            )

    def params(self) -> dict[str, Any]:
        out = super().params()
        out["training"] = dataclasses.asdict(self._train_cfg)
        return out

    def describe(self) -> dict[str, Any]:
        """The applied cut: ``head_dim``, ``d_qk``, ``d_vo``, the RoPE used and whether the
        weights were trained after the surgery ({} before :meth:`transform`)."""
        return dict(getattr(self, "_applied", {}))

    def transform(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        """Cut the heads of ``model`` (in place) and, with ``train``, recover or load it."""
        self.validate_for(model.config)
        head_dim = HeadShape.of(model).head_dim
        d_qk, d_vo = self.dims(head_dim)
        self._applied = {
            "head_dim": head_dim,
            "d_qk": d_qk,
            "d_vo": d_vo,
            "rope": self.rope if d_qk < head_dim else "model",
            "trained": bool(self.train),
        }

        def surgery(m: nn.Module) -> None:
            latent_surgery(m, d_qk, d_vo, self.rope)

        if not self.train:
            surgery(model)
            return model
        payload = {
            "method": "kvlatent",
            "d_qk": d_qk,
            "d_vo": d_vo,
            "rope": self.rope if d_qk < head_dim else "model",
            "dtype": str(next(model.parameters()).dtype),
        }
        return surgery_with_recovery(
            model,
            tokenizer,
            surgery,
            store=CheckpointStore(cache_root() / "kvlatent"),
            payload=payload,
            cfg=self._train_cfg,
            label=f"{self.name}(d_qk={d_qk}, d_vo={d_vo}, rope={payload['rope']})",
        )
