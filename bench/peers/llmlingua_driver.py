"""Runs Microsoft's llmlingua 0.2.2 (``PromptCompressor.compress_prompt``, LLMLingua v1) on
given prompts and reports what it kept and how long it took. Runs INSIDE the llmlingua peer
environment (bench/peers/setup_llmlingua.sh), driven as a subprocess by
bench/peers/compare_llmlingua.py:

    .venv-llmlingua/bin/python bench/peers/llmlingua_driver.py REQUEST.json OUT.json

REQUEST: {"model_dir", "threads", "iterative_size", "context_budget" (e.g. "+100"),
"prompts": [{"demonstrations": [str, ...], "question": str, "target_token": int}, ...]}.
OUT: {"versions", "probe_nll" (the package's mean NLL, ``get_ppl``, of the first
demonstration: the caller checks that its own compressor gives the same), "results":
[{"prompt", "target_token", "compressed_prompt" (the demonstrations compressed, "\\n\\n",
the question: the package's own output), "kept_ids" (the compressor token ids its
token-level pass kept), "kept_positions" (their positions in its token-level input: the
kept demonstrations joined by "\\n\\n", tokenised; null where they cannot be followed),
"used" (indices of the demonstrations its budget controller kept), "origin_tokens",
"compressed_tokens", "ratio", "rate" (its report), "compress_s"}]}.

Settings: ``rank_method="llmlingua"`` (demonstrations ranked by their own perplexity, no
question conditioning), ``reorder_context="original"``, ``iterative_size`` and
``context_budget`` from the request, ``target_token`` set (so ``rate`` is unused): the
target is the caller's, in the compressor's tokens. The demonstrations are passed as the
package's ``context`` list (it joins them with "\\n\\n").

The model folder (saved by transformers 5) is read through a view that transformers 4
loads as the same model (:func:`as_transformers4`).

Offline stand-in: ``PromptCompressor.__init__`` calls
``tiktoken.encoding_for_model("gpt-3.5-turbo")``, which downloads a vocabulary; the package
uses it only to count tokens for its report (``origin_tokens``, ``compressed_tokens``,
``ratio``, ``rate``), never to choose what to keep. Here, in this process only, it is
replaced by the compressor's own tokenizer, so those counts are compressor tokens of the
whole prompt (demonstrations and question). ``control_context_budget``,
``iterative_compress_prompt`` and ``get_compressed_input`` are wrapped to record their
results, unchanged.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import tiktoken
import torch
import transformers
from peer_io import recording  # this folder: the driver runs as a script
from transformers import AutoTokenizer


class TokenizerCounter:
    """Stands in for a tiktoken ``Encoding``: ``encode`` with a Hugging Face tokenizer."""

    def __init__(self, model_dir: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def as_transformers4(model_dir: str, folder: Path) -> str:
    """A view of a model folder saved by transformers 5 that transformers 4 reads the same:
    links to its files, but config.json with ``rope_theta`` at the top level (5 nests it in
    ``rope_parameters``; 4 would silently fall back to 10000) and tokenizer_config.json
    naming PreTrainedTokenizerFast (5 writes "TokenizersBackend", unknown to 4)."""
    for source in Path(model_dir).iterdir():
        if source.name not in ("config.json", "tokenizer_config.json"):
            (folder / source.name).symlink_to(source.resolve())
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config.update(config.get("rope_parameters") or {})
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
    tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return str(folder)


def track_positions(compressor, record: dict) -> None:
    """Wrap ``compressor.get_compressed_input`` (one token-level deletion step) so that
    ``record["positions"]`` follows which positions of the token-level input survive: the
    step is run a second time on the positions in place of the token ids (it only indexes
    them). False where the positions cannot be followed (its KV-cache compression, which
    drops tokens from the front, past ``max_position_embeddings``)."""
    method = compressor.get_compressed_input

    def wrapper(loss, input_ids, attention_mask, *args, **kwargs):
        positions = record.get("positions")
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        if positions is not False and positions.shape == input_ids.shape:
            # on copies: the step updates its ``end`` argument (a tensor) in place
            copy = [a.clone() if torch.is_tensor(a) else a for a in args]
            named = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
            record["positions"] = method(loss, positions, attention_mask, *copy, **named)[0]
        else:
            record["positions"] = False
        return method(loss, input_ids, attention_mask, *args, **kwargs)

    compressor.get_compressed_input = wrapper


def main(request_path: str, out_path: str) -> None:
    request = json.loads(open(request_path).read())
    torch.set_num_threads(int(request["threads"]))
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = as_transformers4(request["model_dir"], Path(tmp))
        counter = TokenizerCounter(model_dir)
        tiktoken.encoding_for_model = lambda model_name: counter  # offline: see the docstring
        from llmlingua import PromptCompressor

        compressor = PromptCompressor(model_name=model_dir, device_map="cpu")
    compressor.model.eval()
    first = request["prompts"][0]["demonstrations"][0]
    probe = float(compressor.get_ppl(first))  # the compressor check: mean NLL of one text
    record: dict = {}
    recording(compressor, "control_context_budget", record)
    recording(compressor, "iterative_compress_prompt", record)
    track_positions(compressor, record)
    results = []
    for index, prompt in enumerate(request["prompts"]):
        record.clear()
        start = time.perf_counter()
        out = compressor.compress_prompt(
            prompt["demonstrations"],
            question=prompt["question"],
            target_token=prompt["target_token"],
            iterative_size=request["iterative_size"],
            context_budget=request["context_budget"],
            rank_method="llmlingua",
            reorder_context="original",
        )
        elapsed = time.perf_counter() - start
        used = record.get("control_context_budget")
        ids, _ = record["iterative_compress_prompt"]
        positions = record.get("positions")
        results.append(
            {
                "prompt": index,
                "target_token": prompt["target_token"],
                "compressed_prompt": out["compressed_prompt"],
                "kept_ids": ids[0].tolist(),
                "kept_positions": positions[0].tolist() if torch.is_tensor(positions) else None,
                "used": sorted(used[2]) if used else list(range(len(prompt["demonstrations"]))),
                **{k: out[k] for k in ("origin_tokens", "compressed_tokens", "ratio", "rate")},
                "compress_s": elapsed,
            }
        )
        print(f"llmlingua driver: prompt {index + 1}/{len(request['prompts'])}", file=sys.stderr)
    versions = {p: metadata.version(p) for p in ("llmlingua", "transformers", "torch")}
    with open(out_path, "w") as f:
        json.dump({"versions": versions, "probe_nll": probe, "results": results}, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
