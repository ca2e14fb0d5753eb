"""notebooks/analysis.ipynb runs top to bottom (nbclient, the venv's own kernel) against a
results folder of four tiny runs: full cache and StreamingLLM on GSM8K and on RULER."""

from __future__ import annotations

import itertools
from pathlib import Path

import nbformat
import pytest
from hydra import compose, initialize_config_dir
from nbclient import NotebookClient

from harness.run import CONF_DIR, execute

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analysis.ipynb"
TINY = ["model=tiny_llama_gqa", "task=gsm8k", "task.limit=2", "task.num_fewshot=0"]
# RULER's smallest useful run: one length, a needle at two depths
RULER = [
    "model=tiny_llama_gqa",
    "task=ruler_niah_single_1",
    "task.lengths=[600]",
    "task.samples_per_length=2",
    "task.depths=[0.25,0.75]",
]


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("results")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for task, method in itertools.product(
            (TINY, RULER), ("method=full", "method=streamingllm")
        ):
            overrides = [*task, method, "run.max_gen_toks=8", "run.report=false"]
            execute(
                compose(config_name="config", overrides=[f"run.results_dir={root}", *overrides])
            )
    return root


def test_analysis_notebook_runs(tiny_results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVBENCH_RESULTS", str(tiny_results))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows figures
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), (
        "commit the notebook without outputs"
    )
    NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()
    outputs = [out for cell in nb.cells for out in cell.get("outputs", [])]
    text = "".join(str(out.get("text", "")) + str(out.get("data", {})) for out in outputs)
    assert "4 run(s), 0 skipped" in text
    assert "streamingllm" in text
    assert sum("image/png" in out.get("data", {}) for out in outputs) >= 3  # plots shown
    assert "no prompt-method runs" in text and "no KV-Latent runs" in text
    (ruler,) = [cell for cell in nb.cells if "plots_ruler.sample_table" in cell.source]
    shown = "".join(str(out.get("data", {})) for out in ruler.outputs)
    assert "passed_mid_depth" in shown  # the per-run, per-length table
    images = [out for out in ruler.outputs if "image/png" in out.get("data", {})]
    assert len(images) == 2  # the needle heatmaps and the share passed vs KV kept
