"""SpindleKV's decoding step as two fused CPU kernels (``decode_attention: fused``).

Run as PyTorch operations, a step over the codebook cache is a dozen small operations per
layer (gather the slots' entries and RoPE rows, rotate, score, mask, softmax, gather the
values; match the new key and value against their codebooks), each writing a (U, D)
intermediate and waking the CPU's thread pool: the profile (BENCHMARKS.md) put the step at
1.7x the full cache's at 8k tokens, the time in those passes rather than in arithmetic.
``csrc/codebook.cpp`` does the same arithmetic in one pass per KV head, reading each slot's
entry and RoPE row once and writing nothing per slot (:func:`attend`), and joins each
new key and value to its codebook in place, one dot product per entry with its own group's
new vector (:func:`append`; :func:`nearest` for several new vectors). It is built with
``torch.utils.cpp_extension`` on first use (a C++ compiler and ninja; cached under
``~/.cache/torch_extensions``, one build per CPU type, torch and environment) and checked
against the PyTorch operations by the tests.

torch guards a build with a ``lock`` file that a killed build leaves behind, and every later
load then waits on it forever (a CI step's ``timeout`` killing the first build hung every
test after it). kvbench builds under an ``flock`` of its own, which the kernel releases when
its holder dies: a ``lock`` found while holding it was left by a dead build and is removed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

try:
    import fcntl
except ImportError:  # Windows: torch's own lock only
    fcntl = None

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "codebook.cpp"
# x86-64 Linux (gcc): this CPU's vector units and OpenMP threads; elsewhere portable flags
X86_LINUX = sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")
FLAGS = ["-O3", "-ffast-math"] + (["-march=native", "-fopenmp"] if X86_LINUX else [])


class KernelBuildError(RuntimeError):
    """The fused kernels could not be built here (no C++ compiler or ninja)."""


def _build_tag() -> str:
    """A short tag of this CPU's model and instruction sets, torch's version and where torch
    is installed: a cache shared by machines of several CPU types, kept across a torch
    upgrade or shared by two environments holds a build per combination (torch's own key
    covers the sources and flags, and two environments' include paths would rebuild in turn)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.machine(), platform.processor()]
    lines += [torch.__version__, str(Path(torch.__file__).resolve().parent)]
    return hashlib.sha1("".join(lines).encode()).hexdigest()[:10]


def supported(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels take these tensors: float32 on the CPU (elsewhere, and for
    other dtypes, SpindleKV's PyTorch operations run instead)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def build_directory() -> Path:
    """Where the kernels are built and cached: one folder per CPU type, torch and environment,
    under ``$TORCH_EXTENSIONS_DIR`` or torch's default root."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / f"kvbench_codebook_{_build_tag()}"


@functools.cache
def extension() -> ModuleType:
    """The compiled kernels (built once per machine and source, then loaded from the cache)."""
    from torch.utils import cpp_extension

    bin_dir = str(Path(sys.executable).parent)  # the environment's ninja, if pip installed it
    if shutil.which("ninja") is None and bin_dir not in os.environ.get("PATH", ""):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    build = build_directory()
    try:
        build.mkdir(parents=True, exist_ok=True)
        with _building(build):
            log.info("loading SpindleKV's fused kernels (built on first use: about 30 s)")
            return cpp_extension.load(
                name=build.name,
                sources=[str(SOURCE)],
                extra_cflags=FLAGS,
                extra_ldflags=["-fopenmp"] if X86_LINUX else [],
                build_directory=str(build),
                verbose=False,
            )
    except (RuntimeError, OSError, ImportError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise KernelBuildError(
            f"SpindleKV's fused decode kernels could not be built ({reason}); install a C++ "
            "compiler and ninja, or set method.decode_attention=codebook"
        ) from error


@contextlib.contextmanager
def _building(build: Path) -> Iterator[None]:
    """Hold kvbench's build lock on ``build``; a torch ``lock`` found under it is stale."""
    if fcntl is None:
        yield
        return
    with open(build / "kvbench.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # waits for a live build; a dead one's is released
        try:
            stale = build / "lock"
            if stale.exists():
                log.warning("removing %s, left by a build that was killed", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def attend(
    query: torch.Tensor,
    key_entries: torch.Tensor,
    key_refs: torch.Tensor,
    key_magnitudes: torch.Tensor | None,
    table: torch.Tensor,
    positions: torch.Tensor,
    heads: torch.Tensor | None,
    value_entries: torch.Tensor,
    value_refs: torch.Tensor,
    value_magnitudes: torch.Tensor | None,
    newest_keys: torch.Tensor,
    newest_values: torch.Tensor,
    softcap: float | None,
) -> torch.Tensor:
    """Attention of one query token (B, H_kv, G, D), already scaled, over the codebook slots
    (B, H_kv, U) and the newest tokens (B, H_kv, t, D), post-RoPE, that every query head
    sees: (B, H_kv, G, Dv) float32."""
    empty = query.new_empty(0)
    return extension().attend(
        query.float().contiguous(),
        key_entries.contiguous(),
        key_refs,
        empty if key_magnitudes is None else key_magnitudes,
        table.contiguous(),
        positions,
        empty.bool() if heads is None else heads,
        value_entries.contiguous(),
        value_refs,
        empty if value_magnitudes is None else value_magnitudes,
        newest_keys.float().contiguous(),
        newest_values.float().contiguous(),
        float(softcap or 0.0),
    )


def append(
    vectors: torch.Tensor,
    table: torch.Tensor | None,
    positions: torch.Tensor | None,
    entries: torch.Tensor,
    owner: torch.Tensor,
    count: int,
    theta: float,
    magnitudes: bool,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """SpindleKV's decoding rule for one new vector per group (N, D), group n = row n: it
    joins its group's most similar of the first ``count`` entries when their cosine exceeds
    ``theta``, else it is written (its direction when ``magnitudes``, else as it is) with its
    owner at row ``count`` onwards of ``entries``/``owner``, whose room is reserved. Keys
    come post-RoPE with ``table`` and their ``positions`` (N,) int32. Returns each vector's
    entry (N,) int32, its norm (N,) and how many entries were made."""
    empty = vectors.new_empty(0)
    refs, norms, made = extension().append(
        vectors.float().contiguous(),
        empty if table is None else table.contiguous(),
        empty.int() if positions is None else positions.contiguous(),
        entries,
        owner,
        count,
        theta,
        magnitudes,
    )
    return refs, norms, int(made)


def nearest(
    vectors: torch.Tensor,
    groups: torch.Tensor,
    entries: torch.Tensor,
    owner: torch.Tensor,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For unit vectors (N, D) of ``groups`` (N,) int32, the cosine to their own group's most
    similar entry of ``entries`` (E, D) (groups ``owner`` (E,) int32; compared by direction
    when ``normalize``) and its index, the first on ties: (N,) float32, (N,) int64."""
    return tuple(
        extension().nearest(
            vectors.contiguous(), groups.contiguous(), entries.contiguous(), owner, normalize
        )
    )


def nearest_eager(
    vectors: torch.Tensor,
    groups: torch.Tensor,
    entries: torch.Tensor,
    owner: torch.Tensor,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nearest` as PyTorch operations: the cosines to every entry, then each vector's
    own group's best (``decode_attention: codebook``, and the reference in the tests)."""
    book = entries.to(vectors.dtype)
    if normalize:
        book = book / book.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sims = vectors @ book.T  # (N, E)
    sims.masked_fill_(owner.view(1, -1) != groups.view(-1, 1), float("-inf"))
    return sims.max(dim=-1)
