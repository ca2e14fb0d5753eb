"""RULER offline: kvbench's generators against lm-eval's own functions (same seed, same
samples), scoring by lm-eval's ``process_results``, determinism, needle depths, the bad-input
checks, and a whole run on the tiny model with the network blocked."""

from __future__ import annotations

import json
import random
import re
import socket
import sys

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness import records
from harness.models import ModelSpec, byte_tokenizer
from harness.run import CONF_DIR, execute
from harness.tasks import ruler
from harness.tasks.ruler import hooks, niah, vt
from harness.tasks.ruler.words import AdjectiveNounWords
from harness.taskspec import TaskConfigError

LM_EVAL_FIELDS = ("index", "input", "outputs", "length", "max_length", "gen_prefix")
# small word lists with the awkward cases of wonderwords' (a hyphenated adjective that
# interleaves with a shorter one, a space, an apostrophe), so lm-eval's import stays fast
ADJECTIVES = ["blue", "blue-eyed", "ad hoc", "red", "x-rated", "old", "old-fashioned", "teeny"]
NOUNS = ["eagle", "fox", "apple", "dump truck", "tam-o'-shanter", "yak", "zebra", "car"]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def lm_eval_ruler(monkeypatch, no_network):
    """lm-eval's RULER modules, imported without downloads: nltk's punkt_tab is reported
    present (only the essay tasks split sentences, and they get kvbench's splitter on both
    sides) and wonderwords gives the small lists above, on both sides."""
    import nltk
    import wonderwords

    class Words:
        _categories = {"nouns": NOUNS, "adjectives": ADJECTIVES, "verbs": ["run"]}

    monkeypatch.setattr(wonderwords, "RandomWord", Words)
    monkeypatch.setattr(nltk.data, "find", lambda resource, *a, **k: resource)
    monkeypatch.setattr(nltk, "download", lambda *a, **k: pytest.fail("nltk download"))
    for name in [m for m in sys.modules if m.startswith("lm_eval.tasks.ruler.")]:
        monkeypatch.delitem(sys.modules, name)
    from lm_eval.tasks.ruler import niah_utils, prepare_niah, vt_utils

    monkeypatch.setattr(prepare_niah, "cached_sent_tokenize", niah.split_sentences)
    words = AdjectiveNounWords(ADJECTIVES, NOUNS)
    monkeypatch.setattr(niah, "needle_words", lambda: words)
    yield prepare_niah, niah_utils, vt_utils
    for name in [m for m in sys.modules if m.startswith("lm_eval.tasks.ruler.")]:
        sys.modules.pop(name)


def test_lazy_word_list_is_lm_evals_sorted_list():
    words = AdjectiveNounWords(ADJECTIVES, NOUNS)
    expected = sorted({f"{a}-{n}" for a in ADJECTIVES for n in NOUNS})
    assert len(words) == len(expected)
    assert [words[i] for i in range(len(words))] == expected
    assert words[-1] == expected[-1]


def test_real_word_list_blocks_match_a_full_sort():
    """On wonderwords' real lists: every adjective starting with b, a, o or x (hyphenated
    ones included) gives the same sorted words as sorting them for real."""
    import wonderwords

    categories = wonderwords.RandomWord()._categories
    adjectives = [a for a in categories["adjectives"] if a[0] in "baox"]
    nouns = categories["nouns"][::7]
    words = AdjectiveNounWords(adjectives, nouns)
    expected = sorted({f"{a}-{n}" for a in adjectives for n in nouns})
    assert len(words) == len(expected)
    assert all(words[i] == expected[i] for i in range(0, len(expected), 13))
    assert any(isinstance(block, list) for block in words.blocks)  # interleaving handled


@pytest.mark.parametrize("name", [n for n, t in ruler.TASKS.items() if t.niah is not None])
def test_niah_samples_equal_lm_evals(lm_eval_ruler, name):
    prepare_niah, niah_utils, _ = lm_eval_ruler
    task = ruler.TASKS[name]
    tokenizer = byte_tokenizer()
    haystack = ruler._haystack(task)
    length = 4096 if task.haystack == ruler.GSM8K_HAYSTACK else 1500
    random.seed(7)
    theirs = prepare_niah.generate_samples(
        haystack,
        TOKENIZER=tokenizer,
        max_seq_length=length,
        template=niah_utils.TEMPLATE,
        num_samples=4,
        **task.niah,
    )
    ours = niah.generate_samples(
        haystack,
        tokenizer,
        rng=random.Random(7),
        max_seq_length=length,
        num_samples=4,
        **task.niah,
    )
    assert len(ours) == len(theirs) == 4
    for mine, reference in zip(ours, theirs, strict=True):
        assert {k: mine[k] for k in LM_EVAL_FIELDS} == {k: reference[k] for k in LM_EVAL_FIELDS}
        assert mine["outputs"][0] in mine["input"]


class WordTokenizer:
    """One token per white-space separated word: lm-eval sizes variable tracking's worked
    example to 500 tokens, which a byte tokenizer cannot fit (lm-eval then loops for ever)."""

    def __call__(self, text: str, return_offsets_mapping: bool = False) -> dict:
        spans = [m.span() for m in re.finditer(r"\S+", text)]
        return Encoding(input_ids=list(range(len(spans))), offset_mapping=spans)


class Encoding(dict):
    @property
    def input_ids(self) -> list[int]:
        return self["input_ids"]


def test_variable_tracking_samples_equal_lm_evals(lm_eval_ruler):
    _, _, vt_utils = lm_eval_ruler
    tokenizer = WordTokenizer()
    random.seed(3)
    np.random.seed(3)
    icl = vt_utils.sys_vartrack_w_noise_random(
        tokenizer=tokenizer, num_samples=1, max_seq_length=500, incremental=5
    )[0]
    theirs = vt_utils.sys_vartrack_w_noise_random(
        tokenizer=tokenizer, num_samples=3, max_seq_length=1200, icl_example=icl
    )
    ours = vt.generate_samples(tokenizer, seed=3, max_seq_length=1200, num_samples=3)
    for mine, reference in zip(ours, theirs, strict=True):
        assert {k: mine[k] for k in LM_EVAL_FIELDS} == {k: reference[k] for k in LM_EVAL_FIELDS}
        assert (
            mine["input"][mine["input"].index("Memorize", 1) :].count("VAR ") == 1 + 4 * 2
        )  # the value, then 4 hops


@pytest.mark.parametrize(
    ("output", "outputs"),
    [
        (" 8090293.", ["8090293"]),
        (" The number is 809029", ["8090293"]),
        ("\x00 1234567 and 7654321", ["1234567", "7654321", "1111111", "7654321"]),
        ("ABCDE, fghij", ["abcde", "FGHIJ", "KLMNO"]),
    ],
)
def test_scoring_is_lm_evals_process_results(output, outputs):
    from lm_eval.tasks.ruler.common_utils import process_results

    doc = {"max_length": 4096, "outputs": outputs}
    expected = process_results(doc, [output])["4096"]
    scored = hooks.process_results(doc, [output])
    assert scored == {"score": expected, "passed": float(expected == 1.0)}
    doc["max_length"] = 1024  # a length lm-eval's own metric list does not have
    assert hooks.process_results(doc, [output])["score"] == expected


def test_generation_is_deterministic_and_lengths_are_independent():
    tokenizer = byte_tokenizer()
    kwargs = dict(samples_per_length=3, depths=[0.2, 0.8], seed=11)
    first = ruler.generate("ruler_niah_multikey_2", tokenizer, lengths=[900, 1400], **kwargs)
    again = ruler.generate("ruler_niah_multikey_2", tokenizer, lengths=[900, 1400], **kwargs)
    alone = ruler.generate("ruler_niah_multikey_2", tokenizer, lengths=[1400], **kwargs)
    other = ruler.generate(
        "ruler_niah_multikey_2", tokenizer, lengths=[900, 1400], **{**kwargs, "seed": 12}
    )
    assert first == again
    assert first[3:] == alone
    assert [s["outputs"] for s in first] != [s["outputs"] for s in other]
    assert [s["max_length"] for s in first] == [900] * 3 + [1400] * 3
    assert all(s["length"] <= s["max_length"] for s in first)


def test_depth_moves_the_needle_and_keeps_lm_evals_needle():
    tokenizer = byte_tokenizer()
    kwargs = dict(max_seq_length=3000, num_samples=3, type_haystack="repeat")
    kwargs |= dict(type_needle_k="words", type_needle_v="numbers")
    free = niah.generate_samples(niah.REPEAT_HAYSTACK, tokenizer, rng=random.Random(5), **kwargs)
    placed = niah.generate_samples(
        niah.REPEAT_HAYSTACK, tokenizer, rng=random.Random(5), depths=[0.0, 0.5, 1.0], **kwargs
    )
    assert [s["outputs"] for s in placed] == [s["outputs"] for s in free]
    for sample, depth in zip(placed, [0.0, 0.5, 1.0], strict=True):
        lines = sample["input"].split("\n")
        needle = next(i for i, line in enumerate(lines) if line.startswith("One of the special"))
        haystack_lines = len(lines) - 3  # the instruction, the needle and the question aside
        assert needle - 1 == round(depth * haystack_lines)
        assert sample["depth"] == depth
        assert abs(sample["needle_depth"] - depth) < 0.15
        start = sample["input"].index("One of the special magic")
        ids = tokenizer(sample["input"]).input_ids
        assert sample["needle_position"] == len(tokenizer(sample["input"][:start]).input_ids)
        assert tokenizer.decode(ids[sample["needle_position"] :]).startswith("One of the special")


def composed(tmp_path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[f"run.results_dir={tmp_path}", "run.report=false", *overrides],
        )
    OmegaConf.set_struct(cfg, False)
    return cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.max_length=1024", "task.lengths=[900,2048]"], "exceed the model's window of 1024"),
        (["task.lengths=[200]"], "cannot hold ruler_niah_single_1's template"),
        (["task=ruler_vt"], "worked example to 500 tokens"),  # bytes: it cannot fit
        (["task.name=ruler_niah_single_9"], "is not a RULER task"),
        (["task.depths=[0.5,1.5]"], "task.depths=[0.5, 1.5]"),
        (
            ["task=ruler_niah_multikey_1_gsm8k_haystack", "task.depths=[0.5]"],
            "more than one needle",
        ),
        (["task.limit=5"], "task.samples_per_length"),
        (["task=ruler_qa_squad", "task.source=local"], "task.source=hub"),
        (["task=gsm8k", "+task.lengths=[1024]"], "only RULER tasks"),
    ],
)
def test_bad_ruler_input_fails_before_the_model_loads(tmp_path, monkeypatch, overrides, message):
    monkeypatch.setattr(ModelSpec, "load", lambda self: pytest.fail("the model was loaded"))
    cfg = composed(tmp_path, "model=tiny_llama_gqa", "task=ruler_niah_single_1", *overrides)
    with pytest.raises(Exception) as excinfo:
        execute(cfg)
    text = str(excinfo.value) + str(excinfo.value.__cause__ or "")
    assert message in text, text
    assert isinstance(excinfo.value.__cause__ or excinfo.value, TaskConfigError | ValueError)
    assert list(tmp_path.iterdir()) == []


def test_ruler_run_offline_on_the_tiny_model(tmp_path, no_network):
    cfg = composed(
        tmp_path,
        "model=tiny_llama_gqa",
        "task=ruler_niah_single_1",
        "task.lengths=[600,800]",
        "task.samples_per_length=2",
        "task.depths=[0.25,0.75]",
    )
    folder = execute(cfg)
    record = json.loads((folder / "record.json").read_text())
    assert record["task"]["ruler"]["haystacks"] == {"ruler_niah_single_1": "repeat"}
    samples = record["samples"]
    assert [s["doc"]["max_length"] for s in samples] == [600, 600, 800, 800]
    assert [s["doc"]["depth"] for s in samples] == [0.25, 0.75, 0.25, 0.75]
    for sample in samples:
        assert set(sample["metrics"]) == {"score", "passed"}
        doc = {"max_length": sample["doc"]["max_length"], "outputs": sample["target"]}
        assert sample["metrics"] == hooks.process_results(doc, [sample["output"]])
        (request,) = sample["requests"]
        assert request["prompt_tokens"] <= sample["doc"]["max_length"] - 128 + 80
        assert 0 < sample["doc"]["needle_position"] < request["prompt_tokens"]
    assert records.find_records(tmp_path) == [folder / "record.json"]


def fake_record(method: str, passes: dict[tuple[int, float], list[int]], kv: float) -> dict:
    """A record whose RULER samples pass as ``passes[(length, depth)]`` says (1 or 0 each)."""
    samples = []
    for (length, depth), outcomes in passes.items():
        for passed in outcomes:
            doc = {
                "max_length": length,
                "depth": depth,
                "needle_depth": depth,
                "needle_position": 9,
            }
            request = {"kv_bytes_prefill": kv * length, "kv_full_bytes_prefill": length}
            samples.append(
                {
                    "task": "kvbench_ruler_niah_single_1",
                    "doc_id": len(samples),
                    "doc": doc,
                    "metrics": {"score": float(passed), "passed": float(passed)},
                    "requests": [request],
                }
            )
    return {
        "run_id": f"tiny__ruler__{method}",
        "model": {"name": "tiny"},
        "task": {"name": "ruler_niah_single_1"},
        "method": {"name": method},
        "samples": samples,
    }


def test_heatmap_data_and_summary_from_records():
    from harness.report import plots_ruler

    record = fake_record(
        "snapkv",
        {(1024, 0.1): [1, 1], (1024, 0.5): [0, 1], (2048, 0.1): [1, 0], (2048, 0.5): [0, 0]},
        kv=0.25,
    )
    samples = pd.DataFrame(plots_ruler.sample_rows(record, "snapkv r=0.2"))
    depths, lengths, share, count = plots_ruler.heatmap_cells(samples)
    assert depths == [0.1, 0.5] and lengths == [1024, 2048]
    assert share.tolist() == [[1.0, 0.5], [0.5, 0.0]]
    assert count.tolist() == [[2, 2], [2, 2]]
    table = plots_ruler.summary(samples).set_index("length")
    assert table.loc[1024, "passed"] == 0.75 and table.loc["all", "n"] == 8
    assert table.loc["all", "passed_mid_depth"] == 0.25  # depth 0.5: 1 of 4
    assert table.loc["all", "passed_edges"] == 0.75  # depth 0.1: 3 of 4
    assert table.loc[2048, "kv_ratio"] == pytest.approx(0.25)
    low, high = plots_ruler.wilson(0.75, 4)
    assert table.loc[1024, "passed_low"] == low and 0.3 < low < 0.75 < high <= 1.0


def test_random_depths_fall_in_fifths():
    from harness.report.plots_ruler import depth_bin

    assert depth_bin(None, 0.05) == 0.1 and depth_bin(None, 0.55) == 0.5
    assert depth_bin(None, 1.0) == 0.9 and depth_bin(0.25, 0.9) == 0.25
    assert np.isnan(depth_bin(None, None))


def test_report_draws_the_heatmaps(tmp_path):
    from harness.report.build import main as report_main

    for method, outcome, kv in (("full", 1, 1.0), ("streamingllm", 0, 0.2)):
        record = fake_record(method, {(1024, 0.5): [outcome] * 3}, kv)
        folder = tmp_path / record["run_id"]  # a record's folder is named by its run id
        folder.mkdir()
        record |= {
            "schema_version": records.SCHEMA_VERSION,
            "score": {"metric": "score,none", "value": float(outcome)},
            "measurements": {"kv_ratio": kv},
        }
        (folder / "record.json").write_text(json.dumps(record))
    assert report_main([str(tmp_path)]) == 0
    out = tmp_path / "report"
    assert (out / "ruler_heatmap__tiny__ruler_niah_single_1.png").is_file()
    assert (out / "ruler_accuracy__tiny__ruler_niah_single_1.png").is_file()
    summary = pd.read_csv(out / "ruler_summary.csv")
    assert sorted(summary[summary["length"] == "all"]["passed"]) == [0.0, 1.0]
    assert "RULER: share of samples passed" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        (["method=streamingllm", "method.ratio=0.3"], "cache"),
        (["method=random_deletion", "method.ratio=0.5"], "prompt"),
        (["method=kvheads", "method.num_kv_heads=1", "method.calibration_tokens=512"], "model"),
    ],
)
def test_every_method_kind_runs_on_ruler(tmp_path, monkeypatch, method, kind):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))
    cfg = composed(
        tmp_path / "results",
        "model=tiny_llama_gqa",
        "task=ruler_niah_single_1",
        "task.lengths=[800]",
        "task.samples_per_length=1",
        "task.depths=[0.5]",
        *method,
    )
    record = records.read_record(execute(cfg))
    assert record["method"]["kinds"] == [kind]
    measured = record["measurements"]
    (sample,) = record["samples"]
    if kind == "prompt":  # the haystack shrank, the question (protected) did not
        assert measured["compressible_ratio"] < 0.7
        assert sample["doc"]["needle_position"] > 0
    else:  # fewer KV bytes than the full cache for the same prompt
        assert measured["kv_ratio"] < 0.75
    assert set(sample["metrics"]) == {"score", "passed"}


@pytest.mark.integration
def test_smollm2_finds_the_needle_and_streamingllm_loses_the_early_ones(tmp_path):
    """The done-when of RULER support, shortened: SmolLM2's full cache retrieves every needle
    at 1k tokens; StreamingLLM at 20 % keeps only the start and the last fifth of the prompt,
    so it loses the needles at depths 10-50 %."""
    common = ["task=ruler_niah_single_1", "task.lengths=[1024]", "task.samples_per_length=5"]
    passed = {}
    for method in (["method=full"], ["method=streamingllm", "method.ratio=0.2"]):
        record = records.read_record(execute(composed(tmp_path, *common, *method)))
        passed[method[0]] = {s["doc"]["depth"]: s["metrics"]["passed"] for s in record["samples"]}
    assert passed["method=full"] == dict.fromkeys([0.1, 0.3, 0.5, 0.7, 0.9], 1.0)
    assert [passed["method=streamingllm"][d] for d in (0.1, 0.3, 0.5)] == [0.0, 0.0, 0.0]
