"""bench/gpu/methods_speed.py without a GPU: one method's failure is named in its rows and costs
no other method, the time budget skips and names rows, the table's ratios and named lines. The
whole script runs in tests/test_bench_gpu.py (bash bench/gpu/run.sh --dry-run)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from bench.gpu import methods_speed, methods_table
from harness.models import byte_tokenizer


class FakeRows:
    """Stands in for ModelRows / PromptRows: ``broken`` maps a method to what it raises."""

    def __init__(self, broken: dict[str, Exception], contexts: list[int]) -> None:
        self.broken, self.calls = broken, []
        self.args = SimpleNamespace(
            contexts=contexts, model_methods=["kvheads", "kvlatent_kv"],
            prompt_methods=["dac", "selfinfo"],
        )  # fmt: skip
        self.base = SimpleNamespace(device=torch.device("cpu"))
        self.device, self.tokenizer = torch.device("cpu"), byte_tokenizer()

    def measure(self, name: str, *args) -> dict:
        self.calls.append(name)
        if name in self.broken:
            raise self.broken[name]
        return {"seconds": 0.01}


def test_a_failing_method_is_named_in_its_rows_and_the_others_run():
    rows = FakeRows({"kvheads": IndexError("index 1 is out of bounds")}, [16, 32])
    prompts = FakeRows({"dac": torch.OutOfMemoryError("CUDA out of memory")}, [16, 32])
    written = []
    out = methods_speed.measure(rows, prompts, methods_speed.Budget(60), written.append)
    status = {(r["kind"], r["method"], r["context"]): r["status"] for r in out}
    assert status[("model", "kvheads", 16)] == "failed: IndexError: index 1 is out of bounds"
    assert status[("model", "kvheads", 32)].startswith("skipped: failed: IndexError")
    assert status[("prompt", "dac", 16)] == "out of memory"
    assert status[("prompt", "dac", 32)] == "skipped: out of memory at a smaller context"
    others = {k: v for k, v in status.items() if k[1] not in ("kvheads", "dac")}
    assert set(others.values()) == {"ok"} and len(others) == 2 * (2 + 2)
    assert len(written) == len(out) == 2 * (3 + 3)  # the files are rewritten after every row
    assert rows.calls.count("kvheads") == 1 and prompts.calls.count("dac") == 1


def test_the_budget_skips_what_would_not_fit_and_names_it():
    budget = methods_speed.Budget(10.0)
    assert budget.why_not("dac", 8192) is None
    budget.last["dac"] = (8192, 2.0)
    assert budget.why_not("dac", 32768) == "skipped: projected 16 s > 10 s left"
    budget.start = time.perf_counter() - 11
    assert budget.why_not("full", 8192) == "skipped: the table's 10 s budget is spent"


def test_the_prompt_is_the_asked_tokens_of_text_and_a_kept_question():
    tokenizer = byte_tokenizer()
    parts, ids = methods_speed.prompt_text(tokenizer, 1000)
    assert len(ids) == 1000 and parts.compressible.startswith("Question: ")
    assert "\n\n" in parts.compressible and parts.protected == methods_speed.QUESTION


def model_row(method: str, kv: int, decode_s: float, status: str = "ok") -> dict:
    row = {"kind": "model", "context": 64, "method": method, "status": status}
    if status == "ok":
        row |= {
            "heads": "", "transform_s": 0.0, "prefill_s": 0.1, "decode_s": decode_s,
            "kv_bytes": kv, "kv_bytes_final": kv, "weight_bytes": 1000, "peak_bytes": 5000,
        }  # fmt: skip
    return row


def test_the_table_compares_with_the_full_cache_and_the_forward_pass():
    rows = [
        model_row("full", 1000, 0.010),
        model_row("kvlatent_kv", 500, 0.008),
        model_row("kvheads", 1000, 0.012),
        model_row("kvlatent_k", 0, 0, status="failed: RuntimeError: boom"),
        {"kind": "prompt", "context": 64, "method": "forward", "status": "ok", "seconds": 0.5,
         "tokens": 64, "kept": 1.0, "passes": 1, "chunks": 1},
        {"kind": "prompt", "context": 64, "method": "dac", "status": "ok", "seconds": 5.0,
         "tokens": 64, "kept": 0.5, "passes": 4, "chunks": 1},
    ]  # fmt: skip
    model = methods_table.model_frame(rows, bandwidth=1e5).set_index("method")
    assert model.loc["kvlatent_kv", "KV vs full"] == 0.5
    assert model.loc["kvlatent_kv", "decode vs full"] == 0.8
    assert model.loc["full", "decode vs floor"] == 0.010 / ((1000 + 1000) / 1e5)
    prompt = methods_table.prompt_frame(rows).set_index("method")
    assert prompt.loc["dac", "vs forward"] == 10 and prompt.loc["dac", "per pass vs forward"] == 2.5
    lines = methods_table.verdicts(model.reset_index(), prompt.reset_index())
    assert "- kvheads at 64: KV bytes not below the full cache" in lines
    assert any(line.startswith("- kvheads at 64: decodes slower") for line in lines)
    assert "- kvlatent_k at 64: failed: RuntimeError: boom" in lines
    assert "- dac at 64: 10.00x one plain forward pass, in 4 compressor passes" in lines
    both = methods_table.csv_frame(model.reset_index(), prompt.reset_index())
    assert list(both.columns[:4]) == ["kind", "method", "context", "status"]
    assert list(both["kind"]) == ["model"] * 4 + ["prompt"] * 2
