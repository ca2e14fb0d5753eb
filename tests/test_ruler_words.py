"""RULER's word tasks offline (common words ``cwe``, frequent words ``fwe``): kvbench's
generators against lm-eval's own functions (same seed, same samples), the prompt settings
against lm-eval's YAMLs, scoring by lm-eval's ``process_results`` (through lm-eval's
evaluator), determinism, bad input, a run on the tiny model with the network blocked, and the
report for tasks without a needle."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import lm_eval
import pandas as pd
import pytest
from hydra.utils import instantiate
from lm_eval.api.model import LM
from lm_eval.tasks._yaml_loader import load_yaml

from harness import records
from harness.models import ModelSpec, byte_tokenizer
from harness.run import execute
from harness.tasks import ruler
from harness.tasks.ruler import cwe, fwe, hooks
from harness.taskspec import TaskConfigError
from tests.test_ruler import composed, fake_record, no_network  # noqa: F401 (a fixture)

FIELDS = ("index", "input", "outputs", "length", "max_length", "gen_prefix")
STOCK = Path(lm_eval.__file__).parent / "tasks" / "ruler"


@pytest.fixture
def lm_eval_module(monkeypatch, request):
    """A fresh import of one of lm-eval's RULER modules (its module-level generator state is
    that of a new process), with the network blocked."""
    request.getfixturevalue("no_network")
    imported = []

    def load(name: str):
        monkeypatch.delitem(sys.modules, f"lm_eval.tasks.ruler.{name}", raising=False)
        module = __import__(f"lm_eval.tasks.ruler.{name}", fromlist=["x"])
        imported.append(module.__name__)
        return module

    yield load
    for name in imported:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("length", [2500, 9000])  # both of lm-eval's branches (< / >= 4096)
def test_common_words_samples_equal_lm_evals(lm_eval_module, length):
    cwe_utils = lm_eval_module("cwe_utils")
    tokenizer = byte_tokenizer()
    random.seed(7)
    theirs = cwe_utils.sys_word_pair_random(
        num_samples=3, max_seq_length=length, tokenizer=tokenizer
    )
    ours = cwe.generate_samples(tokenizer, seed=7, max_seq_length=length, num_samples=3)
    assert len(ours) == len(theirs) == 3
    for mine, reference in zip(ours, theirs, strict=True):
        assert {k: mine[k] for k in (*FIELDS, "input_example")} == {
            k: reference[k] for k in (*FIELDS, "input_example")
        }
        assert mine["depth"] is mine["needle_position"] is mine["needle_depth"] is None
    sample = ours[0]
    words = [w for w in sample["input"].split() if not w[0].isdigit()]
    repeats = 6 if length < 4096 else 30
    assert all(words.count(w) == repeats for w in sample["outputs"])
    assert sorted(set(words) - set(sample["outputs"]))[0] not in sample["outputs"]
    assert cwe.minimum_length(tokenizer, seed=7) <= length


def test_frequent_words_samples_equal_lm_evals(lm_eval_module):
    fwe_utils = lm_eval_module("fwe_utils")
    tokenizer = byte_tokenizer()
    random.seed(5)
    theirs = fwe_utils.sys_kwext(tokenizer=tokenizer, max_seq_length=1500, num_samples=3)
    ours = fwe.generate_samples(tokenizer, seed=5, max_seq_length=1500, num_samples=3)
    assert len(ours) == len(theirs) == 3
    for mine, reference in zip(ours, theirs, strict=True):
        assert {k: mine[k] for k in FIELDS} == {k: reference[k] for k in FIELDS}
        assert mine["depth"] is mine["needle_position"] is mine["needle_depth"] is None
        words = mine["input"].split(". ", 1)[1].split("\n")[0].split()
        counts = [words.count(w) for w in ["...", *mine["outputs"]]]
        assert counts == sorted(counts, reverse=True) and counts[3] > 0
        assert mine["length"] - fwe.TOKENS_TO_GENERATE <= 1500  # the prompt fills the length


@pytest.mark.parametrize("name", ["cwe", "fwe"])
def test_prompt_settings_are_lm_evals(name):
    """Prompt, target delimiter (cwe: a blank line before the answer prefix), greedy decoding
    and generated tokens as lm-eval's own YAML for the task."""
    keys = ("output_type", "doc_to_text", "doc_to_target", "gen_prefix", "target_delimiter")
    keys += ("generation_kwargs",)
    theirs = load_yaml(STOCK / f"{name}.yaml", resolve_func=False)
    ours = load_yaml(Path(hooks.__file__).parent / f"ruler_{name}.yaml", resolve_func=False)
    assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}
    task = ruler.TASKS[f"ruler_{name}"]
    assert task.tokens_to_generate == ours["generation_kwargs"]["max_gen_toks"]


def test_generation_is_deterministic_and_lengths_are_independent():
    tokenizer = byte_tokenizer()
    for name, lengths in (("ruler_cwe", [2500, 3000]), ("ruler_fwe", [1200, 1500])):
        first = ruler.generate(name, tokenizer, lengths=lengths, samples_per_length=2, seed=3)
        again = ruler.generate(name, tokenizer, lengths=lengths, samples_per_length=2, seed=3)
        alone = ruler.generate(name, tokenizer, lengths=lengths[1:], samples_per_length=2, seed=3)
        other = ruler.generate(name, tokenizer, lengths=lengths, samples_per_length=2, seed=4)
        assert first == again
        assert first[2:] == alone
        assert [s["outputs"] for s in first] != [s["outputs"] for s in other]
        assert [s["outputs"] for s in first[:2]] != [s["outputs"] for s in first[2:]]
        assert {s["haystack"] for s in first} == {ruler.TASKS[name].haystack}


class Answers(LM):
    """Answers doc 0 with every expected word and the others with half of them; keeps the
    prompts it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.prompts: list[tuple[str, dict]] = []

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        out = []
        for request in requests:
            self.prompts.append((request.args[0], request.doc))
            words = request.doc["outputs"]
            words = words if request.doc_id == 0 else words[: len(words) // 2]
            out.append(" " + ", ".join(f"{i + 1}. {w.upper()}" for i, w in enumerate(words)))
        return out


@pytest.mark.parametrize(
    ("name", "length", "delimiter"), [("cwe", 2500, "\n\n"), ("fwe", 1200, " ")]
)
@pytest.mark.usefixtures("no_network")
def test_scoring_through_lm_eval_is_its_process_results(tmp_path, name, length, delimiter):
    from lm_eval.tasks.ruler.common_utils import process_results

    cfg = composed(tmp_path, "model=tiny_llama_gqa", f"task=ruler_{name}")
    cfg.task.lengths, cfg.task.samples_per_length = [length], 3
    spec = instantiate(cfg.task)
    model = Answers()
    out = lm_eval.simple_evaluate(
        model=model,
        tasks=spec.task_names(),
        task_manager=spec.task_manager(byte_tokenizer()),
        bootstrap_iters=0,
        log_samples=True,
    )
    (samples,) = out["samples"].values()
    assert len(samples) == 3
    for sample in samples:
        doc, output = sample["doc"], sample["resps"][0][0]
        expected = process_results(doc, [output])[str(length)]
        assert (
            sample["score"]
            == expected
            == (1.0 if sample["doc_id"] == 0 else 0.5 if name == "cwe" else 1 / 3)
        )
        assert sample["passed"] == float(expected == 1.0)
    for prompt, doc in model.prompts:
        assert prompt == doc["input"] + delimiter + doc["gen_prefix"]
    results = out["results"][f"kvbench_ruler_{name}"]
    assert results["score,none"] == pytest.approx(sum(s["score"] for s in samples) / 3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task=ruler_cwe", "task.lengths=[900]"], "cannot hold ruler_cwe's template"),
        (["task=ruler_fwe", "task.lengths=[200]"], "cannot hold ruler_fwe's template"),
        (["task=ruler_fwe", "task.lengths=[1024,8192]"], "use lengths of at most 8142"),
        (["task=ruler_cwe", "task.depths=[0.5]"], "ruler_cwe has no needle"),
    ],
)
def test_bad_input_fails_before_the_model_loads(tmp_path, monkeypatch, overrides, message):
    monkeypatch.setattr(ModelSpec, "load", lambda self: pytest.fail("the model was loaded"))
    cfg = composed(tmp_path, "model=tiny_llama_gqa", *overrides)
    with pytest.raises(TaskConfigError) as excinfo:
        execute(cfg)
    assert message in str(excinfo.value), str(excinfo.value)
    assert "\n" not in str(excinfo.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("no_network")
def test_word_tasks_run_offline_on_the_tiny_model(tmp_path):
    for name, length in (("ruler_cwe", 2500), ("ruler_fwe", 1200)):
        cfg = composed(
            tmp_path / name,
            "model=tiny_llama_gqa",
            f"task={name}",
            f"task.lengths=[{length}]",
            "task.samples_per_length=2",
        )
        record = records.read_record(execute(cfg))
        assert record["task"]["ruler"]["haystacks"] == {name: ruler.TASKS[name].haystack}
        assert record["task"]["ruler"]["depths"] is None
        for sample in record["samples"]:
            doc = sample["doc"]
            assert doc["max_length"] == length and doc["length"] > 0
            assert doc["depth"] is doc["needle_position"] is doc["needle_depth"] is None
            scored = {"max_length": length, "outputs": sample["target"]}
            assert sample["metrics"] == hooks.process_results(scored, [sample["output"]])
            (request,) = sample["requests"]
            assert 0 < request["prompt_tokens"] <= length


def test_report_without_needles_has_no_heatmap_but_the_share_per_length(tmp_path):
    from harness.report import plots_ruler
    from harness.report.build import main as report_main

    for method, outcome, kv in (("full", 1, 1.0), ("streamingllm", 0, 0.2)):
        record = fake_record(method, {(1024, None): [outcome] * 2, (2048, None): [1, 0]}, kv)
        for sample in record["samples"]:
            sample["task"] = "kvbench_ruler_cwe"
            sample["doc"] |= {"needle_depth": None, "needle_position": None}
        record["task"]["name"] = "ruler_cwe"
        record |= {
            "schema_version": records.SCHEMA_VERSION,
            "score": {"metric": "score,none", "value": 0.5},
            "measurements": {"kv_ratio": kv},
        }
        (tmp_path / record["run_id"]).mkdir()  # a record's folder is named by its run id
        (tmp_path / record["run_id"] / "record.json").write_text(json.dumps(record))
    samples = pd.DataFrame(plots_ruler.sample_rows(record, "streamingllm"))
    table = plots_ruler.summary(samples).set_index("length")
    assert table.loc[1024, "passed"] == 0.0 and table.loc[2048, "passed"] == 0.5
    assert table.loc["all", "n"] == 4
    assert pd.isna(table.loc["all", "passed_edges"]) and pd.isna(
        table.loc["all", "passed_mid_depth"]
    )
    assert report_main([str(tmp_path)]) == 0
    out = tmp_path / "report"
    assert not list(out.glob("ruler_heatmap__*"))
    assert (out / "ruler_accuracy__tiny__ruler_cwe.png").is_file()
    summary = pd.read_csv(out / "ruler_summary.csv")
    assert sorted(summary[summary["length"] == "all"]["passed"]) == [0.25, 0.75]
