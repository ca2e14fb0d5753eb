"""The ``kvbench`` command: one Hydra job = one (model, method, task) run = one record.

kvbench                                   # the demo sweep (sweep=demo), offline, CPU
kvbench method=streamingllm task=gsm8k task.limit=5
kvbench -m method=full,streamingllm method.ratio=0.1,0.2 task=longbench_qasper
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lm_eval
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from harness import records, results
from harness.lm import KVBenchLM
from harness.models import ModelSpec
from harness.provenance import now, provenance
from harness.session import Session, apply
from harness.taskspec import TaskSpec
from methods.base import Method
from methods.storage import conf_dir

log = logging.getLogger("kvbench")
CONF_DIR = conf_dir()


class ConfigError(ValueError):
    """A config group entry is not what kvbench expects."""


def build(cfg: DictConfig) -> tuple[ModelSpec, Method, TaskSpec]:
    """Instantiate and validate the three config groups; nothing is loaded yet."""
    built = []
    for group, kind in (("model", ModelSpec), ("method", Method), ("task", TaskSpec)):
        try:
            obj = instantiate(cfg[group], _convert_="all")
        except InstantiationException as exc:
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
    return tuple(built)  # type: ignore[return-value]


def execute(cfg: DictConfig) -> Path:
    """Run one config, or skip it if its record exists. Returns the run folder."""
    model_spec, method, task = build(cfg)
    cfg = with_resolved_dtype(cfg, model_spec)
    folder = records.run_dir(cfg)
    if records.is_finished(folder) and not cfg.run.overwrite:
        log.info("skipping %s: already finished (run.overwrite=true recomputes it)", folder)
        return folder
    model_config = model_spec.load_config()
    method.validate_for(model_config)
    method.validate_runtime(
        model_spec.device, model_spec.torch_dtype, model_spec.attn_implementation
    )
    started, clock = now(), time.perf_counter()

    model, tokenizer = model_spec.load()
    with apply(
        method,
        model,
        tokenizer,
        max_length=model_spec.context_length(model_config),
        add_bos_token=cfg.run.add_bos_token,
    ) as session:
        lm = KVBenchLM(
            session,
            split_prompt=task.split_prompt,
            truncation=task.truncation,
            max_gen_toks=cfg.run.max_gen_toks,
            reference_answer=task.reference_answer,
            reference_tokens=task.reference_tokens,
        )
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=task.task_names(),
            task_manager=task.task_manager(),
            limit=task.limit,
            num_fewshot=task.num_fewshot,
            log_samples=True,
            bootstrap_iters=cfg.run.bootstrap_iters,
            random_seed=cfg.run.seed,
            numpy_random_seed=cfg.run.seed,
            torch_random_seed=cfg.run.seed,
            fewshot_random_seed=cfg.run.seed,
        )
    record = make_record(cfg, model_spec, model_config, method, task, session, output)
    record["provenance"] = {
        **provenance(session.device, cfg.run.seed),
        "started_at": started,
        "finished_at": now(),
        "wall_s": time.perf_counter() - clock,
    }
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


def with_resolved_dtype(cfg: DictConfig, model_spec: ModelSpec) -> DictConfig:
    """A copy of ``cfg`` whose ``model.dtype`` is the dtype the weights get (``auto``
    resolved), so the record's config says what ran; the run id is the same either way
    (:func:`harness.records.config_hash`)."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.model.dtype = model_spec.resolved_dtype
    return cfg


def make_record(
    cfg: DictConfig,
    model_spec: ModelSpec,
    model_config: Any,
    method: Method,
    task: TaskSpec,
    session: Session,
    output: dict[str, Any],
) -> dict[str, Any]:
    text_config = model_config.get_text_config()
    rows = session.measurement_rows()
    names = task.task_names()
    return {
        "schema_version": records.SCHEMA_VERSION,
        "run_id": records.run_id(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "model": {
            "name": model_spec.name,
            "num_layers": text_config.num_hidden_layers,
            "num_kv_heads": getattr(text_config, "num_key_value_heads", None),
            "head_dim": session.kv_layout.layers[0][1],
            "dtype": model_spec.resolved_dtype,
            "dtype_requested": model_spec.dtype,
            "device": str(session.device),
            "attn_implementation": model_spec.attn_implementation,
            "max_length": session.max_length,
        },
        "method": {
            "name": method.name,
            "kinds": sorted(method.kinds()),
            "params": method.params(),
        },
        "task": {
            "name": task.name,
            "lm_eval_tasks": names,
            "limit": task.limit,
            "primary_metric": task.primary_metric,
        },
        "metrics": output["results"],
        "score": {
            "metric": task.primary_metric,
            "value": results.primary_score(output["results"], names, task.primary_metric),
        },
        "measurements": results.aggregate(rows),
        "samples": results.samples(output.get("samples", {}), rows),
    }


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> str:
    try:
        return str(execute(cfg))
    except Exception as exc:
        # said at once: Hydra's launchers raise a failed job's error only after the whole sweep
        log.error(
            "run failed (method=%s, task=%s), no record written: %s: %s",
            cfg.method.get("name"),
            cfg.task.get("name"),
            type(exc).__name__,
            exc,
        )
        raise


def main() -> None:
    """Console entry point. With no arguments at all it runs the demo sweep (``sweep=demo``):
    full cache vs StreamingLLM on a small LongBench and GSM8K slice."""
    if len(sys.argv) == 1:
        sys.argv.append("sweep=demo")
    _hydra_main()


if __name__ == "__main__":
    main()
