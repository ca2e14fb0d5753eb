"""The dequantised-model cache: folders that are whole and unchanged, or rebuilt.

A GGUF model is dequantised once into ``$KVBENCH_CACHE/models/<name>-<key>/`` (plain
safetensors, config and tokenizer) and reloaded from there. The folder is assembled under a
staging name and renamed into place (:func:`methods.storage.publish`); its ``.complete``
marker, written last, lists every file with its size and an xxh3-128 hash computed once, when
it was written. Before use the folder is checked against the marker (sizes, then hashes, once
per process: SmolLM2's 540 MB took 0.7 s, file reads included, on a busy 2-core CPU), so a
partial write, a truncated file or bytes changed in place are caught: the folder is rebuilt, with a warning naming it, instead of loading garbage.
Staging folders left by killed writers are removed; so are staging folders of kvbench
versions before the marker held checksums, once they are older than this process.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import xxhash
from safetensors import SafetensorError

from methods.storage import (
    CACHE_ENV,
    older_than_process,
    publish,
    remove_stale_staging,
    staging_folder,
)

log = logging.getLogger("kvbench")

MARKER = ".complete"
FORMAT = 2  # 1: the marker held only the GGUF's path, no checksums
HASH = "xxh3_128"
_BLOCK = 8 << 20
_verified: dict[Path, tuple[tuple[str, int, int, int], ...]] = {}


def file_hash(path: Path) -> str:
    """xxh3-128 of the file's bytes (several GB/s: cheap enough to check before every load)."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def write_marker(folder: Path, source: str) -> None:
    """Record every file in ``folder`` (size and hash), as the last file written."""
    files = {
        str(path.relative_to(folder)): {"size": path.stat().st_size, HASH: file_hash(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MARKER
    }
    marker = {"format": FORMAT, "source": source, "files": files}
    (folder / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")


def problem(folder: Path) -> str | None:
    """Why ``folder`` must not be used, or None when every file matches its marker."""
    marker = folder / MARKER
    if not folder.is_dir():
        return "missing"
    if not marker.is_file():
        return f"unfinished: no {MARKER} marker"
    try:
        files = json.loads(marker.read_text())["files"]
        expected = {name: (int(entry["size"]), str(entry[HASH])) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"from an older kvbench: its {MARKER} marker holds no checksums"
    if not expected:
        return f"its {MARKER} marker lists no files"
    stats = []
    for name, (size, _) in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        stat = path.stat()
        if stat.st_size != size:
            return f"{path} has {stat.st_size} bytes, {size} when written (truncated or partial)"
        stats.append((name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    if _verified.get(folder) == tuple(stats):
        return None  # hashed in this process already, and untouched since
    for name, (_, digest) in sorted(expected.items()):
        if file_hash(folder / name) != digest:
            return f"{folder / name} does not match the checksum recorded when it was written"
    _verified[folder] = tuple(stats)
    return None


class ModelCacheError(RuntimeError):
    """A model cache that cannot be written (a full disk); the message names the folder."""


def ensure(target: Path, build: Callable[[Path], str], *, what: str) -> Path:
    """``target``, verified; built first (``build(staging)`` fills a staging folder and
    returns a description of its source) when it is missing, partial or corrupt."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    why = problem(target)
    if why is None:
        return target
    if why != "missing":
        log.warning("model cache %s is unusable (%s): rebuilding it", target, why)
    staging = staging_folder(target)
    clock = time.perf_counter()
    try:
        source = build(staging)
        write_marker(staging, source)
        publish(staging, target, complete=lambda path: problem(path) is None)
    except (OSError, SafetensorError) as exc:  # a full disk, mostly: one line, no traceback
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if any(sign in reason for sign in ("code: 28", "os error 28", "StorageFull")):
            reason = "No space left on device"
        raise ModelCacheError(
            f"cannot write the model cache {target}: {reason[:200]}; free space on that "
            f"disk, or set ${CACHE_ENV} to a folder on another, and run again"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    why = problem(target)
    if why is not None:
        raise RuntimeError(f"model cache {target} is unusable right after writing it: {why}")
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    log.info(
        "%s: cached in %s (%.0f MB, %.0f s); later runs load it from there",
        what,
        target,
        size / 1e6,
        time.perf_counter() - clock,
    )
    return target


def _remove_leftovers(target: Path) -> None:
    """Staging folders of writers that were killed (SIGKILL, power loss) mid-write."""
    removed = remove_stale_staging(target.parent, target.name)
    # before kvbench named them .staging-*: .<name>-<random>, older than this process
    for folder in target.parent.glob(f".{target.name}-*"):
        if folder.is_dir() and older_than_process(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    for folder in removed:
        log.warning("model cache: removed %s, left by a writer that was killed", folder)


@contextmanager
def heartbeat(what: str, every: float = 30.0) -> Iterator[None]:
    """Log ``what: still working (N s)`` every ``every`` seconds until the block ends: a step
    with no progress bar of its own (a GGUF tokenizer's conversion takes minutes) is not
    mistaken for a hang."""
    done = threading.Event()
    start = time.perf_counter()

    def beat() -> None:
        while not done.wait(every):
            log.info("%s: still working (%.0f s)", what, time.perf_counter() - start)

    thread = threading.Thread(target=beat, name="kvbench-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
