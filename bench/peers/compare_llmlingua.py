"""kvbench's LLMLingua (methods/prompt/llmlingua.py) next to Microsoft's llmlingua 0.2.2 on
identical prompts: the demonstrations each keeps, the tokens each keeps, and the time.

    bash bench/peers/setup_llmlingua.sh              # once: the peer's own venv (transformers<4.48)
    OMP_NUM_THREADS=1 python bench/peers/compare_llmlingua.py       # 5 GSM8K prompts, rates 0.3 0.5
    python bench/peers/compare_llmlingua.py --samples 20 --rates 0.3 0.5 0.7 --threads 2

Both sides load the same saved model folder (kvbench's dequantised SmolLM2) as compressor
and get the same text: GSM8K 5-shot prompts rendered by kvbench's lm-eval task, split by
``TaskSpec.split_prompt`` into the compressible demonstrations and the protected question.
kvbench compresses the demonstrations at ``rate`` (the share removed) with its defaults
(conf/method/llmlingua.yaml); the package (bench/peers/llmlingua_driver.py, its own process)
gets the same demonstrations as its ``context`` list, the question, ``iterative_size`` and
``context_budget`` from that config, and kvbench's target as ``target_token``
(``round(n * (1 - rate))`` of kvbench's n compressor tokens), so both aim at the same count.

Columns: ``achieved`` = 1 - kept / n, both sides counted the same way: SmolLM2 tokens of the
text each returns before the question over those of the uncompressed demonstrations (``ours
own`` = kvbench's own count, ``last_stats``; ``|error|`` = |achieved - rate|, mean over
prompts); ``demos`` = demonstrations kept by the budget controller (mean per prompt);
``demos both/either`` = |ours ∩ package| / |ours ∪ package| over all prompts; ``tokens both/ours`` = share of our kept tokens that the package kept too,
by position (``(chance)``: its expectation had the package kept as many tokens uniformly at
random), ``tokens both/either`` = |ours ∩ package| / |ours ∪ package| of the kept tokens;
``identical`` = share of prompts where both kept the same tokens; ``time`` = compression
time ours / package (same machine, one after the other). Kept tokens are matched by where
they lie in the demonstrations (the package reports its positions, see the driver), each
newline separately: kvbench tokenises each demonstration alone, so its separator is one
"\\n\\n" token, the package the joined text, where it is two "\\n". The separator before the
question is left out (the package always adds it back; kvbench may drop it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from bench.peers.peer_io import recording, run_driver  # noqa: E402
from harness.api import build  # noqa: E402
from harness.provenance import device_description  # noqa: E402
from methods.base import PromptParts  # noqa: E402

PEER_PYTHON = HERE / ".venv-llmlingua" / "bin" / "python"


def gsm8k_prompts(count: int) -> list[PromptParts]:
    """The first ``count`` GSM8K test prompts as kvbench's lm-eval task renders them (5-shot,
    lm-eval's default few-shot seed), split into demonstrations and question."""
    task = build("task", "gsm8k")
    [name] = task.task_names()
    lm_task = task.task_manager().load([name])["tasks"][name]
    lm_task.set_fewshot_seed(1234)  # simple_evaluate's default fewshot_random_seed
    shots = lm_task.config.num_fewshot or 0
    docs = lm_task.eval_docs
    return [task.split_prompt(lm_task.fewshot_context(docs[i], shots)) for i in range(count)]


def split(text: str, separator: str) -> list[str]:
    """The demonstrations as kvbench's LLMLingua cuts them (each ends with the separator)."""
    return [p for p in re.split(f"(?<={re.escape(separator)})", text) if p]


def kept_keys(tokenizer, text: str, starts: dict[int, int], positions: list[int]) -> Counter:
    """Where the kept tokens of ``text`` lie: a (demonstration, character offset in it) per
    token, one per character for a newline-only token (so "\\n\\n" and "\\n", "\\n" agree).
    ``starts``: demonstration -> where it starts in text; ``positions``: the kept tokens."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    keys: Counter = Counter()
    for p in positions:
        a, b = offsets["offset_mapping"][p]
        demo = max((s, d) for d, s in starts.items() if s <= a)[1]
        chars = range(a, b) if b > a and not text[a:b].strip("\n") else [a]
        keys.update((demo, c - starts[demo]) for c in chars)
    return keys


def our_keys(tokenizer, pieces: list[str], kept: list[int] | None) -> Counter:
    """:func:`kept_keys` for kvbench, which tokenises each demonstration (piece) alone:
    ``kept`` indexes the pieces' tokens one after another (None: all of them)."""
    keys, first = Counter(), 0
    for i, piece in enumerate(pieces):
        n = len(tokenizer(piece, add_special_tokens=False)["input_ids"])
        mine = range(n) if kept is None else [k - first for k in kept if first <= k < first + n]
        keys += kept_keys(tokenizer, piece, {i: 0}, mine)
        first += n
    return keys


def package_keys(tokenizer, demos: list[str], result: dict) -> Counter:
    """:func:`kept_keys` for the package, which tokenises the kept demonstrations joined by
    "\\n\\n"; checks that this tokeniser gives the token ids it reports."""
    text, starts = "", {}
    for i in result["used"]:
        text += "\n\n" if starts else ""
        starts[i] = len(text)
        text += demos[i]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    positions = result["kept_positions"]
    if positions is None:  # the package's KV-cache compression (past 8k tokens here)
        raise RuntimeError("the package could not report which positions it kept")
    if [ids[p] for p in positions] != result["kept_ids"]:
        raise RuntimeError("the package's kept positions do not match its kept token ids")
    return kept_keys(tokenizer, text, starts, positions)


def compress_all(method, prompts: list, rate: float) -> tuple[list[dict], list[dict]]:
    """Our side: each prompt compressed by ``method`` (applied), with what it kept, and the
    request the package's driver gets for the same prompt."""
    ours, requests, record = [], [], {}
    recording(method, "select_text", record)
    recording(method, "control_context_budget", record)
    for index, parts in enumerate(prompts):
        record.clear()
        text = method.shorten_text(parts)
        ids, kept = record["select_text"]
        pieces = split(parts.compressible, method.separator)
        ours.append(
            {"rate": rate, "prompt": index, "stats": method.last_stats(), "pieces": pieces,
             "text": text.removesuffix(parts.protected), "kept": kept,
             "used": record.get("control_context_budget", list(range(len(pieces))))}
        )  # fmt: skip
        requests.append(
            {"demonstrations": [p.removesuffix(method.separator) for p in pieces],
             "question": parts.protected, "target_token": method.kept_count(len(ids))}
        )  # fmt: skip
    return ours, requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--peer-python", default=str(PEER_PYTHON))
    args = parser.parse_args()
    if not Path(args.peer_python).exists():
        sys.exit(f"no llmlingua environment at {args.peer_python}: run setup_llmlingua.sh")
    torch.set_num_threads(args.threads)

    spec = build("model", "smollm2_135m")
    model, tokenizer = spec.load()
    torch.set_num_threads(args.threads)
    prompts = gsm8k_prompts(args.samples)

    ours, requests = [], []
    for rate in args.rates:
        method = build("method", "llmlingua", ratio=round(1 - rate, 12))  # rate: share removed
        with method.applied(model, tokenizer):
            ours_rate, requests_rate = compress_all(method, prompts, rate)
        ours += ours_rate
        requests += requests_rate
    request = {
        "model_dir": spec.resolved_path(), "threads": args.threads,
        "iterative_size": method.iterative_size,
        "context_budget": f"+{method.context_budget}", "prompts": requests,
    }  # fmt: skip
    peer = run_driver(args.peer_python, "llmlingua_driver.py", request, "out.json",
                      lambda out: json.loads(out.read_text()))  # fmt: skip

    # both sides must run the same compressor: the mean NLL of one demonstration, each side
    first = method.scorer.encode(requests[0]["demonstrations"][0])
    drift = abs(method.scorer.token_scores(first, attention=False).self_info[1:].mean().item()
                - peer["probe_nll"])  # fmt: skip
    if drift > 1e-3:
        sys.exit(f"the package's compressor differs from ours: mean NLL off by {drift:.3g}")
    rows = [row(tokenizer, prompts[m["prompt"]], m, request, theirs)
            for m, request, theirs in zip(ours, requests, peer["results"], strict=True)]  # fmt: skip
    table = summarize(pd.DataFrame(rows))
    print(f"# kvbench vs llmlingua {peer['versions']} on {device_description(model.device)},")
    print(f"# threads={args.threads}; SmolLM2-135M compressor (mean NLL differs by {drift:.1e}),")
    print(f"# {len(prompts)} GSM8K 5-shot prompts; means over prompts")
    print(table.to_markdown(index=False, floatfmt=".3g"))


def row(tokenizer, parts: PromptParts, mine: dict, request: dict, theirs: dict) -> dict:
    """One prompt at one rate: what each side kept, counted the same way."""
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    n = count(parts.compressible)
    demos, last = request["demonstrations"], len(mine["pieces"]) - 1
    trim = lambda keys: Counter(  # noqa: E731
        {k: v for k, v in keys.items() if k[0] < last or k[1] < len(demos[last])}
    )
    every = trim(our_keys(tokenizer, mine["pieces"], None))
    a = trim(our_keys(tokenizer, mine["pieces"], mine["kept"]))
    b = package_keys(tokenizer, demos, theirs)
    their_text = theirs["compressed_prompt"].removesuffix(parts.protected)
    return {
        "rate": mine["rate"],
        "ours own": mine["stats"]["achieved_rate"],
        "achieved ours": 1 - count(mine["text"]) / n,
        "achieved package": 1 - count(their_text) / n,
        "|error| ours": abs(1 - count(mine["text"]) / n - mine["rate"]),
        "|error| package": abs(1 - count(their_text) / n - mine["rate"]),
        "demos ours": len(mine["used"]),
        "demos package": len(theirs["used"]),
        "both": len(set(mine["used"]) & set(theirs["used"])),
        "either": len(set(mine["used"]) | set(theirs["used"])),
        "shared": (a & b).total(),
        "union": (a | b).total(),
        "ours kept": a.total(),
        "chance": a.total() * b.total() / every.total(),
        "identical": float(a == b),
        "ours_s": mine["stats"]["compress_s"],
        "package_s": theirs["compress_s"],
    }


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    sums = ("both", "either", "shared", "union", "ours kept", "chance", "ours_s", "package_s")
    table = frame.groupby("rate", sort=False).agg(
        **{c: (c, "mean") for c in ("ours own", "achieved ours", "achieved package",
                                    "|error| ours", "|error| package", "demos ours",
                                    "demos package", "identical")},
        **{c: (c, "sum") for c in sums},
    ).reset_index()  # fmt: skip
    table["demos both/either"] = table["both"] / table["either"]
    table["tokens both/ours"] = table["shared"] / table["ours kept"]
    table["(chance)"] = table["chance"] / table["ours kept"]
    table["tokens both/either"] = table["shared"] / table["union"]
    table["time ours/package"] = table["ours_s"] / table["package_s"]
    return table[
        ["rate", "ours own", "achieved ours", "achieved package", "|error| ours",
         "|error| package", "demos ours",
         "demos package", "demos both/either", "tokens both/ours", "(chance)",
         "tokens both/either", "identical", "time ours/package"]
    ]  # fmt: skip


if __name__ == "__main__":
    main()
