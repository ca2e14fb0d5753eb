"""The offline lm-eval tasks (harness/tasks) and TaskSpec: data, prompts, metrics, validation.

No model: prompts are rendered by lm-eval's own Task objects, and metrics are computed by
``lm_eval.simple_evaluate`` with an oracle LM that answers from the gold data.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import lm_eval
import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lm_eval.api.model import LM
from lm_eval.api.task import ConfigurableTask
from lm_eval.config.task import TaskConfig
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml  # what lm-eval itself reads task YAMLs with
from omegaconf import OmegaConf

from harness.tasks import TASKS_DIR, local_data
from harness.taskspec import TaskConfigError, TaskSpec

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
STOCK = Path(lm_eval.__file__).resolve().parent / "tasks"
BBH_SIZES = {"causal_judgement": 187, "penguins_in_a_table": 146, "snarks": 178}
COT = "\nA: Let's think step by step.\n"
LOCAL = {  # our task -> (stock YAML, loader, loader kwargs)
    "kvbench_gsm8k": ("gsm8k/gsm8k.yaml", local_data.gsm8k, {}),
    "kvbench_longbench_qasper": ("longbench/qasper.yaml", local_data.longbench, {"longbench_task": "qasper"}),
    "kvbench_longbench_multi_news": ("longbench/multi_news.yaml", local_data.longbench, {"longbench_task": "multi_news"}),
}  # fmt: skip
for _sub in ("boolean_expressions", "navigate", "sports_understanding", "word_sorting"):
    LOCAL[f"kvbench_bbh_cot_fewshot_{_sub}"] = (
        f"bbh/cot_fewshot/{_sub}.yaml",
        local_data.bbh,
        {"bbh_task": _sub},
    )


def spec(conf: str, **overrides) -> TaskSpec:
    """Build conf/task/<conf>.yaml as Hydra does (lists stay ListConfigs: no _convert_)."""
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf" / "task" / f"{conf}.yaml"), overrides)
    return instantiate(cfg)


@pytest.fixture(scope="module")
def tasks() -> dict:
    names = ["kvbench_gsm8k", "kvbench_bbh_cot_fewshot"]
    names += ["kvbench_longbench_qasper", "kvbench_longbench_multi_news"]
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load(names)


def stock_task(name: str) -> ConfigurableTask:
    """lm-eval's stock task for ``name``, exactly as its YAML says, but over our local data."""
    stock_yaml, loader, kwargs = LOCAL[name]
    cfg = load_yaml(STOCK / stock_yaml, resolve_func=True)
    for key in ("dataset_path", "dataset_name", "tag"):
        cfg.pop(key, None)
    return ConfigurableTask(config={**cfg, "custom_dataset": loader, "dataset_kwargs": kwargs})


def render(task: ConfigurableTask, docs: int = 3) -> list[str]:
    task.set_fewshot_seed(1234)  # simple_evaluate's default fewshot_random_seed
    shots = task.config.num_fewshot or 0
    return [task.fewshot_context(task.eval_docs[i], shots) for i in range(docs)]


def test_doc_counts(tasks):
    t = tasks["tasks"]
    assert len(t["kvbench_gsm8k"].eval_docs) == 1319
    assert len(t["kvbench_gsm8k"].fewshot_docs()) == 7473
    assert len(t["kvbench_longbench_qasper"].eval_docs) == 50
    assert len(t["kvbench_longbench_multi_news"].eval_docs) == 200
    bbh = {n: len(t[f"kvbench_bbh_cot_fewshot_{n}"].eval_docs) for n in local_data.BBH_SUBTASKS}
    assert len(bbh) == 27 and sum(bbh.values()) == 6511
    assert all(bbh[n] == BBH_SIZES.get(n, 250) for n in bbh)
    assert tasks["group_map"]["kvbench_bbh_cot_fewshot"] == [
        f"kvbench_bbh_cot_fewshot_{n}" for n in local_data.BBH_SUBTASKS
    ]


def test_gsm8k_fewshot_examples_come_from_train_never_test(tasks):
    task = tasks["tasks"]["kvbench_gsm8k"]
    assert (task.config.fewshot_split, task.config.test_split) == ("train", "test")
    train = {d["question"] for d in task.fewshot_docs()}
    test = {d["question"] for d in task.eval_docs}
    assert not train & test
    for prompt in render(task, docs=5):
        blocks = prompt.split("\n\n")
        shots = [b.removeprefix("Question: ").split("\nAnswer:")[0] for b in blocks[:-1]]
        assert len(shots) == 5 and all(q in train and q not in test for q in shots)


@pytest.mark.parametrize("name", sorted(LOCAL))
def test_config_and_prompts_equal_lm_evals_stock_task(tasks, name):
    ours, stock = tasks["tasks"][name], stock_task(name)
    skip = {"task", "custom_dataset", "dataset_kwargs", "metadata", "tag", "process_results"}
    for f in dataclasses.fields(TaskConfig):
        if f.name not in skip:
            assert getattr(ours.config, f.name) == getattr(stock.config, f.name), f.name
    ours_fn, stock_fn = ours.config.process_results, stock.config.process_results
    assert (ours_fn is None) == (stock_fn is None)
    if ours_fn is not None:  # the same function, loaded twice by lm-eval's YAML loader
        assert ours_fn.__code__.co_filename == stock_fn.__code__.co_filename
        assert ours_fn.__qualname__ == stock_fn.__qualname__
    assert ours.config.metadata["version"] == stock.config.metadata["version"]
    assert render(ours) == render(stock)


def test_bbh_prompt_is_description_then_three_cot_shots_then_question(tasks):
    task = tasks["tasks"]["kvbench_bbh_cot_fewshot_navigate"]
    samples = task.config.fewshot_config.samples
    doc = task.eval_docs[0]
    shots = "".join(f"Q: {s['input']}{COT}{s['target']}\n\n" for s in samples)
    assert len(samples) == 3
    assert render(task, docs=1)[0] == task.config.description + shots + f"Q: {doc['input']}{COT}"


@pytest.mark.parametrize("subtask", local_data.BBH_SUBTASKS)
def test_bbh_shots_equal_the_official_cot_prompts(tasks, subtask):
    """data/bbh/cot-prompts are the BBH authors' prompts; lm-eval's (and ours) match them,
    except that lm-eval starts sports_understanding's reasoning on a new line."""
    task = tasks["tasks"][f"kvbench_bbh_cot_fewshot_{subtask}"]
    official = (DATA / "bbh" / "cot-prompts" / f"{subtask}.txt").read_text(encoding="utf-8")
    official = official.split("-----\n", 1)[1].strip()
    ours = task.config.description + "".join(
        f"Q: {s['input']}{COT}{s['target']}\n\n" for s in task.config.fewshot_config.samples
    )
    if subtask == "sports_understanding":
        official = official.replace("step by step. ", "step by step.\n")
    assert ours.strip() == official


def test_longbench_question_field_is_mapped_from_input(tasks):
    raw = json.loads((DATA / "longbench" / "qasper.jsonl").open().readline())
    doc = tasks["tasks"]["kvbench_longbench_qasper"].eval_docs[0]
    assert doc["question"] == raw["input"] and "input" not in doc
    assert doc["answers"] == raw["answers"] and doc["context"] == raw["context"]


class Oracle(LM):
    """Answers even-numbered docs with the gold answer and odd ones wrongly."""

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        return [self.answer(r.doc, right=r.doc_id % 2 == 0) for r in requests]

    @staticmethod
    def answer(doc: dict, right: bool) -> str:
        if "target" in doc:  # BBH
            return f"Some reasoning. So the answer is {doc['target'] if right else 'WRONG'}."
        if "answers" in doc:  # LongBench
            return doc["answers"][0] if right else "zzz"
        gold = doc["answer"].split("#### ")[-1]  # GSM8K
        return f"Reasoning.\n#### {gold if right else '-99999'}"


@pytest.mark.parametrize("name", ["gsm8k", "bbh", "longbench_qasper", "longbench_multi_news"])
def test_metrics_through_lm_eval_score_right_answers_1_and_wrong_0(name):
    task = spec(name, limit=2)
    out = lm_eval.simple_evaluate(
        model=Oracle(),
        tasks=task.task_names(),
        task_manager=task.task_manager(),
        limit=task.limit,
        num_fewshot=task.num_fewshot,
        bootstrap_iters=0,
        log_samples=True,
    )
    [top] = task.task_names()
    assert out["results"][top][task.primary_metric] == pytest.approx(0.5, abs=1e-6)
    for samples in out["samples"].values():
        for s in samples:
            right = s["doc_id"] % 2 == 0
            for metric in ("exact_match", "score"):
                if metric in s:
                    assert s[metric] == pytest.approx(float(right), abs=1e-6)
    assert sum(len(s) for s in out["samples"].values()) == (54 if name == "bbh" else 2) * (
        2 if name == "gsm8k" else 1  # one logged sample per filter
    )


@pytest.mark.parametrize(
    "name, lm_task, question_field, start",
    [
        ("gsm8k", "kvbench_gsm8k", "question", "Question: "),
        ("bbh", "kvbench_bbh_cot_fewshot_snarks", "input", "Q: "),
        ("longbench_qasper", "kvbench_longbench_qasper", "question", "\n\n Answer the question"),
        ("longbench_multi_news", "kvbench_longbench_multi_news", None, "\n\nNow, write a one"),
    ],
)
def test_split_prompt_protects_the_final_question(tasks, name, lm_task, question_field, start):
    lm_task = tasks["tasks"][lm_task]
    doc = lm_task.eval_docs[0]
    prompt = render(lm_task, docs=1)[0]
    parts = spec(name).split_prompt(prompt)
    assert parts.compressible + parts.protected == prompt
    assert parts.protected.startswith(start) and parts.compressible
    if question_field:
        assert doc[question_field] in parts.protected
        assert parts.protected.count(doc[question_field]) == 1
    if name.startswith("longbench"):
        assert doc["context"] in parts.compressible and doc["context"] not in parts.protected
    else:  # every few-shot example is compressible
        assert parts.protected == lm_task.doc_to_text(doc)


def test_split_prompt_without_a_match_protects_everything():
    assert spec("gsm8k").split_prompt("no marker here").protected == "no marker here"
    assert spec("gsm8k", protect_from=None).split_prompt("Question: x").compressible == ""


def test_task_names_and_task_managers():
    assert spec("bbh", subtask="navigate").task_names() == ["kvbench_bbh_cot_fewshot_navigate"]
    assert spec("bbh", source="hub", subtask="navigate").task_names() == [
        "bbh_cot_fewshot_navigate"
    ]
    local = TaskManager(include_path=str(TASKS_DIR), include_defaults=False).all_tasks
    stock_dirs = [STOCK / "gsm8k", STOCK / "bbh" / "cot_fewshot", STOCK / "longbench"]
    stock = TaskManager(include_path=[str(p) for p in stock_dirs], include_defaults=False)
    for name in ("gsm8k", "bbh", "longbench_qasper", "longbench_multi_news"):
        task = spec(name)
        assert isinstance(task.local_tasks, list) and set(task.task_names()) <= set(local)
        assert set(spec(name, source="hub").task_names()) <= set(stock.all_tasks)
    assert set(spec("gsm8k").task_manager().all_tasks) == set(local)


def test_data_dir_follows_env_not_cwd(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(local_data.DATA_ENV, raising=False)
    assert local_data.data_dir() == DATA
    assert len(local_data.bbh("snarks")["test"]) == 178
    monkeypatch.setenv(local_data.DATA_ENV, str(tmp_path))
    assert local_data.data_dir() == tmp_path.resolve()
    with pytest.raises(FileNotFoundError, match=r"gsm8k/test\.jsonl.*KVBENCH_DATA"):
        local_data.gsm8k()


@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("gsm8k", {"source": "web"}, r"task\.source='web'.*task\.source=local"),
        ("gsm8k", {"limit": 0}, r"task\.limit=0 .*task\.limit=null"),
        ("gsm8k", {"limit": -3}, r"task\.limit=-3"),
        ("gsm8k", {"num_fewshot": -1}, r"task\.num_fewshot=-1 is negative"),
        ("bbh", {"num_fewshot": 4}, r"task\.num_fewshot=4.*only 3"),
        ("longbench_qasper", {"num_fewshot": 1}, r"only 0 few-shot"),
        ("gsm8k", {"truncation": "right"}, r"task\.truncation='right'.*middle"),
        ("bbh", {"subtask": "chess"}, r"task\.subtask='chess'.*boolean_expressions, "),
        ("gsm8k", {"subtask": "navigate"}, r"only bbh has subtasks"),
        ("gsm8k", {"protect_from": "Question:("}, r"task\.protect_from=.*not a valid regex"),
        ("gsm8k", {"protect_from": "(?m)^"}, r"matches the empty string"),
        ("gsm8k", {"name": "arc"}, r"task\.name='arc' has no offline data.*source=hub"),
        ("gsm8k", {"local_tasks": []}, r"task\.local_tasks is empty"),
        ("gsm8k", {"primary_metric": ""}, r"task\.primary_metric='' is not a key"),
        ("gsm8k", {"primary_metric": "exact_match"}, r"<metric>,<filter>"),
        ("longbench_qasper", {"reference_tokens": 0}, r"task\.reference_tokens=0 must be"),
    ],
)
def test_bad_task_config_fails_before_anything_loads(name, overrides, match):
    with pytest.raises(InstantiationException) as err:
        spec(name, **overrides)
    assert isinstance(err.value.__cause__, TaskConfigError)
    assert re.search(match, str(err.value.__cause__))


def test_missing_local_data_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv(local_data.DATA_ENV, str(tmp_path))
    fields = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "task" / "bbh.yaml"))
    del fields["_target_"]
    with pytest.raises(TaskConfigError, match=r"task\.source=local: .*bbh/tasks/navigate\.json"):
        TaskSpec(**{**fields, "subtask": "navigate"})
    TaskSpec(**{**fields, "subtask": "navigate", "source": "hub"})  # the hub needs no local files


def test_reference_answer_is_the_first_listed_answer():
    qasper = spec("longbench_qasper")
    assert qasper.reference_answer({"answers": ["first", "second"]}) == "first"
    assert qasper.reference_answer({"answers": []}) is None
    assert qasper.reference_answer(None) is None
    assert (
        spec("gsm8k").reference_answer({"answer": "6 * 7 = 42\n#### 42"}) == "6 * 7 = 42\n#### 42"
    )
    assert spec("bbh").reference_answer({"target": "(A)"}) is None  # no reference_field


def test_data_hash_is_the_content_of_the_files_the_task_reads(monkeypatch, tmp_path):
    monkeypatch.delenv(local_data.DATA_ENV, raising=False)
    qasper = spec("longbench_qasper")
    standard = qasper.data_hash()
    assert standard and standard == spec("longbench_qasper").data_hash()
    assert spec("longbench_multi_news").data_hash() != standard
    assert spec("longbench_qasper", source="hub").data_hash() is None
    # the same file elsewhere: the same hash; one changed line: another hash
    (tmp_path / "longbench").mkdir()
    lines = (DATA / "longbench" / "qasper.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "longbench" / "qasper.jsonl").write_text("".join(lines))
    monkeypatch.setenv(local_data.DATA_ENV, str(tmp_path))
    assert qasper.data_hash() == standard
    (tmp_path / "longbench" / "qasper.jsonl").write_text("".join(lines[1:]))
    assert qasper.data_hash() != standard


def test_ruler_data_hash_covers_its_gsm8k_haystack():
    from harness.api import build

    haystack = build("task", "ruler_niah_single_2_gsm8k_haystack").data_hash()
    assert haystack and haystack != spec("gsm8k").data_hash()
    assert build("task", "ruler_vt").data_hash() is None  # generated noise, no data file
