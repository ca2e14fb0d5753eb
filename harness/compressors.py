"""The prompt methods' named compressors: checked, loaded and handed over by the harness.

A prompt method's ``compressor`` is None (it scores with the benchmarked model) or the name
of a model config in ``conf/model/`` (e.g. ``smollm2_135m``). The method never resolves the
name: :func:`check_compressors` refuses an unknown one before any model loads
(:func:`harness.job.prepare`, :func:`harness.api.build`), and :func:`hand_over_compressors`,
called by :func:`harness.session.open_session` (every front door enters there), loads it on
the benchmarked model's device and hands it to the method
(:meth:`methods.prompt.tokens.TokenDropMethod.use_compressor`) before ``prepare``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from torch import nn

from methods.base import Method, MethodConfigError
from methods.prompt.tokens import TokenDropMethod
from methods.storage import conf_dir

MODEL_CONF = conf_dir() / "model"


def named_compressors(method: Method) -> list[TokenDropMethod]:
    """The prompt methods of ``method`` (composed ones included) that name a compressor."""
    return [
        m for m in method.flatten() if isinstance(m, TokenDropMethod) and m.compressor is not None
    ]


def check_compressors(method: Method) -> None:
    """Fail (:class:`MethodConfigError`, one line) unless every named compressor of
    ``method`` is a model config in ``conf/model/``."""
    for m in named_compressors(method):
        if not (MODEL_CONF / f"{m.compressor}.yaml").is_file():
            names = sorted(p.stem for p in MODEL_CONF.glob("*.yaml"))
            raise MethodConfigError(
                f"method.compressor={m.compressor!r} is not a model config: pass null (the "
                f"benchmarked model) or one of {', '.join(names)}"
            )


def hand_over_compressors(method: Method, model: nn.Module) -> None:
    """Load each named compressor of ``method`` on ``model``'s device (once per process and
    device: :func:`load_compressor`) and hand it to its method, before ``prepare``."""
    check_compressors(method)
    device = str(next(model.parameters()).device)
    for m in named_compressors(method):
        m.use_compressor(*load_compressor(str(m.compressor), device))


@lru_cache(maxsize=2)
def load_compressor(name: str, device: str = "cpu") -> tuple[nn.Module, Any]:
    """The model and tokenizer of ``conf/model/<name>.yaml`` on ``device`` (the benchmarked
    model's; its dtype as the config says, ``auto``: bfloat16 on CUDA), loaded once per
    process and device."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.load(MODEL_CONF / f"{name}.yaml"), {"device": device})
    spec = instantiate(cfg, _convert_="all")
    return spec.load()
