"""The command line's manners: Ctrl-C ends it with one line, Hydra's own output gets a folder
per run, ``run.max_gen_toks`` caps every task's generation, and a run prints no
``past_key_values`` FutureWarning."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness.api import build
from harness.generation import greedy_generate, score_continuation
from harness.lm import KVBenchLM
from harness.run import CONF_DIR
from harness.session import open_session

REPO = Path(__file__).resolve().parents[1]

INTERRUPTED = """
import os, signal, sys, time
from pathlib import Path
# a child of a background job inherits SIGINT ignored; a user's terminal delivers it
signal.signal(signal.SIGINT, signal.default_int_handler)
from harness.models import ModelSpec

real_load = ModelSpec.load

def load(self):  # the run is under way: say so, then work until interrupted
    loaded = real_load(self)
    Path(os.environ["KVBENCH_TEST_LOADED"]).write_text("loaded")
    time.sleep(120)
    return loaded

ModelSpec.load = load
from harness.run import main
sys.argv = ["kvbench", *sys.argv[1:]]
main()
"""


def test_ctrl_c_ends_a_run_with_one_line(tmp_path):
    """SIGINT in the middle of a run used to print a 108-line traceback."""
    marker = tmp_path / "loaded"
    env = {**os.environ, "PYTHONPATH": str(REPO), "KVBENCH_TEST_LOADED": str(marker)}
    args = ["model=tiny_llama_gqa", "task.limit=1", f"run.results_dir={tmp_path / 'results'}"]
    child = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), child.communicate(timeout=30)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("kvbench: interrupted (Ctrl-C)")
    assert not list((tmp_path / "results").glob("tiny_llama_gqa__*"))


def test_hydra_output_is_one_folder_per_run():
    """Two runs started in the same second used to share `.hydra/<time>/`; the folder's name
    now ends with the process id (and a sweep's likewise)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    run_dir = OmegaConf.select(cfg, "hydra.run.dir")
    sweep_dir = OmegaConf.select(cfg, "hydra.sweep.dir")
    assert run_dir.startswith("results/.hydra/") and run_dir.endswith(f"-{os.getpid()}")
    assert sweep_dir.startswith("results/.hydra/multirun-")
    assert sweep_dir.endswith(f"-{os.getpid()}")


def test_run_max_gen_toks_caps_the_task_s_own_limit(tiny_gqa):
    """BBH asks for up to 1,024 tokens: `run.max_gen_toks` could not cap that (one Gemma-3
    sample ran 283 s); now it caps every task, and null keeps the task's own limit."""
    model, tokenizer = tiny_gqa
    eos = tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False)
    request = {"until": [], "max_gen_toks": 40, "do_sample": False}
    generated = {}
    with open_session(build("method", "full"), model, tokenizer, max_length=512) as session:
        for cap in (5, None):
            session.eos_token_ids = []  # a model that never stops
            lm = KVBenchLM(session, max_gen_toks=cap)
            lm._generate_one(None, "Q: 2+2?\nA:", request, eos)
            generated[cap] = session.measurements[-1].generated_tokens
    assert generated == {5: 5, None: 40}
    from harness.preflight import generation_limit

    assert generation_limit(1024, 5) == 5 and generation_limit(1024, None) == 1024
    assert generation_limit(None, None) == 256 and generation_limit(None, 12) == 12


def test_no_past_key_values_future_warning(tiny_gqa):
    """transformers 5.24 takes the cache as `cache`: passing `past_key_values` printed a
    FutureWarning on every run. kvbench passes the name the installed version takes."""
    model, tokenizer = tiny_gqa
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        greedy_generate(model, ids, max_new_tokens=3)
        score_continuation(model, [5, 6, 7], [8, 9])
        score_continuation(model, [5, 6, 7], [8, 9], stepwise=True)
        with open_session(build("method", "llmlingua", ratio=0.5), model, tokenizer) as session:
            session.generate("Some context to shorten. " * 8 + "Question: ok?", max_new_tokens=2)
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert not [m for m in messages if "past_key_values" in m], messages


def test_a_long_step_says_it_is_still_working(caplog):
    """Converting a large GGUF vocabulary takes minutes with no progress bar of its own."""
    from harness import model_cache

    with caplog.at_level(logging.INFO, logger="kvbench"):
        with model_cache.heartbeat("model x: step 1/3, tokenizer", every=0.05):
            time.sleep(0.3)
    beats = [r.getMessage() for r in caplog.records if "still working" in r.getMessage()]
    assert len(beats) >= 2 and beats[0].startswith("model x: step 1/3, tokenizer")


@pytest.mark.parametrize("name", ["gemma3_270m", "smollm2_135m"])
def test_gguf_models_name_every_package_they_need(name):
    cfg = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
    assert cfg.packages and all(isinstance(p, str) for p in cfg.packages)
    if name == "gemma3_270m":  # the four chunk packages carry the GGUF's bytes
        assert len(cfg.packages) == 5
