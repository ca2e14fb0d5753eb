"""Runs NVIDIA kvpress's presses on given token ids and reports what they kept, what the
model then generates and how long it took. Runs INSIDE the kvpress peer environment
(bench/peers/setup_kvpress.sh), driven as a subprocess by bench/peers/compare_kvpress.py:

    .venv-kvpress/bin/python bench/peers/kvpress_driver.py REQUEST.json OUT.pt

REQUEST: {"model_dir", "threads", "max_new_tokens", "samples": [[ids...], ...],
"presses": [{"label", "press": "SnapKVPress", "kwargs": {...}}, ...]}.
OUT (torch.save): {"versions", "results": [{"label", "sample", "positions": [per layer
(H_kv, n) int tensors], "match_error", "tokens", "first_logits" (after the prompt), "prefill_s", "decode_s", "decode_steps"}]}.
Greedy decoding follows kvpress's pipeline (``generate_answer``): explicit positions after
the prompt, stop at EOS.
"""

from __future__ import annotations

import json
import sys
import time
from importlib import metadata

import kvpress
import torch
import transformers
from kept import kept_positions
from transformers import AutoModelForCausalLM, DynamicCache


@torch.inference_mode()
def prefill_and_decode(model, ids: torch.Tensor, press, max_new_tokens: int) -> dict:
    cache = DynamicCache()
    start = time.perf_counter()
    if press is None:
        out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
    else:
        with press(model):
            out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
    prefill_end = time.perf_counter()
    keys = [layer.keys[0].clone() for layer in cache.layers]
    out_first = out.logits[0, -1].float().clone()
    tokens = [int(out.logits[0, -1].argmax())]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for step in range(max_new_tokens - 1):
        if tokens[-1] in eos:
            break
        out = model(
            input_ids=torch.tensor([[tokens[-1]]]),
            past_key_values=cache,
            position_ids=torch.tensor([[ids.shape[1] + step]]),
        )
        tokens.append(int(out.logits[0, -1].argmax()))
    end = time.perf_counter()
    return {
        "keys": keys,
        "tokens": tokens,
        "first_logits": out_first,
        "prefill_s": prefill_end - start,
        "decode_s": end - prefill_end,
        "decode_steps": len(tokens) - 1,
    }


def main(request_path: str, out_path: str) -> None:
    request = json.loads(open(request_path).read())
    torch.set_num_threads(int(request["threads"]))
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        request["model_dir"], dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    presses = [
        (p["label"], getattr(kvpress, p["press"])(**p["kwargs"])) for p in request["presses"]
    ]
    results = []
    for index, sample in enumerate(request["samples"]):
        ids = torch.tensor([sample])
        full = prefill_and_decode(model, ids, None, request["max_new_tokens"])
        runs = [("full", full)] + [
            (label, prefill_and_decode(model, ids, press, request["max_new_tokens"]))
            for label, press in presses
        ]
        for label, run in runs:
            matched = [kept_positions(f, k) for f, k in zip(full["keys"], run["keys"], strict=True)]
            results.append(
                {
                    "label": label,
                    "sample": index,
                    "positions": [positions for positions, _ in matched],
                    "match_error": max(error for _, error in matched),
                    **{k: v for k, v in run.items() if k != "keys"},
                }
            )
        print(f"kvpress driver: sample {index + 1}/{len(request['samples'])}", file=sys.stderr)
    versions = {"kvpress": metadata.version("kvpress"), "transformers": transformers.__version__}
    versions["torch"] = str(torch.__version__)
    torch.save({"versions": versions, "results": results}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
