"""Trained weights of the model methods, cached on disk so that a sweep trains each key once.

A checkpoint is a folder ``<root>/<key>/`` (root: ``$KVBENCH_CACHE/kvlatent`` or
``.../kvheads``) holding ``weights.safetensors``, ``meta.json`` (the key's inputs, the
training summary), ``train_log.jsonl`` (the loss log) and, written last, ``COMPLETE``: a
JSON marker with the SHA-256 of every other file. The folder is assembled under a staging
name and renamed into place, so a killed run leaves no folder under the key. A folder that
lacks the marker, fails a checksum, or whose tensors do not fit the model is reported,
deleted and retrained, never loaded.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from methods.storage import staging_folder

log = logging.getLogger(__name__)

WEIGHTS, META, LOG, MARKER = "weights.safetensors", "meta.json", "train_log.jsonl", "COMPLETE"
FORMAT_VERSION = 2  # bump when the trainer changes what the same config trains


def checkpoint_key(payload: dict[str, Any]) -> str:
    """A stable 16-hex-digit hash of everything the trained weights depend on."""
    text = json.dumps({"format": FORMAT_VERSION, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CorruptCheckpoint(RuntimeError):
    """A checkpoint folder that must not be loaded (missing marker, bad checksum, misfit)."""


@dataclass
class CheckpointStore:
    """Checkpoints under ``root``, one folder per key."""

    root: Path

    def folder(self, key: str) -> Path:
        return Path(self.root) / key

    def load(
        self, key: str, check: Callable[[dict[str, torch.Tensor]], None] | None = None
    ) -> dict[str, torch.Tensor] | None:
        """The tensors saved under ``key``, or None if there are none or they are unusable
        (the folder is then deleted). ``check`` may raise to reject tensors that do not fit."""
        folder = self.folder(key)
        if not folder.exists():
            return None
        try:
            tensors = self._verified(folder)
            if check is not None:
                check(tensors)
            return tensors
        except Exception as exc:  # any failure means: retrain
            log.warning("checkpoint %s is unusable (%s): deleting it and retraining", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
            return None

    def _verified(self, folder: Path) -> dict[str, torch.Tensor]:
        marker = folder / MARKER
        if not marker.is_file():
            raise CorruptCheckpoint(f"no {MARKER} marker (partial write)")
        sums = json.loads(marker.read_text())["sha256"]
        for name, expected in sums.items():
            if _sha256(folder / name) != expected:
                raise CorruptCheckpoint(f"{name} does not match its checksum")
        if WEIGHTS not in sums:
            raise CorruptCheckpoint(f"{WEIGHTS} is not listed in {MARKER}")
        return load_file(folder / WEIGHTS)

    def meta(self, key: str) -> dict[str, Any]:
        return json.loads((self.folder(key) / META).read_text())

    def save(
        self,
        key: str,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        log_lines: list[dict[str, Any]] | None = None,
    ) -> Path:
        """Write the checkpoint atomically (staging folder, checksums, marker, rename)."""
        target = self.folder(key)
        staging = staging_folder(target)  # the user's umask, not mkdtemp's 0700
        try:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, staging / WEIGHTS
            )
            (staging / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
            lines = "".join(json.dumps(row) + "\n" for row in log_lines or [])
            (staging / LOG).write_text(lines)
            sums = {name: _sha256(staging / name) for name in (WEIGHTS, META, LOG)}
            (staging / MARKER).write_text(json.dumps({"sha256": sums}, indent=2))
            shutil.rmtree(target, ignore_errors=True)
            try:
                staging.rename(target)
            except OSError:  # another process finished the same key first: keep theirs
                log.info("checkpoint %s appeared meanwhile; keeping it", target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


def surgery_with_recovery(
    model: torch.nn.Module,
    tokenizer: Any,
    surgery: Callable[[torch.nn.Module], None],
    *,
    store: CheckpointStore,
    payload: dict[str, Any],
    cfg: Any,
    label: str,
) -> torch.nn.Module:
    """Apply ``surgery`` (which replaces the layers' ``self_attn`` modules) to ``model`` in
    place, then load the trained weights cached under the key of ``payload`` (plus the
    model's fingerprint and the training config ``cfg``), or train them with
    :func:`methods.model.training.recover` against the unmodified model and cache them.
    Sets ``model.kvbench_recovery`` to ``{"folder": checkpoint folder, "loaded": bool}``."""
    from methods.model import training
    from methods.model.layers import decoder_layers, fingerprint
    from methods.model.state import apply_trained

    key = checkpoint_key({**payload, "model": fingerprint(model), "training": cfg.key()})
    layers = decoder_layers(model)
    originals = [layer.self_attn for layer in layers]
    surgery(model)
    state = store.load(key, check=lambda tensors: apply_trained(model, tensors, dry_run=True))
    if state is not None:
        apply_trained(model, state)
        log.info("%s: loaded trained weights from %s", label, store.folder(key))
        model.kvbench_recovery = {"folder": str(store.folder(key)), "loaded": True}
        return model
    # the teacher: a copy of the model with its original attention modules back in place
    memo = {
        id(layer.self_attn): original for layer, original in zip(layers, originals, strict=True)
    }
    teacher = copy.deepcopy(model, memo)
    clock = time.perf_counter()
    state, rows = training.recover(model, teacher, tokenizer, cfg, label=label)
    seconds = time.perf_counter() - clock
    del teacher
    meta = {
        "label": label,
        "key": key,
        "payload": payload,
        "training": cfg.key(),
        "tokens": cfg.tokens,
        "train_s": seconds,
        "losses": {
            stage: {"first": losses[0], "last": losses[-1], "steps": len(losses)}
            for stage in ("stage1", "stage2")
            if (losses := [r["loss"] for r in rows if r["stage"] == stage])
        },
    }
    folder = store.save(key, state, meta, rows)
    log.info("%s: trained in %.0f s (%d tokens), saved to %s", label, seconds, cfg.tokens, folder)
    model.kvbench_recovery = {"folder": str(folder), "loaded": False}
    return model
