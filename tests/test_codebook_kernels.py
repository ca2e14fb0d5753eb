"""SpindleKV's fused decode kernels against the PyTorch operations they replace."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cache_methods import ARCHS, load, prompt, run

from methods.cache.attention import apply_rope
from methods.cache.spindlekv import SpindleKV, codebook_attention, codebook_kernels
from methods.cache.spindlekv.codebook import Codebook
from methods.cache.spindlekv.codebook_layer import CodebookLayer, RopeTable

try:
    import fcntl
except ImportError:
    fcntl = None

REPO = Path(__file__).resolve().parents[1]


def rotate_half_rope(dim: int):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))

    def rope(positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float().unsqueeze(-1) * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(like.dtype), angles.sin().to(like.dtype)

    return rope


def codebook_layer(
    seed: int, heads: bool, magnitudes: bool, kv_heads: int = 2, groups: int = 3, dim: int = 16
) -> CodebookLayer:
    """A layer of random codebooks: 40 slots per KV head sharing 25 entries per head, at
    increasing positions below 300, with (``heads``) some slots hidden from some query heads
    and KV head 0's last query head seeing no slot; one newest token waiting."""
    g = torch.Generator().manual_seed(seed)
    slots, entries = 40, 25

    def book() -> Codebook:
        rows = torch.randn(kv_heads * entries, dim, generator=g)
        rows = rows / rows.norm(dim=-1, keepdim=True) if magnitudes else rows
        owner = torch.arange(kv_heads, dtype=torch.int32).repeat_interleave(entries)
        refs = torch.randint(0, entries, (1, kv_heads, slots), generator=g, dtype=torch.int32)
        refs = refs + (torch.arange(kv_heads, dtype=torch.int32) * entries).view(1, -1, 1)
        norms = torch.rand(1, kv_heads, slots, generator=g) + 0.5 if magnitudes else None
        return Codebook(rows, owner, refs, norms, 0.9, "head")

    positions = torch.sort(torch.randperm(300, generator=g)[: kv_heads * slots]).values
    positions = positions.view(1, kv_heads, slots).int()
    seen = None
    if heads:
        seen = torch.rand(1, kv_heads, groups, slots, generator=g) > 0.3
        seen[0, 0, -1] = False
    rope = rotate_half_rope(dim)
    layer = CodebookLayer(book(), book(), positions, seen, rope, RopeTable(rope), "fused")
    layer.keys = torch.randn(1, kv_heads, 1, dim, generator=g)
    layer.values = torch.randn(1, kv_heads, 1, dim, generator=g)
    return layer


@pytest.mark.parametrize("heads", [True, False])
@pytest.mark.parametrize("magnitudes", [True, False])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_fused_attention_equals_the_pytorch_operations_and_the_decoded_cache(
    heads, magnitudes, softcap
):
    layer = codebook_layer(0, heads, magnitudes)
    query = torch.randn(1, 6, 1, 16, generator=torch.Generator().manual_seed(1)) * 3
    fused = codebook_attention.attend_fused(layer, query, 0.25, softcap)
    eager = codebook_attention.attend_codebook(layer, query, 0.25, softcap)
    plain = codebook_attention.attend_materialized(layer, query, None, 0.25, softcap)
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-4)
    if heads:  # the head that sees no slot reads only the newest token's value
        torch.testing.assert_close(fused[0, 0, 2], layer.values[0, 0, 0])


@pytest.mark.parametrize("normalize", [True, False])
def test_fused_match_finds_each_groups_own_nearest_entry_first_on_ties(normalize):
    g = torch.Generator().manual_seed(2)
    entries = torch.randn(30, 8, generator=g)
    entries[17] = entries[4]  # the same entry twice in group 0: the first wins
    owner = torch.tensor([0] * 20 + [1] * 9 + [2], dtype=torch.int32)
    vectors = torch.randn(5, 8, generator=g)
    vectors[0] = entries[4]
    vectors = vectors / vectors.norm(dim=-1, keepdim=True)
    groups = torch.tensor([0, 1, 0, 2, 1], dtype=torch.int32)
    if not normalize:
        entries = entries / entries.norm(dim=-1, keepdim=True)
    best, ref = codebook_kernels.nearest(vectors, groups, entries, owner, normalize)
    best_eager, ref_eager = codebook_kernels.nearest_eager(
        vectors, groups, entries, owner, normalize
    )
    assert ref.tolist() == ref_eager.tolist()
    assert ref[0] == 4 and ref[3] == 29
    assert all(owner[r] == grp for r, grp in zip(ref.tolist(), groups.tolist(), strict=True))
    torch.testing.assert_close(best, best_eager, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gqa", "gemma"])
def test_spindlekv_decodes_through_the_fused_kernels_by_default(kind, monkeypatch):
    """The default run goes through both kernels, and gives the PyTorch operations' logits and
    codebooks."""
    assert kind in ARCHS
    model, ids = load(kind), prompt()
    calls = {"attend": 0, "append": 0}
    for name in calls:
        real = getattr(codebook_kernels, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(codebook_kernels, name, spy)
    fields = dict(window=8, ratio=0.3, key_threshold=0.9, value_threshold=0.8)
    fused, fused_cache = run(model, ids, [SpindleKV(**fields)], steps=4)
    assert calls["attend"] > 0 and calls["append"] > 0
    eager, eager_cache = run(
        model, ids, [SpindleKV(decode_attention="codebook", **fields)], steps=4
    )
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-4)
    for a, b in zip(fused_cache.layers, eager_cache.layers, strict=True):
        if isinstance(a, CodebookLayer):
            assert torch.equal(a.key_book.refs, b.key_book.refs)
            assert torch.equal(a.value_book.refs, b.value_book.refs)


@pytest.mark.parametrize("magnitudes", [True, False])
def test_fused_step_joins_and_opens_the_entries_the_pytorch_operations_do(magnitudes):
    """A decoding step's key, given post-RoPE, goes back to pre-RoPE in the kernel, then
    joins its group's nearest entry or opens one, as :meth:`Codebook.append` does."""
    layer = codebook_layer(3, heads=False, magnitudes=magnitudes)
    book, twin = layer.key_book, copy.deepcopy(layer.key_book)
    pre = torch.randn(1, 2, 1, 16, generator=torch.Generator().manual_seed(4))
    pre[0, 1, 0] = book.entries[30] * 2.0  # group 1 (entries 25..49): joins entry 30
    position = torch.tensor([[310]])
    cos, sin = layer.rope(position, pre)
    post = apply_rope(pre, cos.unsqueeze(1), sin.unsqueeze(1))
    book.append_step(post, layer.table.upto(310, pre), position)
    twin.append(pre)
    assert book.refs[0, 1, -1] == 30 and book.refs[0, 0, -1] == 50  # group 0: a new entry
    assert torch.equal(book.refs, twin.refs) and torch.equal(book.owner, twin.owner)
    torch.testing.assert_close(book.entries, twin.entries, atol=1e-5, rtol=1e-5)
    if magnitudes:
        torch.testing.assert_close(book.magnitudes, twin.magnitudes, atol=1e-5, rtol=1e-5)


def test_a_kernel_that_cannot_be_built_names_the_setting_that_avoids_it(monkeypatch):
    from torch.utils import cpp_extension

    def no_ninja(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", no_ninja)
    with pytest.raises(codebook_kernels.KernelBuildError, match="decode_attention=codebook"):
        codebook_kernels.extension.__wrapped__()


LOAD = (
    "from methods.cache.spindlekv import codebook_kernels as k\n"
    "print('imported', flush=True)\n"
    "k.extension()\n"
    "print('loaded', flush=True)\n"
)


def load_in_a_child() -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", LOAD], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_load():
    """torch's ``lock`` file, left when a build is killed (a CI step's timeout), made every
    later load wait forever; kvbench's own lock, released by the kernel when its holder dies,
    tells a dead build's ``lock`` from a live one's and removes it."""
    build = codebook_kernels.build_directory()
    build.mkdir(parents=True, exist_ok=True)
    (build / "lock").touch()  # what a killed build leaves
    child = load_in_a_child()
    try:
        out, _ = child.communicate(timeout=300)  # a first build on this machine: 30-60 s
    finally:
        child.kill()
        (build / "lock").unlink(missing_ok=True)
    assert child.returncode == 0 and out.split() == ["imported", "loaded"]


@pytest.mark.skipif(fcntl is None, reason="kvbench's build lock needs fcntl (POSIX)")
def test_a_live_build_is_waited_for_not_broken():
    """While another process builds (it holds kvbench's lock and torch's ``lock``), a load
    waits for it instead of removing its ``lock``, and goes on once it is done."""
    codebook_kernels.extension()  # built, so the child only waits and then loads
    build = codebook_kernels.build_directory()
    with open(build / "kvbench.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (build / "lock").touch()
        child = load_in_a_child()
        try:
            assert child.stdout.readline().strip() == "imported"
            time.sleep(2)
            assert child.poll() is None and (build / "lock").exists()
        finally:
            (build / "lock").unlink(missing_ok=True)  # the other build is done
            fcntl.flock(guard, fcntl.LOCK_UN)
    try:
        out, _ = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 0 and out.split() == ["loaded"]
