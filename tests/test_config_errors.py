"""A bad config fails before any model loads, names the field, and leaves no run folder."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from harness.run import CONF_DIR, execute


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
        (["method=streamingllm", "method.ratio=1.5"], "method.ratio=1.5 is outside (0, 1]"),
        (["method=streamingllm", "method.ratio=0"], "method.ratio=0"),
        (["method=full", "method.ratio=0.5"], "method.ratio=0.5 for the full cache"),
        (["method=streamingllm", "method.budget=8", "method.window=16"], "exceed"),
        (["method=selfinfo", "method.compressor=gpt5"], "method.compressor='gpt5' is not a model"),
        (["task.limit=0"], "limit"),
        (["task=bbh", "task.subtask=no_such_task"], "subtask"),
        (["model.source=gguf_package", "model.path=not_installed_pkg"], "pip install"),
        (["model.dtype=float64"], "model.dtype"),
        pytest.param(
            ["model.device=cuda"],
            "model.device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible"),
        ),
        (["model.device=mps"], "model.device"),
        (["model.attn_implementation=flash_attention_2"], "runs on CUDA only"),
        (["method=pyramidkv", "model.attn_implementation=eager"], "eager attention"),
    ],
)
def test_bad_config_fails_before_loading_and_writes_nothing(tmp_path, overrides, message):
    cfg = composed(tmp_path, *overrides)
    with pytest.raises(Exception, match=None) as excinfo:
        execute(cfg)
    text = str(excinfo.value) + str(excinfo.value.__cause__ or "")
    assert message in text
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override", ["method=no_such_method", "task=no_such_task", "model=nope"])
def test_unknown_group_option_lists_the_valid_ones(tmp_path, override):
    with pytest.raises(HydraException, match="Available options"):
        composed(tmp_path, override)
