"""One way to apply any method: the README's Python example, sessions, Compose, evaluate()."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from harness.api import build, evaluate
from harness.session import open_session
from methods.base import Compose, PromptParts
from tests.conftest import model_spec

REPO = Path(__file__).resolve().parents[1]


def readme_python_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # evaluate() writes results/ under the cwd
    code = readme_python_example().replace("smollm2_135m", "tiny_llama_gqa")
    code = code.replace('"task.limit": 2}', '"task.limit": 1, "run.max_gen_toks": 8}')
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    m = namespace["m"]
    assert m.kv_bytes_prefill / m.kv_full_bytes_prefill == pytest.approx(0.2, abs=0.01)
    assert namespace["record"]["measurements"]["kv_ratio"] == pytest.approx(0.2, abs=0.01)
    assert (tmp_path / "results").is_dir()


def test_a_session_applies_the_method_only_inside_the_block(tiny_gqa):
    model, tokenizer = tiny_gqa
    ids = torch.randint(0, 256, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    with open_session(build("method", "streamingllm", ratio=0.25), model, tokenizer) as session:
        inside = session.generate(ids, max_new_tokens=3)
    with open_session(build("method", "full"), model, tokenizer) as session:
        after = session.generate(ids, max_new_tokens=3)
    assert inside.generation.kv_bytes_prefill == pytest.approx(
        0.25 * after.generation.kv_bytes_prefill, rel=0.02
    )
    assert after.measurement.kv_bytes_prefill == after.measurement.kv_full_bytes_prefill
    assert [len(session.measurements)] == [1]


def test_compose_prepares_prompt_methods_then_registers_cache_hooks(tiny_gqa):
    model, tokenizer = tiny_gqa
    method = Compose(
        methods=[build("method", "streamingllm", ratio=0.5), build("method", "random_deletion")]
    )
    assert method.kinds() == {"cache", "prompt"}
    prompt = PromptParts("Some context that may be shortened. " * 8, "Question: what?")
    with open_session(method, model, tokenizer) as session:
        out = session.generate(prompt, max_new_tokens=2)
    m = out.measurement
    assert m.prompt_rate_requested == pytest.approx(0.5)
    assert m.compressible_tokens < m.compressible_tokens_original
    assert m.prompt_tokens < m.prompt_tokens_original
    assert tokenizer.decode(out.prompt_ids).endswith("Question: what?")
    # the cache method kept half of what the model saw (the prompt after deletion)
    assert m.kv_bytes_prefill < m.kv_full_bytes_prefill


def test_loglikelihood_of_a_session_is_the_model_s(tiny_mha):
    model, tokenizer = tiny_mha
    with open_session(build("method", "full"), model, tokenizer) as session:
        logprob, greedy = session.loglikelihood("abc def", " ghi")
    ids = tokenizer.encode("abc def") + tokenizer.encode(" ghi", add_special_tokens=False)
    n = len(tokenizer.encode(" ghi", add_special_tokens=False))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -n - 1 : -1].log_softmax(-1)
    expected = logits.gather(1, torch.tensor(ids[-n:])[:, None]).sum()
    assert logprob == pytest.approx(float(expected), abs=1e-4)
    assert isinstance(greedy, bool)
    assert session.measurements[0].request_type == "loglikelihood"


def test_evaluate_composes_the_cli_config_and_reuses_the_finished_run(tmp_path):
    overrides = {"task.limit": 1, "run.max_gen_toks": 4, "run.results_dir": str(tmp_path)}
    first = evaluate("tiny_llama_gqa", "streamingllm", "gsm8k", overrides)
    again = evaluate("tiny_llama_gqa", "streamingllm", "gsm8k", overrides)
    assert first == again  # read back from the same folder, not recomputed
    assert first["config"]["method"]["ratio"] == 0.2
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [first["run_id"]]


def test_a_model_method_is_applied_once_and_stays():
    model, tokenizer = model_spec("tiny_llama_gqa").load()
    kvlatent = build("method", "kvlatent_kv", dim=8, train=False)
    with open_session(kvlatent, model, tokenizer) as session:
        out = session.generate([5] * 20, max_new_tokens=2)
    # KV-Latent halves every head's keys and values (16 -> 8 channels): half the bytes
    assert out.measurement.kv_bytes_prefill == out.measurement.kv_full_bytes_prefill // 2
    assert session.model.model.layers[0].self_attn.k_proj.out_features == 2 * 8


@pytest.mark.parametrize(
    ("name", "expected"),
    [("bbh_date_understanding", ["kvbench_bbh_cot_fewshot_date_understanding"]),
     ("ruler_niah_single_1", ["kvbench_ruler_niah_single_1"])],
)  # fmt: skip
def test_build_composes_entries_built_on_another(name, expected):
    """These task configs start from another entry (``defaults: [bbh]``, ``[ruler]``)."""
    assert build("task", name).task_names() == expected


def test_a_prompt_method_sharing_the_model_composes_with_a_cache_method(tiny_gqa):
    """DAC's compressor is the benchmarked model itself: its scoring passes run untouched by
    the cache method applied for the requests (the same text comes out), while the request's
    prefill is compressed."""
    model, tokenizer = tiny_gqa
    prompt = PromptParts("Some context that may be shortened, sentence by sentence. " * 6, "Q?")
    texts, ratios = [], []
    for method in (
        build("method", "dac", ratio=0.7),
        Compose(methods=[build("method", "dac", ratio=0.7), build("method", "snapkv", ratio=0.5)]),
    ):
        with open_session(method, model, tokenizer) as session:
            out = session.generate(prompt, max_new_tokens=2)
        texts.append(tokenizer.decode(out.prompt_ids))
        ratios.append(out.measurement.kv_bytes_prefill / out.measurement.kv_full_bytes_prefill)
    assert texts[0] == texts[1]
    assert ratios[1] < ratios[0]
