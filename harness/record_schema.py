"""The typed schema of ``record.json`` (schema version 1), one for every reader and writer.

:func:`harness.records.write_record` refuses a record that fails it, the runner's "is this run
finished" (:func:`harness.records.record_problem`) and the report
(:func:`harness.records.load_record`) treat one that fails it as unfinished / skipped, and
each says why in one line naming the field (:func:`problem`). See :mod:`harness.results` for
what each section holds; here is what each must be:

- ``schema_version`` the integer 1; ``run_id`` a string, the name of the record's folder;
- ``model.name``, ``method.name``, ``task.name``, ``score.metric``: strings;
- ``score.value``: a finite number in ``task.score_range`` (``[lo, hi]``, null for an
  open end; ``[0, 1]`` when the record declares none);
- ``method.params``, ``method.describe``, ``config``, ``metrics``, ``provenance``: mappings
  (describe may be null), ``method.kinds`` a list of strings;
- ``measurements``: a mapping of numbers (finite), nulls, or per-field summaries
  ``{n, mean, p50, p95, min, max, total}`` of numbers; ``requests`` a count;
- ``samples``: a list of sample rows ``{task, doc_id, metrics, requests, ...}``, each request
  a mapping whose measured values are numbers or null.

Values are checked strictly: ``"0.95"`` is not a number, ``true`` is not a count.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from harness.record_values import is_number

SCHEMA_VERSION = 1
DEFAULT_SCORE_RANGE = (0.0, 1.0)

Finite = Annotated[float, Field(allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0)]
# request fields that are not measurements (kept as they are)
REQUEST_TEXT_FIELDS = ("request_type", "method_stats")


def _measurement(value: Any) -> Any:
    """A run-level measurement: a finite number, null, or a per-field summary."""
    if value is None or is_number(value):
        return value
    if isinstance(value, dict):
        Summary.model_validate(value)
        return value
    raise ValueError(f"must be a finite number, null or a summary {{n, mean, ...}}, got {value!r}")


def _request_value(value: Any) -> Any:
    if value is None or is_number(value):
        return value
    raise ValueError(f"must be a finite number or null, got {value!r}")


class _Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class Summary(BaseModel):
    """A per-field summary (:func:`harness.measure.summarize`); empty when nothing measured."""

    model_config = ConfigDict(strict=True, extra="forbid")
    n: Count | None = None
    mean: Finite | None = None
    p50: Finite | None = None
    p95: Finite | None = None
    min: Finite | None = None
    max: Finite | None = None
    total: Finite | None = None


class Measurements(_Section):
    __pydantic_extra__: dict[str, Annotated[Any, AfterValidator(_measurement)]]
    requests: Count | None = None
    kv_ratio: NonNegative | None = None
    kv_ratio_final: NonNegative | None = None
    kv_ratio_reachable: NonNegative | None = None
    kv_ratio_requested: NonNegative | None = None
    prompt_ratio: NonNegative | None = None
    truncated_ratio: NonNegative | None = None
    prefill_tok_per_s: NonNegative | None = None
    decode_tok_per_s: NonNegative | None = None
    peak_memory_kind: str | None = None  # what the peak counted (harness.measure.PeakMemory)


class Request(_Section):
    """One request of a sample: its measurements are numbers or null."""

    request_type: str | None = None
    method_stats: Any = None
    __pydantic_extra__: dict[str, Annotated[Any, AfterValidator(_request_value)]]


class Sample(_Section):
    task: str
    doc_id: Count
    metrics: dict[str, Any] = Field(default_factory=dict)
    doc: dict[str, Any] | None = None
    requests: list[Request] = Field(default_factory=list)


class ModelSection(_Section):
    name: str
    num_layers: Annotated[int, Field(ge=1)] | None = None
    num_kv_heads: Annotated[int, Field(ge=1)] | None = None
    head_dim: Annotated[int, Field(ge=1)] | None = None
    max_length: Annotated[int, Field(ge=1)] | None = None


class MethodSection(_Section):
    name: str
    kinds: list[str] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)
    describe: dict[str, Any] | None = None


class TaskSection(_Section):
    name: str
    lm_eval_tasks: list[str] | None = None
    limit: Annotated[float, Field(gt=0)] | None = None
    primary_metric: str | None = None
    data_hash: str | None = None
    score_range: Annotated[list[Finite | None], Field(min_length=2, max_length=2)] = list(
        DEFAULT_SCORE_RANGE
    )


class Score(_Section):
    metric: str
    value: Finite


class Record(_Section):
    schema_version: int
    run_id: str
    model: ModelSection
    method: MethodSection
    task: TaskSection
    score: Score
    measurements: Measurements
    samples: list[Sample]
    config: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None

    @field_validator("schema_version")
    @classmethod
    def _version(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(f"is {value}, expected {SCHEMA_VERSION}")
        return value

    @model_validator(mode="after")
    def _score_in_range(self) -> Record:
        lo, hi = self.task.score_range
        value = self.score.value
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(
                f"score.value={value} is outside the task's range [{lo}, {hi}] (task.score_range)"
            )
        return self


def problem(record: Any, folder_name: str | None = None) -> str | None:
    """Why ``record`` (parsed JSON) is not a valid finished record, in one line naming the
    field, or None when it is. ``folder_name``: the folder it was read from, which must be
    its ``run_id``."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    version = record.get("schema_version")
    if version != SCHEMA_VERSION:
        older = isinstance(version, int) and not isinstance(version, bool)
        hint = " (written by an older kvbench: re-run it)" if older and version < 1 else ""
        return f"schema_version {version!r}, expected {SCHEMA_VERSION}{hint}"
    try:
        Record.model_validate(record)
    except ValidationError as exc:
        return _first_error(exc)
    if folder_name is not None and record["run_id"] != folder_name:
        return (
            f"run_id {record['run_id']!r} is not its folder's name {folder_name!r} "
            "(a copied or renamed run folder)"
        )
    return None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ""
    for part in error["loc"]:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{where}: missing"
    shown = repr(error.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    if error["type"] == "value_error":
        return f"{where}: {message}" if where else message
    more = len(exc.errors()) - 1
    tail = f" (and {more} more)" if more else ""
    return f"{where}: {message}, got {shown}{tail}"
