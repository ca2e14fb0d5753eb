"""The ``transformers`` row of the GPU table: ``model.generate`` with the static cache, the
baseline a user would otherwise reach for, measured as kvbench measures a request.

Greedy, EOS off (the model's generation config), ``max_new_tokens`` tokens. The prefill ends
when the first logits reach the logits processors (the clock synchronises the device there),
so prefill and decode split as in kvbench's own loop. The static cache is sized to the
request (prompt + new tokens) and holds all of it: its KV bytes are the full cache's.

Without ``torch.compile``: on CUDA, ``generate`` compiles the forward pass for a static cache
unless told not to, and compiles again for every new cache length (every request of the
``new_lengths`` workload), tens of seconds each, more than the whole table's time budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from harness.measure import KVLayout, PeakMemory, synchronized_clock


@dataclass
class _FirstLogits(LogitsProcessor):
    """Notes the synchronised time each step's logits arrive; changes nothing."""

    device: torch.device
    times: list[float] = field(default_factory=list)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(synchronized_clock(self.device))
        return scores


def generate_static(model: torch.nn.Module, ids: torch.Tensor, max_new_tokens: int) -> dict:
    """One request (1, S) by ``model.generate(cache_implementation="static")``: the fields
    ``bench/gpu/speed.py`` reads from kvbench's measurement (times, peak, KV bytes, tokens)."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    clock = _FirstLogits(device)
    probe = PeakMemory.of_model(model)
    probe.reset()
    start = synchronized_clock(device)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            cache_implementation="static",
            disable_compile=True,  # see the module docstring
            logits_processor=LogitsProcessorList([clock]),
        )
    end = synchronized_clock(device)
    tokens = out[0, ids.shape[1] :].tolist()
    layout = KVLayout.from_config(model.config, next(model.parameters()).dtype)
    # the static cache holds room for prompt + new tokens from the start (the CPU's count)
    peak = probe.peak_bytes(layout.full_bytes(ids.shape[1] + max_new_tokens))
    steps = max(len(tokens) - 1, 0)
    return {
        "prefill_s": clock.times[0] - start,
        "decode_total_s": end - clock.times[0],
        "decode_steps": steps,
        "peak_bytes": peak,
        "kv_bytes": layout.full_bytes(ids.shape[1]),
        "kv_bytes_final": layout.full_bytes(ids.shape[1] + steps),
        "kv_full_bytes": layout.full_bytes(ids.shape[1]),
        "tokens": tokens,
        "wall_s": end - start,
    }
