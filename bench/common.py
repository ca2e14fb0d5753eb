"""What every bench script needs: config entries built as kvbench builds them, and one measured
generation under a method through kvbench's one way of applying methods."""

from __future__ import annotations

from typing import Any

import torch

from harness.api import build
from harness.decode_graph import DecodeGraphs
from harness.session import Generated, open_session


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    method: Any,
    ids: torch.Tensor,
    max_new_tokens: int,
    prefill_chunk: int | None = None,
    decode_capture: str | DecodeGraphs | None = None,
    **generate_kwargs: Any,
) -> Generated:
    """Greedy generation of ``ids`` (1, S) under ``method`` (None: the full cache), measured
    as kvbench measures a request (window sized so that nothing is truncated);
    ``prefill_chunk``: the prompt's tokens per prefill forward pass (None: all at once);
    ``decode_capture``: how decoding steps run (:func:`harness.session.open_session`)."""
    method = method if method is not None else build("method", "full")
    window = ids.shape[1] + max_new_tokens
    with open_session(
        method,
        model,
        tokenizer,
        max_length=window,
        prefill_chunk=prefill_chunk,
        decode_capture=decode_capture,
    ) as session:
        return session.generate(ids[0].tolist(), max_new_tokens=max_new_tokens, **generate_kwargs)
