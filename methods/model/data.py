"""Text for recovery training, calibration and held-out perplexity, available offline.

Sources (``training.data``):

- ``gsm8k_train`` (default): GSM8K *train* problems, "Question: ...\\nAnswer: ..." from
  ``data/gsm8k/train.jsonl``, minus the last :data:`HELDOUT_PROBLEMS`. kvbench evaluates GSM8K
  on its *test* split, so no evaluated problem is trained on; lm-eval draws the 5-shot
  demonstrations from the train split, so a demonstration may be a problem the model was
  trained on (it is shown with its answer in the prompt anyway).
- ``teacher``: text sampled from the unmodified model itself (temperature 1), each sample
  started from the first words of a GSM8K train question. Nothing evaluated is seen.
- ``file:PATH``: a ``.txt`` file (documents separated by blank lines) or a ``.jsonl`` file
  (``training.data_field`` of each record).
- ``hub:NAME``: a Hugging Face dataset (network needed), split ``training.data_split``,
  field ``training.data_field``. The user makes sure it does not overlap an evaluated split.

Held-out text (:func:`heldout_texts`): the last :data:`HELDOUT_PROBLEMS` GSM8K train
problems, which no training source above draws from.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from methods.base import cache_kwarg
from methods.storage import read_jsonl

HELDOUT_PROBLEMS = 500
SOURCES = ("gsm8k_train", "teacher", "file:", "hub:")


def _problem(record: dict[str, str]) -> str:
    return f"Question: {record['question']}\nAnswer: {record['answer']}"


def gsm8k_train_texts() -> list[str]:
    """The GSM8K train problems that training may use (all but the held-out tail)."""
    return [_problem(r) for r in read_jsonl("gsm8k/train.jsonl")[:-HELDOUT_PROBLEMS]]


def heldout_texts(n: int = HELDOUT_PROBLEMS) -> list[str]:
    """The first ``n`` held-out problems (never used for training or calibration)."""
    return [_problem(r) for r in read_jsonl("gsm8k/train.jsonl")[-HELDOUT_PROBLEMS:][:n]]


def check_source(source: str, field_name: str) -> None:
    if source in SOURCES[:2] or any(
        source.startswith(p) and len(source) > len(p) for p in SOURCES[2:]
    ):
        return
    from methods.base import MethodConfigError

    raise MethodConfigError(
        f"{field_name}={source!r} is unknown: use gsm8k_train, teacher, file:PATH or hub:NAME"
    )


def load_texts(source: str, *, field: str = "text", split: str = "train") -> list[str]:
    """Texts of a ``file:`` / ``hub:`` / ``gsm8k_train`` source (``teacher`` is generated)."""
    if source == "gsm8k_train":
        return gsm8k_train_texts()
    if source.startswith("file:"):
        path = Path(source.removeprefix("file:")).expanduser()
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as fh:
                return [json.loads(line)[field] for line in fh if line.strip()]
        return [
            doc.strip() for doc in path.read_text(encoding="utf-8").split("\n\n") if doc.strip()
        ]
    if source.startswith("hub:"):
        import datasets

        return [
            row[field] for row in datasets.load_dataset(source.removeprefix("hub:"), split=split)
        ]
    raise ValueError(f"no text loader for {source!r}")


@torch.no_grad()
def teacher_texts(model: Any, tokenizer: Any, samples: int, tokens: int, seed: int) -> list[str]:
    """``samples`` texts of up to ``tokens`` new tokens sampled from ``model`` (temperature
    1, top-k 50), each prompted with the first six words of a GSM8K train question."""
    from transformers import DynamicCache

    prompts = [" ".join(t.split()[:6]) for t in gsm8k_train_texts()[:samples]]
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        cache = DynamicCache(config=model.config)
        step = torch.tensor([ids], device=device)
        for _ in range(tokens):
            logits = model(input_ids=step, **cache_kwarg(model, cache), use_cache=True).logits
            top = logits[0, -1].float().topk(min(50, logits.shape[-1]))
            pick = torch.multinomial(torch.softmax(top.values, -1).cpu(), 1, generator=generator)
            token = int(top.indices[int(pick)])
            ids.append(token)
            if token == tokenizer.eos_token_id:
                break
            step = torch.tensor([[token]], device=device)
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts


def token_chunks(
    texts: list[str], tokenizer: Any, seq_len: int, limit: int | None = None
) -> torch.Tensor:
    """(N, seq_len) int64: the texts tokenized, joined by EOS and cut into equal chunks
    (at most ``limit`` chunks; the ragged tail is dropped)."""
    stream: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if limit is not None and len(stream) >= limit * seq_len:
            break
    n = len(stream) // seq_len
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise ValueError(f"the training text holds {len(stream)} tokens, fewer than one chunk")
    return torch.tensor(stream[: n * seq_len], device="cpu").view(n, seq_len)


def batches(chunks: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless (batch_size, seq_len) batches: the chunks in a seeded random order, reshuffled
    after every pass."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    while True:
        order = torch.randperm(len(chunks), generator=generator, device="cpu")
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield chunks[order[start : start + batch_size]]
        if len(order) < batch_size:
            yield chunks[order].repeat(batch_size // len(order) + 1, 1)[:batch_size]
