"""Several GPUs, checked on the CPU: a sweep runs one job per GPU through Hydra's joblib
launcher (``hydra/launcher=gpus``), each job leasing a GPU no other job holds
(harness/gpu_lease.py); more jobs than GPUs are refused before any starts; a model too large
for one GPU loads with ``model.device_map=auto``, which reaches ``from_pretrained``; and what
cannot run is refused in one line. A fake CUDA device (``torch.cuda``'s queries patched)
stands in where the logic needs GPUs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import joblib
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import harness.models
from harness import gpu_lease, measure
from harness.models import ModelConfigError, ModelSpec, byte_tokenizer
from harness.run import CONF_DIR
from tests.conftest import REPO, model_spec
from tests.gpu_jobs import hold_a_gpu


@pytest.fixture
def fake_gpus(monkeypatch, tmp_path):
    """torch.cuda answering as a node of 4 GPUs would; GPU locks under tmp_path."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(gpu_lease, "lock_dir", lambda: tmp_path)
    return tmp_path


def spec(**fields) -> ModelSpec:
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "tiny_llama_gqa.yaml"))
    cfg.pop("_target_")
    return ModelSpec(**{**cfg, **fields})


def test_the_gpus_launcher_is_joblib_with_one_job_per_gpu():
    overrides = [
        "hydra/launcher=gpus", "hydra.launcher.n_jobs=8", "sweep=cache_longbench",
        "model=llama3_8b_instruct", "model.device=cuda",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 8
    assert cfg.model.device == "cuda" and cfg.model.device_map is None


def test_concurrent_jobs_each_hold_a_gpu_no_other_job_holds(tmp_path):
    """Six jobs on joblib's process pool of three, as the gpus launcher runs them."""
    jobs = joblib.Parallel(n_jobs=3, backend="loky")(
        joblib.delayed(hold_a_gpu)(tmp_path, 3, 0.4) for _ in range(6)
    )
    assert {index for index, _, _ in jobs} <= {0, 1, 2}
    for i, (index, start, end) in enumerate(jobs):
        for other, (other_index, other_start, other_end) in enumerate(jobs):
            overlap = start < other_end and other_start < end
            assert other == i or not overlap or index != other_index, jobs


def test_a_job_on_plain_cuda_runs_on_the_gpu_it_leased(fake_gpus):
    with gpu_lease.on_a_free_gpu(spec(device="cuda")) as first:
        with gpu_lease.on_a_free_gpu(spec(device="cuda")) as second:
            assert (first.device, second.device) == ("cuda:0", "cuda:1")
        with gpu_lease.on_a_free_gpu(spec(device="cuda")) as third:
            assert third.device == "cuda:1"  # released with its job, free again
    with gpu_lease.on_a_free_gpu(spec(device="cuda:3")) as named:
        assert named.device == "cuda:3"  # a GPU the user named is theirs
    assert not gpu_lease.wants_lease("cuda", "auto")  # spread over all: no lease


def test_more_jobs_than_gpus_are_refused_before_any_job_starts(tmp_path):
    done = subprocess.run(
        [
            sys.executable, "-m", "harness.run", "-m", "hydra/launcher=gpus",
            "hydra.launcher.n_jobs=3", "model=tiny_llama_gqa", "model.device=cuda",
            "method=full,streamingllm", "task=gsm8k", "task.limit=1", f"run.results_dir={tmp_path}",
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "kvbench: hydra.launcher.n_jobs=3 jobs at once with model.device=cuda, but this node "
        "has 0 GPU(s): pass hydra.launcher.n_jobs=1 (one job per GPU)"
    )
    assert not list(tmp_path.glob(".hydra/multirun-*/*/"))  # no job folder: none started


@pytest.fixture
def saved_model(tmp_path):
    model, _ = model_spec("tiny_llama_gqa").load()
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    return model, str(tmp_path / "m")


@pytest.mark.parametrize(("device_map", "placed"), [("auto", "auto"), (None, "cuda")])
def test_device_map_reaches_from_pretrained(
    fake_gpus, monkeypatch, saved_model, device_map, placed
):
    model, path = saved_model
    seen = {}

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        return model

    monkeypatch.setattr(harness.models.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)  # no real GPU
    local = ModelSpec(name="m", source="local", path=path, device="cuda", device_map=device_map)
    local.load()
    assert seen["device_map"] == placed


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"device_map": "balanced"}, r"^model.device_map=balanced is unknown: use auto"),
        ({"device": "cpu"}, r"^model.device_map=auto spreads a model over GPUs, but model.dev"),
        ({"source": "random"}, "a random model .* is built on the CPU"),
    ],
)
def test_a_device_map_that_cannot_run_is_refused(fake_gpus, saved_model, fields, message):
    base = {"source": "local", "path": saved_model[1], "device": "cuda", "device_map": "auto"}
    with pytest.raises(ModelConfigError, match=message):
        spec(**{**base, **fields})


def test_device_map_without_accelerate_or_without_a_gpu_is_refused(monkeypatch, saved_model):
    fields = {"source": "local", "path": saved_model[1], "device": "cuda", "device_map": "auto"}
    with pytest.raises(ModelConfigError, match="but no CUDA device is visible: use model.devi"):
        spec(**fields)  # this machine: no GPU
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name)
    )
    with pytest.raises(ModelConfigError, match="needs the accelerate package: `pip install acc"):
        spec(**fields)


def test_peak_memory_of_a_model_on_several_gpus_sums_its_devices(monkeypatch):
    """``model.device_map=auto``: the memory before and the peak are the devices' sums."""
    allocated = {0: 100, 1: 40}
    peaks = {0: 1000, 1: 300}
    index = lambda d: torch.device(d).index  # noqa: E731
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: allocated[index(d)])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: peaks[index(d)])
    gpus = [torch.device("cuda", 0), torch.device("cuda", 1)]
    spread = SimpleNamespace(  # a model whose parameters are on the two GPUs
        parameters=lambda: iter([SimpleNamespace(device=d) for d in (gpus[0], gpus[1], gpus[1])])
    )
    assert measure.PeakMemory.of_model(spread).devices == gpus
    probe = measure.PeakMemory(gpus[0], also=[gpus[1], gpus[0]])
    assert probe.devices == gpus
    probe.reset()
    assert probe.read() == {
        "peak_memory_bytes": 1300,
        "memory_before_bytes": 140,
        "peak_memory_rise_bytes": 1160,
    }
    assert measure.PeakMemory(torch.device("cpu"), also=gpus).devices == [torch.device("cpu")]
