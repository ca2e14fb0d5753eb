"""KV-Latent: exact at r=1, frequency-aware RoPE, stored bytes, training, checkpoint cache."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import DynamicCache

from harness import records
from harness.generation import greedy_generate
from harness.job import execute, prepare
from harness.measure import stored_kv_bytes
from harness.models import ModelSpec
from harness.run import CONF_DIR
from methods.base import MethodConfigError
from methods.model import checkpoint as ckpt
from methods.model import data, training
from methods.model.kvlatent import KVLatent
from methods.model.latent import LatentAttention
from methods.model.rope import (
    frequency_aware_inv_freq,
    key_channels,
    rope_cos_sin,
    standard_inv_freq,
)
from methods.model.training import NOT_IN_KEY, TrainConfig
from methods.storage import read_jsonl

FAST = {"stage1_steps": 6, "batch_size": 2, "seq_len": 32, "progress": False}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and a busy machine's spare core would only
    slow torch's thread team down)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ids_for(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def cut(model, **fields):
    return KVLatent(train=False, **fields).transform(copy.deepcopy(model), None)


def test_a_cut_model_is_refused_and_merged_heads_are_cut_as_held(tiny_gqa):
    """Cutting a cut model again read the cut weights as whole heads (kvlatent_k: a shape
    error; kvlatent_kv: silently a quarter of the cache): refused. After kvheads, the heads
    are counted from the layers, not the config's stale count."""
    from methods.model.kvheads import KVHeads

    model, tokenizer = tiny_gqa
    once = cut(model, variant="k")
    with pytest.raises(MethodConfigError, match="heads are cut already .* d_qk=8, d_vo=16"):
        KVLatent(variant="kv", train=False).transform(once, None)
    calibration = {"calibration_tokens": 512, "calibration_seq_len": 128}
    merged = KVHeads(num_kv_heads=1, **calibration).transform(copy.deepcopy(model), tokenizer)
    both = KVLatent(variant="kv", train=False).transform(merged, None)
    out = greedy_generate(both, ids_for(20), max_new_tokens=2)
    assert out.kv_bytes_prefill == 4 * 1 * (8 + 8) * 20 * 4  # layers, 1 KV head, fp32


@pytest.mark.parametrize("rope", ["standard", "frequency_aware", "frequency_matched"])
def test_r1_equals_the_original_model(tiny_gqa, rope):
    model, _ = tiny_gqa
    ids = ids_for(40, batch=2)
    reduced = cut(model, variant="kv", dim=16, rope=rope)
    assert all(isinstance(layer.self_attn, LatentAttention) for layer in reduced.model.layers)
    torch.testing.assert_close(reduced(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_gemma3_r1_equal_and_reduced_runs():
    spec = ModelSpec(
        name="tiny_gemma3",
        source="random",
        architecture={
            "model_type": "gemma3_text",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "vocab_size": 260,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    )
    model, _ = spec.load()
    ids = ids_for(24)
    same = cut(model, variant="kv", dim=16, rope="standard")
    torch.testing.assert_close(same(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    small = cut(model, variant="kv", dim=8, rope="frequency_aware")
    attn = small.model.layers[0].self_attn
    assert attn.k_norm.weight.shape == (8,) and attn.sliding_window == 8
    cache = DynamicCache(config=small.config)
    small(ids, past_key_values=cache, use_cache=True)
    sliding, full = cache.layers  # the sliding layer keeps its window (window - 1 tokens)
    assert sliding.keys.shape == (1, 2, 7, 8) and sliding.values.shape == (1, 2, 7, 8)
    assert full.keys.shape == (1, 2, 24, 8) and full.values.shape == (1, 2, 24, 8)


def test_frequency_aware_inv_freq_is_the_hand_formula():
    theta = 10000.0
    a16 = [4, 6, 8, 10, 12, 13, 14, 15]
    expected16 = torch.tensor([theta ** (-a / 16) for a in a16])
    torch.testing.assert_close(frequency_aware_inv_freq(16, theta), expected16)
    a64 = [16 + 2 * i for i in range(16)] + [48 + i for i in range(16)]
    expected64 = torch.tensor([theta ** (-a / 64) for a in a64])
    torch.testing.assert_close(frequency_aware_inv_freq(64, theta), expected64)
    # standard RoPE at d = D / r is the full model's frequencies of the kept channels
    torch.testing.assert_close(standard_inv_freq(16, theta), standard_inv_freq(64, theta)[::4])


def test_the_module_uses_the_reduced_frequencies(tiny_gqa):
    model, _ = tiny_gqa
    theta = model.config.rope_parameters["rope_theta"]
    aware = cut(model, variant="k", dim=8, rope="frequency_aware").model.layers[1].self_attn
    torch.testing.assert_close(aware.inv_freq, frequency_aware_inv_freq(8, theta))
    plain = cut(model, variant="k", dim=8, rope="standard").model.layers[1].self_attn
    torch.testing.assert_close(plain.inv_freq, standard_inv_freq(8, theta))
    assert aware.scaling == pytest.approx(1 / math.sqrt(8))


def test_key_channels_strided_and_frequency_matched():
    assert key_channels("standard", 64, 32).tolist() == list(range(0, 64, 2))
    assert key_channels("frequency_aware", 64, 16).tolist() == list(range(0, 64, 4))
    first = [8, 10, 12, 14, 16, 18, 20, 22, 24, 25, 26, 27, 28, 29, 30, 31]  # a * r / 2, r = 2
    assert key_channels("frequency_matched", 64, 32).tolist() == first + [j + 32 for j in first]
    first = [8, 12, 16, 20, 24, 26, 28, 30]  # r = 4, a = [4, 6, 8, 10, 12, 13, 14, 15]
    assert key_channels("frequency_matched", 64, 16).tolist() == first + [j + 32 for j in first]
    assert key_channels("frequency_matched", 16, 16).tolist() == list(range(16))


def rotated_keys(attn, inv_freq, head_dim, hidden, positions, channels=None):
    """Keys of ``attn`` for ``hidden`` (1, S, H), turned by RoPE at ``inv_freq``; (S, H_kv, d)."""
    keys = attn.k_proj(hidden).view(1, hidden.shape[1], -1, head_dim)
    cos, sin = rope_cos_sin(inv_freq, positions, 1.0, keys.dtype)
    half = head_dim // 2
    rotated = torch.cat([-keys[..., half:], keys[..., :half]], -1)
    out = (keys * cos[:, :, None] + rotated * sin[:, :, None])[0]
    return out if channels is None else out[..., channels]


@pytest.mark.parametrize(("rope", "same"), [
    ("standard", True), ("frequency_matched", True), ("frequency_aware", False),
])  # fmt: skip
def test_which_cut_keeps_the_pretrained_rotation_of_its_channels(tiny_gqa, rope, same):
    """The reduced keys after RoPE are the original keys after RoPE on the kept channels for
    the standard and the frequency-matched cut; frequency-aware RoPE re-times the strided
    channels, which is what its training has to make up for."""
    model, _ = tiny_gqa
    original = model.model.layers[1].self_attn
    reduced = cut(model, variant="k", dim=8, rope=rope).model.layers[1].self_attn
    hidden, positions = torch.randn(1, 12, 64), torch.arange(100, 112)[None]
    full_freq = model.model.rotary_emb.inv_freq
    want = rotated_keys(original, full_freq, 16, hidden, positions, key_channels(rope, 16, 8))
    got = rotated_keys(reduced, reduced.inv_freq, 8, hidden, positions)
    assert torch.allclose(got, want, atol=1e-5) == same
    if rope == "frequency_matched":
        theta = model.config.rope_parameters["rope_theta"]
        torch.testing.assert_close(reduced.inv_freq, frequency_aware_inv_freq(8, theta))


@pytest.mark.parametrize(("variant", "dim", "d_qk", "d_vo"), [
    ("k", 8, 8, 16), ("v", 8, 16, 8), ("kv", 8, 8, 8), ("kv", 4, 4, 4), ("v", 2, 16, 2),
])  # fmt: skip
def test_stored_kv_bytes_follow_the_dims(tiny_gqa, variant, dim, d_qk, d_vo):
    model, _ = tiny_gqa
    reduced = cut(model, variant=variant, dim=dim, rope="standard")
    ids = ids_for(30)
    out = greedy_generate(reduced, ids, max_new_tokens=4)
    layers, kv_heads, fp32 = 4, 2, 4
    assert out.kv_bytes_prefill == layers * kv_heads * (d_qk + d_vo) * 30 * fp32
    assert out.kv_bytes_final == layers * kv_heads * (d_qk + d_vo) * 33 * fp32


def test_cached_decoding_matches_the_full_forward(tiny_gqa):
    model, _ = tiny_gqa
    reduced = cut(model, variant="kv", dim=8, rope="frequency_aware")
    ids = ids_for(20)
    cache = DynamicCache(config=reduced.config)
    reduced(ids[:, :15], past_key_values=cache, use_cache=True)
    step = reduced(ids[:, 15:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(step, reduced(ids).logits[:, 15:], rtol=1e-4, atol=1e-4)
    assert stored_kv_bytes(cache) == 4 * 2 * 16 * 20 * 4


def test_training_lowers_the_distillation_loss(tiny_gqa, tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))
    model, tokenizer = tiny_gqa
    probe = data.token_chunks(data.heldout_texts(20), tokenizer, 48, limit=4)  # never trained on
    untrained = cut(model, variant="kv", dim=4, rope="frequency_aware")
    before = training.layer_distillation_loss(untrained, model, probe)
    method = KVLatent(variant="kv", dim=4, training={**FAST, "stage1_steps": 20})
    trained = method.transform(copy.deepcopy(model), tokenizer)
    after = training.layer_distillation_loss(trained, model, probe)
    assert sum(after) < 0.85 * sum(before) and all(
        a < b for a, b in zip(after, before, strict=True)
    )
    (folder,) = (tmp_path / "kvlatent").iterdir()
    assert (folder / ckpt.MARKER).is_file() and (folder / ckpt.LOG).read_text().count("\n") == 20


def tiny_gemma3_like():
    """A tiny random Gemma-3 with the proportions that made the real one diverge: small
    weights (std 0.02; Gemma-3-270M's attention weights have RMS 0.036, SmolLM2's 0.19)
    over a wide attention (4 heads of 64: o_proj's fan-in is 256 for a hidden size of 64)."""
    spec = ModelSpec(name="tiny_gemma3_wide", source="random", architecture={
        "model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 64, "query_pre_attn_scalar": 64, "vocab_size": 260, "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"], "bos_token_id": 256,
        "eos_token_id": 257, "pad_token_id": 258,
    })  # fmt: skip
    return spec.load()


def stage1_curve(model, tokenizer, **fields) -> tuple[list[float], list[float], list[float]]:
    """(per-step training loss, held-out per-layer loss before, after) for 12 Stage I steps
    of the k variant at d_qk = 32, with ``fields`` over the training defaults."""
    probe = data.token_chunks(data.heldout_texts(20), tokenizer, 48, limit=4)
    student = cut(model, variant="k", dim=32, rope="frequency_aware")
    before = training.layer_distillation_loss(student, model, probe)
    cfg = TrainConfig(**{**FAST, "stage1_steps": 12, **fields})
    _, rows = training.recover(student, model, tokenizer, cfg)
    return (
        [r["loss"] for r in rows],
        before,
        training.layer_distillation_loss(student, model, probe),
    )


def test_stage1_loss_falls_with_the_defaults_where_the_old_ones_diverged():
    model, tokenizer = tiny_gemma3_like()
    losses, before, after = stage1_curve(model, tokenizer)
    assert max(losses[1:]) < losses[0] and sum(after) < 0.8 * sum(before)
    assert all(a < b for a, b in zip(after, before, strict=True))  # every layer improves
    # the old defaults (fixed lr 3e-3, no warm-up, raw MSE) diverge here as on Gemma-3-270M
    old, _, _ = stage1_curve(model, tokenizer, lr=3e-3, warmup_steps=0, layer_loss="mse")
    assert old[1] > 1.5 * old[0] and min(old) == old[0]


def test_the_default_rate_follows_the_weights_and_warms_up(tiny_gqa):
    model, tokenizer = tiny_gqa
    weights = [getattr(layer.self_attn, name).weight for layer in model.model.layers
               for name in ("q_proj", "k_proj", "v_proj", "o_proj")]  # fmt: skip
    rms = math.sqrt(sum(float(w.pow(2).sum()) for w in weights) / sum(w.numel() for w in weights))
    cfg = TrainConfig(**{**FAST, "stage1_steps": 6, "warmup_steps": 2})
    assert cfg.stage1_lr(model) == pytest.approx(0.015 * rms)
    assert TrainConfig(lr=1e-3).stage1_lr(model) == 1e-3
    student = cut(model, variant="k", dim=8, rope="standard")
    _, rows = training.recover(student, model, tokenizer, cfg)
    # warm-up 1/3, 2/3, then cosine over the remaining 4 steps: 1, cos^2(pi/8), 1/2, cos^2(3pi/8)
    factors = [1 / 3, 2 / 3, 1.0, math.cos(math.pi / 8) ** 2, 0.5, math.cos(3 * math.pi / 8) ** 2]
    assert [r["lr"] for r in rows] == pytest.approx([0.015 * rms * f for f in factors])


def test_the_relative_layer_loss_is_one_for_a_layer_that_adds_nothing():
    hidden, target = torch.randn(2, 5, 8), torch.randn(2, 5, 8) * 100
    assert float(training.layer_loss(hidden, hidden, target, "relative")) == pytest.approx(1.0)
    out = target + 0.1 * (target - hidden)
    assert float(training.layer_loss(out, hidden, target, "relative")) == pytest.approx(0.01)
    assert float(training.layer_loss(out, hidden, target, "mse")) == pytest.approx(
        float((0.1 * (target - hidden)).pow(2).mean()), rel=1e-5
    )


def test_every_training_field_is_in_the_checkpoint_key():
    """Changing any training default (or setting) trains new weights: nothing stale is loaded."""
    base = TrainConfig()
    key = ckpt.checkpoint_key({"training": base.key()})
    changed = {"stage2_loss": "ce", "data": "teacher", "layer_loss": "mse", "lr": 1e-3,
               "data_field": "body", "data_split": "validation", "progress": False}  # fmt: skip
    for f in dataclasses.fields(TrainConfig):
        value = changed.get(f.name, getattr(base, f.name))
        if value == getattr(base, f.name):  # numbers: another value of the same type
            value = value * 2 + 1 if isinstance(value, (int, float)) else value
        other = dataclasses.replace(base, **{f.name: value})
        same = ckpt.checkpoint_key({"training": other.key()}) == key
        assert same == (f.name in NOT_IN_KEY), f.name


def test_checkpoint_is_reused_and_a_corrupt_one_is_retrained(tiny_gqa, tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))
    model, tokenizer = tiny_gqa
    method = KVLatent(variant="k", dim=8, rope="standard", training=FAST)
    ids = ids_for(24)
    first = method.transform(copy.deepcopy(model), tokenizer)(ids).logits
    calls = []
    real_recover = training.recover

    def counting(*args, **kwargs):
        calls.append(1)
        return real_recover(*args, **kwargs)

    monkeypatch.setattr(training, "recover", counting)
    torch.testing.assert_close(method.transform(copy.deepcopy(model), tokenizer)(ids).logits, first)
    assert calls == []
    (folder,) = (tmp_path / "kvlatent").iterdir()
    weights = folder / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-7] + b"garbage")  # corrupt
    torch.testing.assert_close(method.transform(copy.deepcopy(model), tokenizer)(ids).logits, first)
    assert calls == [1]
    (folder / ckpt.MARKER).unlink()  # a partial write: no completeness marker
    method.transform(copy.deepcopy(model), tokenizer)
    assert calls == [1, 1] and (folder / ckpt.MARKER).is_file()
    other = KVLatent(variant="k", dim=8, rope="standard", training={**FAST, "seed": 1})
    other.transform(copy.deepcopy(model), tokenizer)
    assert len(list((tmp_path / "kvlatent").iterdir())) == 2  # another key, another folder


@pytest.mark.parametrize(("fields", "message"), [
    ({"dim": 15}, "method.dim=15 is odd"),
    ({"dim": 6}, "frequency_aware RoPE needs d_qk divisible by 4"),
    ({"dim": 6, "rope": "frequency_matched"}, "frequency_matched RoPE needs d_qk divisible by 4"),
    ({"training": {"lr": 0}}, "method.training.lr=0 must be > 0"),
    ({"training": {"layer_loss": "l1"}}, "method.training.layer_loss"),
    ({"variant": "q"}, "method.variant"),
    ({"rope": "yarn"}, "method.rope"),
    ({"training": {"stage1_steps": 0}}, "training budget is zero"),
    ({"training": {"stage1_steps": -1}}, "method.training.stage1_steps=-1"),
    ({"training": {"steps": 5}}, "method.training.steps is not a training field"),
    ({"training": {"data": "somewhere"}}, "method.training.data"),
])  # fmt: skip
def test_bad_fields_fail_naming_the_field(fields, message):
    with pytest.raises(MethodConfigError, match=message.replace("(", r"\(")):
        KVLatent(**fields)


def test_frequency_matched_needs_an_even_stride():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=192, num_attention_heads=4, num_key_value_heads=2)  # 48
    KVLatent(variant="k", dim=24, rope="frequency_matched", train=False).validate_for(config)
    with pytest.raises(MethodConfigError, match="head_dim/dim=3 must be even"):
        KVLatent(variant="k", dim=16, rope="frequency_matched", train=False).validate_for(config)
    KVLatent(variant="v", dim=16, rope="frequency_matched", train=False).validate_for(config)


def test_zero_budget_is_fine_without_training():
    KVLatent(train=False, training={"stage1_steps": 0})


@pytest.mark.parametrize(("overrides", "message"), [
    (["method.dim=12"], "method.dim=12 does not divide the model's head_dim=16"),
    (["method.dim=5", "method.variant=v"], "method.dim=5 does not divide"),
    (["method.dim=5"], "method.dim=5 is odd"),
    (["method.training.stage1_steps=0"], "training budget is zero"),
])  # fmt: skip
def test_bad_dims_fail_through_the_runner_before_loading(tmp_path, overrides, message):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[f"run.results_dir={tmp_path}", "model=tiny_llama_gqa", "method=kvlatent_kv",
                       *overrides],
        )  # fmt: skip
    with pytest.raises(Exception) as excinfo:  # hydra wraps errors raised while building
        execute(cfg)
    assert message in str(excinfo.value) + str(excinfo.value.__cause__ or "")
    assert list(tmp_path.iterdir()) == []


def test_ablation_sweep_composes_every_combination(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["sweep=kvlatent_ablation"],
                      return_hydra_config=True)  # fmt: skip
        params = cfg.hydra.sweeper.params
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
        for method in params.method.split(","):
            for dim in params["method.dim"].split(","):
                for rope in params["method.rope"].split(","):
                    overrides = [f"method={method}", f"method.dim={dim}", f"method.rope={rope}"]
                    built = prepare(compose(config_name="config", overrides=overrides))[1]
                    assert (built.dim, built.rope) == (int(dim), rope)


def test_the_runner_records_the_reduced_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"run.results_dir={tmp_path / 'results'}", "run.report=false", "model=tiny_llama_gqa",
            "method=kvlatent_k", "method.dim=4", "task.limit=1", "run.max_gen_toks=4",
            "method.training.stage1_steps=2", "method.training.seq_len=32",
            "method.training.progress=false",
        ])  # fmt: skip
    record = records.read_record(execute(cfg))
    assert record["method"]["kinds"] == ["model"]
    assert record["method"]["params"]["variant"] == "k"
    assert record["measurements"]["kv_ratio"] == pytest.approx((4 + 16) / 32)


@pytest.mark.integration
def test_smollm2_r1_is_exact_and_d32_halves_the_cache(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("Natalia sold clips to 48 of her friends in April.", return_tensors="pt")
    ids = ids.input_ids
    same = cut(model, variant="kv", dim=64, rope="standard")
    torch.testing.assert_close(same(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    half = cut(model, variant="kv", dim=32, rope="frequency_aware")
    out = greedy_generate(half, ids, max_new_tokens=2)
    # 30 layers, 3 KV heads, d_qk = d_vo = 32, float32
    assert out.kv_bytes_prefill == 30 * 3 * (32 + 32) * ids.shape[1] * 4


def test_training_text_never_overlaps_the_held_out_or_evaluated_text(tmp_path):
    train, heldout = data.gsm8k_train_texts(), data.heldout_texts()
    assert len(heldout) == data.HELDOUT_PROBLEMS and not set(train) & set(heldout)
    tests = {r["question"] for r in read_jsonl("gsm8k/test.jsonl")}
    assert not any(t.removeprefix("Question: ").split("\nAnswer: ")[0] in tests for t in train)
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n')
    assert data.load_texts(f"file:{tmp_path / 'a.txt'}") == ["first doc", "second doc"]
    assert data.load_texts(f"file:{tmp_path / 'b.jsonl'}", field="body") == ["one", "two"]


def test_the_configs_training_block_is_the_dataclass_default():
    """The yaml documents every training field with the dataclass's default value, so a run
    through the configs and one from Python share checkpoints."""
    defaults = dataclasses.asdict(TrainConfig())
    for name in ("kvlatent_k", "kvlatent_v", "kvlatent_kv"):
        block = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml"))
        assert block["training"] == defaults


@pytest.mark.parametrize("training", [
    {"stage1_steps": 0, "stage2_steps": 3, "stage2_loss": "kd"},
    {"stage1_steps": 0, "stage2_steps": 3, "stage2_loss": "ce"},
    {"stage1_steps": 2, "data": "teacher", "teacher_samples": 2},
])  # fmt: skip
def test_stage2_losses_and_teacher_text_train(tiny_gqa, tmp_path, monkeypatch, training):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))
    model, tokenizer = tiny_gqa
    method = KVLatent(variant="v", dim=8, training={**FAST, **training})
    method.transform(copy.deepcopy(model), tokenizer)
    (folder,) = (tmp_path / "kvlatent").iterdir()
    rows = [json.loads(line) for line in (folder / ckpt.LOG).read_text().splitlines()]
    stage = "stage2" if training["stage1_steps"] == 0 else "stage1"
    assert [r["stage"] for r in rows] == [stage] * method.train_config.steps
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_describe_says_what_the_cut_was(tiny_gqa):
    model, _ = tiny_gqa
    method = KVLatent(train=False, variant="k", dim=8, rope="standard")
    assert method.describe() == {}  # nothing applied yet
    method.transform(copy.deepcopy(model), None)
    assert method.describe() == {
        "head_dim": 16,
        "d_qk": 8,
        "d_vo": 16,
        "rope": "standard",
        "trained": False,
    }
