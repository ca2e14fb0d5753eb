"""The compressor: a causal LM that scores prompt tokens for the prompt methods.

Two per-token scores from one forward pass over token ids (n,):

- self-information ``I_t = -log p(x_t | x_<t)`` (float32; token 0 has none and gets 0);
- attention received ``A_t``: the attention probability that token t receives, summed over
  every query row, every query head and every layer (DAC's column sum).

The pass runs the decoder alone and applies the LM head ``head_chunk`` positions at a
time (the (n, vocabulary) logits are never held at once: 262k columns for Gemma-3).

The benchmarked model runs with sdpa/flash attention, which never materialises attention
probabilities, so ``A`` is computed by forward hooks on each ``self_attn`` module that
recompute the layer's probabilities from its own q projection, RoPE and the keys it has
just cached (:func:`methods.prompt.received.attention_received`, ``query_chunk`` query rows
at a time, the causal upper triangle skipped) and add their column sums to a running
total. The keys come from a plain ``DynamicCache()``, whose layers all keep every token:
a config-built cache would give a sliding-window layer (Gemma-3) only its last
``window - 1`` keys, and the column sums need all of them (the layer's own window is
applied by the recomputation, as by the model).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from methods.base import MethodConfigError, attention_modules, cache_kwarg, cache_of
from methods.prompt.received import attention_received


@dataclass
class TokenScores:
    """Scores of n tokens: ``self_info`` (n,) float32, ``attention`` (n,) float32 or None."""

    self_info: torch.Tensor
    attention: torch.Tensor | None = None


@dataclass
class Compressor:
    """Wraps a causal LM and its tokenizer; counts its forward passes.

    ``attention=True`` checks, once, that the model can give attention received (a decoder
    whose ``self_attn`` modules have Llama-style ``q_proj`` and RoPE) and raises
    :class:`MethodConfigError` otherwise, before any request is compressed.
    """

    model: nn.Module
    tokenizer: Any
    attention: bool = False
    query_chunk: int = 128
    head_chunk: int = 256
    forward_passes: int = 0
    _modules: list[nn.Module] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.tokenizer is None:
            raise MethodConfigError("the prompt method needs a tokenizer (got None)")
        if self.model is None:
            return
        config = getattr(self.model, "config", None)
        if config is not None and getattr(config, "is_encoder_decoder", False):
            raise MethodConfigError(
                f"{type(self.model).__name__} is an encoder-decoder: the compressor must be "
                "a causal (decoder-only) LM"
            )
        scaled = [
            a for a in ("logit_scale", "logits_scaling") if getattr(self.text_config, a, 1) != 1
        ]
        if scaled:
            raise MethodConfigError(
                f"compressor {type(self.model).__name__} scales its logits ({scaled[0]}), which "
                "the compressor's chunked LM head does not apply: use another compressor model"
            )
        if self.attention:
            try:
                self._modules = attention_modules(self.model)
            except MethodConfigError as err:
                raise MethodConfigError(
                    f"compressor {type(self.model).__name__} cannot give attention received: "
                    f"{err}. Use a Llama-style decoder as method.compressor, or "
                    "method.alpha=0 (self-information only)"
                ) from err
            for module in self._modules:
                missing = [a for a in ("q_proj", "head_dim", "scaling") if not hasattr(module, a)]
                if missing:
                    raise MethodConfigError(
                        f"compressor {type(self.model).__name__}: {type(module).__name__} has "
                        f"no {', '.join(missing)}, so attention received cannot be recomputed; "
                        "use a Llama-style decoder, or method.alpha=0 (self-information only)"
                    )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def text_config(self) -> Any:
        config = self.model.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    @property
    def max_positions(self) -> int:
        """The compressor's window: the longest input it scores in one pass."""
        return int(getattr(self.text_config, "max_position_embeddings", None) or 2048)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def boundaries(self, ids: list[int]) -> list[bool]:
        """Whether each token ends a line or a sentence (newline, ".", "?", "!"): where a
        chunk may be cut."""
        pieces = self.tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)
        return [p.rstrip(" ").endswith(("\n", ".", "?", "!")) for p in pieces]

    @torch.no_grad()
    def token_scores(self, ids: list[int] | torch.Tensor, attention: bool) -> TokenScores:
        """One forward pass over ids (n,): self-information and, if asked, attention."""
        if self.model is None:
            raise MethodConfigError("this prompt method has no compressor model to score with")
        input_ids = torch.as_tensor(ids, device=self.device).reshape(1, -1)
        n = input_ids.shape[1]
        self.forward_passes += 1
        received = torch.zeros(n, dtype=torch.float32, device=self.device)
        with self._hooks(received) if attention else _nothing():
            decoder = self.model.get_decoder()
            hidden = decoder(
                input_ids=input_ids,
                # a plain DynamicCache: full layers, see above
                **cache_kwarg(decoder, DynamicCache() if attention else None),
                use_cache=attention,
            ).last_hidden_state[0]
        return TokenScores(
            self_info=self.self_information(hidden, input_ids[0]),
            attention=received if attention else None,
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on final hidden states (..., hidden): what the model's own forward
        returns as logits (with Gemma's final soft-capping)."""
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def self_information(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """-log p(x_t | x_<t) from final hidden states (n, hidden): (n,) float32, 0 at t = 0;
        the logits of ``head_chunk`` positions at a time."""
        n = ids.shape[0]
        info = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n - 1, self.head_chunk):
            end = min(start + self.head_chunk, n - 1)
            info[start + 1 : end + 1] = self_information(
                self.logits(hidden[start : end + 1]), ids[start : end + 1]
            )[1:]
        return info

    @contextmanager
    def _hooks(self, received: torch.Tensor) -> Iterator[None]:
        """Forward hooks adding each layer's column sums of attention into ``received`` (n,);
        a hook on each ``q_proj`` hands its output to them (the queries are not projected
        twice)."""
        if not self._modules:
            raise MethodConfigError(
                "the compressor was prepared without attention (attention=False)"
            )
        projected: dict[nn.Module, torch.Tensor] = {}

        def keep_queries(owner: nn.Module, module: nn.Module, args: tuple, output: Any) -> None:
            projected[owner] = output

        def add_received(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            keys = cache_of(kwargs).layers[module.layer_idx].keys
            queries = projected.pop(module, None)
            received.add_(
                attention_received(module, hidden, keys, kwargs, self.query_chunk, queries)
            )

        handles = [m.q_proj.register_forward_hook(partial(keep_queries, m)) for m in self._modules]
        handles += [m.register_forward_hook(add_received, with_kwargs=True) for m in self._modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def self_information(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """-log p(x_t | x_<t) for logits (n, V) and ids (n,): (n,) float32, 0 at t = 0
    (a log-sum-exp less the target's logit: no (n, V) log-softmax is written)."""
    logits = logits[:-1].float()
    info = torch.zeros(ids.shape[0], dtype=torch.float32, device=logits.device)
    info[1:] = logits.logsumexp(dim=-1) - logits.gather(1, ids[1:, None])[:, 0]
    return info


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalised to [0, 1]; a constant vector becomes zeros (as DAC's code does)."""
    low, high = x.min(), x.max()
    if high - low <= 1e-8:
        return torch.zeros_like(x)
    return (x - low) / (high - low)


def chunk_spans(boundaries: list[bool], chunk_size: int) -> list[tuple[int, int]]:
    """Cut n tokens into spans of at most ``chunk_size``, each ending, where one exists in its
    second half, just after the last boundary token (a line or sentence end)."""
    n, spans, start = len(boundaries), [], 0
    while start < n:
        end = min(start + chunk_size, n)
        if end < n:
            for cut in range(end, start + chunk_size // 2, -1):
                if boundaries[cut - 1]:
                    end = cut
                    break
        spans.append((start, end))
        start = end
    return spans


@contextmanager
def _nothing() -> Iterator[None]:
    yield
