"""Low-rank KV-head compression (Yu et al. 2024, "Effectively Compress KV Heads for LLM").

Turns every layer's attention into ``num_kv_heads`` KV heads (MHA to GQA, or GQA to fewer
groups): calibration text is run through the model, and each group of heads is merged by a
PCA of its keys and values, folded into ``W_q``/``W_k``/``W_v``/``W_o``
(:mod:`methods.model.headmerge`: values by an unconstrained PCA folded into ``W_o``; keys,
which carry RoPE, by a per-frequency complex PCA folded into ``W_q``, or by averaging). The
KV cache then stores ``num_kv_heads`` heads per layer. With ``train: true`` the merged model
is fine-tuned against the original one by the KV-Latent recovery trainer
(:mod:`methods.model.training`) and cached under ``$KVBENCH_CACHE/kvheads/<hash>``.

Models whose attention normalises keys per head (``k_norm``: Gemma-3, Qwen-3) are not
supported: the normalisation sits between ``W_k`` and the cache, so nothing folds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from methods.base import MethodConfigError, ModelMethod
from methods.model import data
from methods.model.checkpoint import CheckpointStore, surgery_with_recovery
from methods.model.headmerge import Groups, collect_moments, merged_attention
from methods.model.kvlatent import make_train_config
from methods.model.layers import HeadShape, check_rotary, decoder_layers, text_config
from methods.model.training import require_budget, require_trainable_dtype
from methods.storage import cache_root

KEY_MERGES = ("rope_pca", "mean")
VALUE_MERGES = ("pca", "mean")
QK_NORM_MODELS = ("gemma3", "gemma3_text", "qwen3", "qwen3_moe", "olmo2", "cohere2")


@dataclass
class KVHeads(ModelMethod):
    """Fields: ``num_kv_heads`` (KV heads per layer after merging; must divide the query
    heads and be at most the model's KV heads), ``key_merge`` (rope_pca | mean),
    ``value_merge`` (pca | mean), ``calibration_tokens``/``calibration_seq_len``/
    ``calibration_data`` (the text whose K/V statistics drive the PCA; a
    :mod:`methods.model.data` source), ``train`` (fine-tune after merging) and ``training``
    (:class:`~methods.model.training.TrainConfig` fields)."""

    name: str = "kvheads"
    num_kv_heads: int = 1
    key_merge: str = "rope_pca"
    value_merge: str = "pca"
    calibration_tokens: int = 8192
    calibration_seq_len: int = 256
    calibration_data: str = "gsm8k_train"
    train: bool = False
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_kv_heads, int) or self.num_kv_heads < 1:
            raise MethodConfigError(f"method.num_kv_heads={self.num_kv_heads!r} must be >= 1")
        if self.key_merge not in KEY_MERGES:
            raise MethodConfigError(
                f"method.key_merge={self.key_merge!r}: use one of {', '.join(KEY_MERGES)}"
            )
        if self.value_merge not in VALUE_MERGES:
            raise MethodConfigError(
                f"method.value_merge={self.value_merge!r}: use one of {', '.join(VALUE_MERGES)}"
            )
        if self.calibration_seq_len < 2 or self.calibration_tokens < self.calibration_seq_len:
            raise MethodConfigError(
                f"method.calibration_tokens={self.calibration_tokens} must be at least one "
                f"sequence of method.calibration_seq_len={self.calibration_seq_len} (>= 2) tokens"
            )
        if self.calibration_data == "teacher":
            raise MethodConfigError("method.calibration_data=teacher is not supported here")
        data.check_source(self.calibration_data, "method.calibration_data")
        self._train_cfg = make_train_config(self.training)
        require_budget(self.train, self._train_cfg, self.name)

    def validate_for(self, config: Any) -> None:
        check_rotary(config, self.name)
        shape = HeadShape.of(config)
        if shape.num_heads % self.num_kv_heads:
            divisors = [t for t in range(1, shape.num_kv_heads + 1) if shape.num_heads % t == 0]
            raise MethodConfigError(
                f"method.num_kv_heads={self.num_kv_heads} does not divide the model's "
                f"{shape.num_heads} query heads: use one of {divisors}"
            )
        if self.num_kv_heads > shape.num_kv_heads:
            raise MethodConfigError(
                f"method.num_kv_heads={self.num_kv_heads} exceeds the model's "
                f"{shape.num_kv_heads} KV heads: merging can only reduce them"
            )
        if text_config(config).model_type in QK_NORM_MODELS:
            raise MethodConfigError(
                f"method={self.name} does not support {text_config(config).model_type}: its "
                "per-head key normalisation (k_norm) sits between W_k and the cache"
            )

    def validate_runtime(self, device: Any, dtype: Any, attn_implementation: str) -> None:
        require_trainable_dtype(self.train, dtype, self.name)

    def params(self) -> dict[str, Any]:
        out = super().params()
        out["training"] = dataclasses.asdict(self._train_cfg)
        return out

    def _calibration(self, model: nn.Module, tokenizer: Any) -> list[torch.Tensor]:
        texts = data.load_texts(self.calibration_data)
        n = self.calibration_tokens // self.calibration_seq_len
        chunks = data.token_chunks(texts, tokenizer, self.calibration_seq_len, limit=n)
        device = next(model.parameters()).device
        return [chunk[None].to(device) for chunk in chunks]

    def merge(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        """Calibrate on ``model`` and replace its attention modules by merged ones."""
        shape = HeadShape.held_by(model)  # not the config's count: see transform()
        layers = decoder_layers(model)
        if any(hasattr(layer.self_attn, "k_norm") for layer in layers):
            raise MethodConfigError(f"method={self.name}: models with k_norm are not supported")
        groups = Groups.of(shape, self.num_kv_heads)
        moments = collect_moments(
            model, self._calibration(model, tokenizer), groups, shape.head_dim
        )
        for layer, m in zip(layers, moments, strict=True):
            layer.self_attn = merged_attention(
                layer.self_attn, shape, groups, m, self.key_merge, self.value_merge
            )
        return model

    def describe(self) -> dict[str, Any]:
        """The KV heads per layer before and after merging, and whether the merged weights
        were trained ({} before :meth:`transform`)."""
        return dict(getattr(self, "_applied", {}))

    def transform(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        """Merge the KV heads of ``model`` (in place) and, with ``train``, fine-tune or load it.
        A model merged before is merged again from the heads its layers hold: its config still
        names the original count (reading that one raised IndexError in the calibration)."""
        self.validate_for(model.config)
        held = HeadShape.held_by(model).num_kv_heads
        if self.num_kv_heads > held:
            raise MethodConfigError(
                f"method.num_kv_heads={self.num_kv_heads} exceeds the {held} KV heads the "
                "model's layers hold (it was merged before; its config still names "
                f"{HeadShape.of(model).num_kv_heads}): merging can only reduce them, so load "
                "a fresh model"
            )
        self._applied = {
            "num_kv_heads_before": held,
            "num_kv_heads": self.num_kv_heads,
            "trained": bool(self.train),
        }
        if not self.train:
            return self.merge(model, tokenizer)
        payload = {
            "method": "kvheads",
            "dtype": str(next(model.parameters()).dtype),
            **{k: v for k, v in super().params().items() if k not in ("train", "training")},
        }
        return surgery_with_recovery(
            model,
            tokenizer,
            lambda m: self.merge(m, tokenizer),
            store=CheckpointStore(cache_root() / "kvheads"),
            payload=payload,
            cfg=self._train_cfg,
            label=f"{self.name}(num_kv_heads={self.num_kv_heads})",
        )
