"""kvbench as an lm-eval model: ``--model kvbench`` on lm-eval's own command line.

lm-eval 0.4 finds models only in its own registry (no plugin entry points), so kvbench ships
``kvbench-lm-eval``: lm-eval's CLI, unchanged, with the ``kvbench`` model registered::

    kvbench-lm-eval --model kvbench \\
        --model_args model=smollm2_135m,method=snapkv,ratio=0.2,model.max_length=4096 \\
        --tasks kvbench_gsm8k --limit 5 --output_path out/

kvbench's own tasks (``kvbench_*``: the offline GSM8K, BBH, LongBench and RULER) are found
without ``--include_path``, from the installed package's task folder; ``--include_path`` adds
more folders. After ``import harness.lm_eval_model``, ``lm_eval.simple_evaluate`` finds them too.

``--model_args``: ``model`` (a ``conf/model/`` name, default smollm2_135m), ``method`` (a
``conf/method/`` name, default full), ``truncation`` (left | middle), ``model.<field>`` for the
model's config fields, every other key a field of the method (``ratio=0.2``, ``window=32``).
lm-eval's ``--device`` (default ``cuda:0``) sets ``model.device`` where that device exists. Each request is measured as in a kvbench run; the
measurements (per request and aggregated: KV ratio, prefill, decode, peak memory) are written
as ``kvbench_<date>.json`` beside lm-eval's ``results_<date>.json`` and summarised on stdout.
In Python, ``import harness.lm_eval_model`` registers the model for ``lm_eval.simple_evaluate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, ClassVar

import lm_eval.evaluator
import lm_eval.models  # noqa: F401  (lm-eval imports its own models only into an empty registry)
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager

from harness import results
from harness.api import build
from harness.job import load_session
from harness.lm import KVBenchLM
from harness.tasks import TASKS_DIR

MODEL_PREFIX = "model."


@register_model("kvbench")
class KVBenchEvalLM(KVBenchLM):
    """:class:`~harness.lm.KVBenchLM` built from lm-eval's ``--model_args`` (see the module)."""

    instances: ClassVar[list[KVBenchEvalLM]] = []

    def __init__(
        self,
        model: str = "smollm2_135m",
        method: str = "full",
        truncation: str = "left",
        max_gen_toks: int | None = None,  # caps every task; None: its own limit, or 256
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **fields: Any,
    ) -> None:
        if str(batch_size) not in ("1", "auto"):
            raise ValueError(
                f"--batch_size {batch_size}: kvbench runs one request at a time (each with "
                "its own KV cache and measurements); use --batch_size 1"
            )
        model_fields = {
            k.removeprefix(MODEL_PREFIX): v for k, v in fields.items() if k.startswith(MODEL_PREFIX)
        }
        if device is not None and _available(device):  # lm-eval's default is cuda:0
            model_fields.setdefault("device", device)
        method_fields = {k: v for k, v in fields.items() if not k.startswith(MODEL_PREFIX)}
        spec = build("model", model, **model_fields)
        method_obj = build("method", method, **method_fields)
        self._stack = ExitStack()
        session = self._stack.enter_context(load_session(spec, method_obj))
        super().__init__(session, truncation=truncation, max_gen_toks=max_gen_toks)
        self.names = {
            "model": model,
            "method": method_obj.name,
            "params": method_obj.params(),
            "dtype": spec.resolved_dtype,  # model.dtype=auto resolved: bfloat16 on CUDA
            "device": str(session.device),
        }
        KVBenchEvalLM.instances.append(self)

    def close(self) -> None:
        """Remove the method's hooks (the process usually just ends)."""
        self._stack.close()

    def summary(self) -> dict[str, Any]:
        """What this model measured: names, the run-level aggregates and every request."""
        rows = self.measurement_rows()
        return {**self.names, "measurements": results.aggregate(rows), "requests": rows}


def include_paths(given: str | Path | list[str | Path] | None) -> list[str]:
    """kvbench's task folder, then the caller's folders (lm-eval lets later ones win)."""
    extra = [] if given is None else given if isinstance(given, (list, tuple)) else [given]
    return [str(TASKS_DIR), *(str(p) for p in extra if Path(p).resolve() != TASKS_DIR)]


class KVBenchTaskManager(TaskManager):
    """lm-eval's TaskManager that also indexes kvbench's tasks (``include_path`` adds more)."""

    def __init__(self, *args: Any, include_path: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, include_path=include_paths(include_path), **kwargs)


# ``simple_evaluate`` without a ``task_manager`` builds ``lm_eval.evaluator.TaskManager()``: the
# one name kvbench rebinds, to a subclass that only adds its own folder (lm-eval has no plugin
# point for external tasks, as it has for models)
lm_eval.evaluator.TaskManager = KVBenchTaskManager


def _available(device: str) -> bool:
    import torch

    return not device.startswith("cuda") or torch.cuda.is_available()


def write_measurements(output_path: str | None) -> list[Path]:
    """Write each kvbench model's :meth:`~KVBenchEvalLM.summary` beside lm-eval's newest
    ``results_*.json`` under ``output_path`` (as ``kvbench_<date>.json``); print a summary."""
    written = []
    for lm in KVBenchEvalLM.instances:
        summary = lm.summary()
        m = summary["measurements"]
        print(
            f"kvbench: model={summary['model']} method={summary['method']} "
            f"requests={m['requests']} kv_ratio={m['kv_ratio']} "
            f"prefill_tok_per_s={m['prefill_tok_per_s']} decode_tok_per_s={m['decode_tok_per_s']}"
        )
        if not output_path:
            continue
        found = sorted(Path(output_path).rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
        folder = found[-1].parent if found else Path(output_path)
        date = found[-1].stem.removeprefix("results_") if found else "latest"
        target = folder / f"kvbench_{date}.json"
        folder.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(summary, indent=1, default=str))
        print(f"kvbench: measurements written to {target}")
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> None:
    """``kvbench-lm-eval ...``: lm-eval's CLI with ``--model kvbench`` available."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--output_path", "-o", default=None)
    known, _ = parser.parse_known_args(sys.argv[1:])
    # lm-eval's cli_evaluate, with kvbench's task folder ahead of any --include_path
    setup_logging()
    cli = HarnessCLI()
    args = cli.parse_args()
    if hasattr(args, "include_path"):  # run, ls and validate take it
        args.include_path = include_paths(args.include_path)
    cli.execute(args)
    write_measurements(known.output_path)


if __name__ == "__main__":
    main()
