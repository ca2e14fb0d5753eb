"""Shared fixtures: tiny random-weight models built from the repo's own model configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # before anything loads Triton (torch._dynamo does)
    # Triton kernels (SpindleKV's GPU decode attention) run on a CPU only under Triton's
    # interpreter, which must be on when Triton is first imported: tests/test_codebook_triton.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from harness.models import ModelSpec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CUDA_REHEARSAL = "KVBENCH_CUDA_TESTS_ON"  # =cpu: run the cuda-marked tests' CPU rehearsal


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip where no GPU is visible (unless rehearsed on the CPU)."""
    if torch.cuda.is_available() or os.environ.get(CUDA_REHEARSAL) == "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible); bench/gpu/run.sh runs it")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def model_spec(name: str, **overrides) -> ModelSpec:
    cfg = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
    cfg = OmegaConf.merge(cfg, overrides)
    return instantiate(cfg, _convert_="all")


@pytest.fixture(scope="session")
def tiny_gqa():
    torch.manual_seed(0)
    return model_spec("tiny_llama_gqa").load()


@pytest.fixture(scope="session")
def tiny_mha():
    return model_spec("tiny_llama_mha").load()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (dequantised once into $KVBENCH_CACHE)."""
    return model_spec("smollm2_135m", threads=None).load()


@pytest.fixture(scope="session")
def tiny_gemma3():
    """A tiny random Gemma-3 built from a config (no download): 4 layers, the first three
    sliding-window (window 9: each holds 8 tokens), the last full attention, 1 KV head of dim 16, sdpa."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=9,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    return Gemma3ForCausalLM(config).eval()
