"""One kvbench job as a library: check and instantiate a config (:func:`prepare`), run it
under its method (:func:`execute`); its record is assembled by :mod:`harness.results`.

The command line (:mod:`harness.run`) and :mod:`harness.api` both call :func:`execute`; this
module knows nothing of Hydra's command line or of exit codes.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lm_eval
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from harness import gpu_lease, preflight, records, results
from harness.compressors import check_compressors
from harness.lm import KVBenchLM
from harness.models import ModelSpec
from harness.preflight import BAD_INPUT, ConfigError
from harness.provenance import now
from harness.session import Session, open_session
from harness.session_checks import check_prefill_chunk
from harness.taskspec import TaskSpec
from methods.base import CacheMethod, Method
from methods.storage import cache_root

log = logging.getLogger("kvbench")

__all__ = [
    "NoEffectError",
    "evaluate",
    "execute",
    "load_session",
    "prepare",
]


class NoEffectError(RuntimeError):
    """A method asked for a reduction and measured none: the run is not recorded."""


def prepare(cfg: DictConfig) -> tuple[ModelSpec, Method, TaskSpec]:
    """Check and instantiate the three config groups and the ``run`` fields; nothing is
    loaded yet. A value of the wrong type fails here naming its field (``method.ratio=abc``)."""
    preflight.check_run(cfg.run)
    built = []
    for group, kind in (("model", ModelSpec), ("method", Method), ("task", TaskSpec)):
        preflight.check_types(group, cfg[group])
        try:
            obj = instantiate(cfg[group], _convert_="all")
        except InstantiationException as exc:
            if isinstance(exc.__cause__, BAD_INPUT):
                raise exc.__cause__ from None  # the class's own one-line message
            if "Error locating target" not in str(exc):
                raise
            raise ConfigError(
                f"{group}={cfg[group].get('name')}: its `_target_: {cfg[group].get('_target_')}` "
                f"cannot be imported ({exc.__cause__ or exc}): is the package that provides it "
                f"installed? The options are the files in conf/{group}/"
            ) from exc
        if not isinstance(obj, kind):
            raise ConfigError(f"{group}: `_target_` must build a {kind.__name__}, got {obj!r}")
        built.append(obj)
    check_compressors(built[1])  # method.compressor: a model config the harness will load
    return tuple(built)  # type: ignore[return-value]


def execute(cfg: DictConfig) -> Path:
    """Run one config, or skip it if its record exists. Returns the run folder.

    Everything that can fail without the model is checked before it loads: the config's
    values, the results folder (writable), and the model's window against the tokens the task
    generates (``run.max_gen_toks`` caps every task's own limit)."""
    model_spec, method, task = prepare(cfg)
    cfg = with_resolved_dtype(cfg, model_spec)
    data_hash = task.data_hash()
    folder = records.run_dir(cfg, data_hash)
    if not cfg.run.overwrite and records.is_finished(folder):
        log.info("skipping %s: already finished (run.overwrite=true recomputes it)", folder)
        return folder
    records.check_writable(cfg.run.results_dir)
    cache_root()  # $KVBENCH_CACHE a file, or not writable: said now, not once loading
    cap = cfg.run.max_gen_toks
    tokenizer = None
    if task.is_ruler:  # RULER is sized in the model's tokens: its tokenizer, before the weights
        tokenizer = model_spec.load_tokenizer()
        task.validate_for(model_spec.context_length(model_spec.load_config()), tokenizer)
    task_manager = task.task_manager(tokenizer)
    limits = preflight.generation_limits(task_manager, task.task_names(), cap)
    if model_spec.max_length is not None:  # before the config: a GGUF may need dequantising
        preflight.check_window(model_spec.max_length, limits, cap, model_spec.max_length)
    model_config = model_spec.load_config()
    check_method(model_spec, method, model_config)
    window = model_spec.context_length(model_config)
    preflight.check_window(window, limits, cap, model_spec.max_length)
    # the longest prompt that fits: a ratio that cannot act on it (0.9999) is refused now
    preflight.check_prompt_lengths(method, [window - max(limits.values(), default=0)])
    with gpu_lease.on_a_free_gpu(model_spec) as model_spec:
        record = _run(cfg, model_spec, model_config, method, task, task_manager, data_hash)
    records.write_record(folder, record, cfg, overwrite=cfg.run.overwrite)
    score = record["score"]
    log.info(
        "%s: %s = %s, kv_ratio = %s -> %s",
        folder.name,
        score["metric"],
        score["value"],
        record["measurements"]["kv_ratio"],
        folder,
    )
    return folder


def _run(
    cfg: DictConfig,
    model_spec: ModelSpec,
    model_config: Any,
    method: Method,
    task: TaskSpec,
    task_manager: Any,
    data_hash: str | None,
) -> dict[str, Any]:
    """Load the model, run the task's requests under the method, and return the record."""
    cap = cfg.run.max_gen_toks
    started, clock = now(), time.perf_counter()
    with load_session(
        model_spec, method, model_config=model_config, add_bos_token=cfg.run.add_bos_token
    ) as session:
        output = evaluate(session, task, task_manager, cap, cfg.run)
    _log_truncation(session, model_spec.max_length)
    record = results.make_record(
        cfg, model_spec, model_config, method, task, session, output, data_hash
    )
    reason = results.no_effect(
        method.kinds(),
        record["measurements"],
        any(isinstance(m, CacheMethod) and m.asks_reduction() for m in method.flatten()),
    )
    if reason is not None:
        raise NoEffectError(f"{method.name}: {reason}. No record was written.")
    record["provenance"] = results.provenance_section(session, method, cfg.run.seed, started, clock)
    return record


def check_method(model_spec: ModelSpec, method: Method, model_config: Any) -> None:
    """The method against the model's config, where it will run and how it prefills
    (``model.prefill_chunk``), before the weights load."""
    method.validate_for(model_config)
    method.validate_runtime(
        model_spec.device, model_spec.torch_dtype, model_spec.attn_implementation
    )
    check_prefill_chunk(method, model_spec.prefill_chunk, "model.prefill_chunk")
    model_spec.decode_plan(method, model_config)


@contextmanager
def load_session(
    model_spec: ModelSpec,
    method: Method,
    *,
    model_config: Any = None,
    add_bos_token: bool | None = None,
) -> Iterator[Session]:
    """``with load_session(model_spec, method) as session:`` load the model and run it under
    ``method`` in a window of the model's context length (:func:`harness.session.open_session`).

    Without ``model_config`` the method is first checked against the model (:func:`check_method`);
    with it, the caller has checked it already (:func:`execute`, before its window checks)."""
    if model_config is None:
        model_config = model_spec.load_config()
        check_method(model_spec, method, model_config)
    model, tokenizer = model_spec.load()
    with open_session(
        method,
        model,
        tokenizer,
        max_length=model_spec.context_length(model_config),
        add_bos_token=add_bos_token,
        check_runtime=False,
        prefill_chunk=model_spec.prefill_chunk,
        decode_capture=model_spec.decode_plan(method, model_config),
    ) as session:
        yield session


def evaluate(
    session: Session, task: TaskSpec, task_manager: Any, max_gen_toks: int | None, run: Any
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` of ``task`` on ``session`` (``run``: the config's ``run``
    group, for its seed and bootstrap iterations); returns lm-eval's output with its samples."""
    lm = KVBenchLM(
        session,
        split_prompt=task.split_prompt,
        truncation=task.truncation,
        max_gen_toks=max_gen_toks,
        reference_answer=task.reference_answer,
        reference_tokens=task.reference_tokens,
    )
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=task.task_names(),
        task_manager=task_manager,
        limit=task.limit,
        num_fewshot=task.num_fewshot,
        log_samples=True,
        bootstrap_iters=run.bootstrap_iters,
        random_seed=run.seed,
        numpy_random_seed=run.seed,
        torch_random_seed=run.seed,
        fewshot_random_seed=run.seed,
    )


def with_resolved_dtype(cfg: DictConfig, model_spec: ModelSpec) -> DictConfig:
    """A copy of ``cfg`` whose ``model.dtype`` is the dtype the weights get (``auto``
    resolved), so the record's config says what ran; the run id is the same either way
    (:func:`harness.records.config_hash`)."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.model.dtype = model_spec.resolved_dtype
    return cfg


def _log_truncation(session: Session, max_length: int | None) -> None:
    """One line per run when the window cut prompts (each request's ``truncated_tokens``)."""
    cut = [m for m in session.measurements if m.truncated_tokens]
    if cut:
        log.warning(
            "%d of %d requests did not fit the window of %d tokens (model.max_length=%s, "
            "less the tokens generated) and were truncated: %d of their %d prompt tokens "
            "were cut (truncated_tokens in the record)",
            len(cut),
            len(session.measurements),
            session.max_length,
            max_length,
            sum(m.truncated_tokens for m in cut),
            sum(m.prompt_tokens_original for m in cut),
        )
