"""Recovery training of a modified model against the unmodified one (KV-Latent, kvheads).

Stage I (``stage1_steps``), in-layer distillation: each batch runs through the teacher; every
student decoder layer gets the *teacher's* input to that layer (and its masks and positions)
and is trained to reproduce the teacher layer's output. The per-layer loss is the MSE
(``layer_loss: mse``, the paper's) or, by default, that MSE divided by the mean square of
the teacher layer's own update ``output - input`` (``relative``): the layers of a model
differ by orders of magnitude there (Gemma-3-270M: 13 to 400 RMS, SmolLM2: 1 to 90), and
with the raw MSE a few late layers make the whole loss; relative, every layer counts alike
and 1.0 means "as far off as a layer that adds nothing". The loss is averaged over layers;
each layer's graph is freed after its own backward. Stage II (``stage2_steps``): logit
distillation ``T^2 * KL(softmax(t/T) || softmax(s/T))`` with temperature ``T`` (``kd``) or
next-token cross-entropy (``ce``) through the whole student.

Trainable: every parameter of each layer's ``self_attn`` (q/k/v/o); the MLP's linear layers
through LoRA adapters (peft, rank ``lora_rank``, no dropout), merged into the weights at
the end; embeddings, the layers' norms and the LM head stay frozen (a per-head
``q_norm``/``k_norm`` inside ``self_attn``, as in Gemma-3, trains with the attention).

Optimiser: AdamW, linear warm-up over ``warmup_steps`` then cosine decay to zero, per stage
(the paper: no warm-up). Adam moves every weight by about the learning rate per step
whatever the loss's scale, so a learning rate only means something next to the size of
the weights: Stage I's rate is, by default, ``lr_scale`` times the RMS of the model's
attention weights (SmolLM2-135M 0.194 -> 2.9e-3; Gemma-3-270M 0.036 -> 5.4e-4); ``lr``
sets it outright. With a fixed 3e-3, Adam's first step changed the outputs of
Gemma-3's ``v_proj``/``o_proj`` by 0.7x their own size (median over layers; up to 2.1x),
SmolLM2's by 0.07-0.11x, and Gemma-3's Stage I loss rose from 3,676 to 23,233 after one step;
at its relative rate Gemma-3's first step moves them by 0.13x. The warm-up shrinks Adam's
first, sign-like steps further.

Returns the trained tensors (attention weights and LoRA factors, the B factor pre-multiplied
by the LoRA scaling) and the loss log; :func:`apply_trained` puts them into a model built by
the same surgery, so a freshly trained model and one loaded from a checkpoint are the same
model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from methods.base import MethodConfigError
from methods.model import data
from methods.model.layers import decoder_layers
from methods.model.state import add_lora, apply_trained, take_state, trainable_params

log = logging.getLogger(__name__)
STAGE2_LOSSES = ("kd", "ce")
LAYER_LOSSES = ("relative", "mse")
NOT_IN_KEY = ("log_every", "progress")  # fields that do not change the trained weights


@dataclass
class TrainConfig:
    """The recovery-training budget, data and optimiser (``method.training.*``).

    Budget: ``stage1_steps`` + ``stage2_steps`` optimiser steps of ``batch_size`` sequences
    of ``seq_len`` tokens each (the tokens are logged). The default, 24 Stage I steps of
    2 x 128 tokens (6,144 tokens), takes about two minutes for SmolLM2-135M on one CPU
    thread (~5 s a step) and gives a measurable, partial recovery (bench/kvlatent_ablation.py);
    the paper trained on ~1B tokens.
    """

    stage1_steps: int = 24
    stage2_steps: int = 0
    stage2_loss: str = "kd"
    temperature: float = 10.0
    batch_size: int = 2
    seq_len: int = 128
    lr: float | None = None
    lr_scale: float = 0.015
    warmup_steps: int = 4
    layer_loss: str = "relative"
    stage2_lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    data: str = "gsm8k_train"
    data_field: str = "text"
    data_split: str = "train"
    teacher_samples: int = 64
    seed: int = 0
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        where = "method.training"
        for name in ("stage1_steps", "stage2_steps", "lora_rank", "warmup_steps"):
            if getattr(self, name) < 0:
                raise MethodConfigError(f"{where}.{name}={getattr(self, name)} must be >= 0")
        for name in ("batch_size", "seq_len", "teacher_samples", "log_every"):
            if getattr(self, name) < 1:
                raise MethodConfigError(f"{where}.{name}={getattr(self, name)} must be >= 1")
        if self.lr is not None and not self.lr > 0:
            raise MethodConfigError(f"{where}.lr={self.lr} must be > 0 (or null: lr_scale)")
        for name in ("lr_scale", "stage2_lr", "temperature", "lora_alpha"):
            if not getattr(self, name) > 0:
                raise MethodConfigError(f"{where}.{name}={getattr(self, name)} must be > 0")
        if self.stage2_loss not in STAGE2_LOSSES:
            raise MethodConfigError(
                f"{where}.stage2_loss={self.stage2_loss!r}: use one of {', '.join(STAGE2_LOSSES)}"
            )
        if self.layer_loss not in LAYER_LOSSES:
            raise MethodConfigError(
                f"{where}.layer_loss={self.layer_loss!r}: use one of {', '.join(LAYER_LOSSES)}"
            )
        data.check_source(self.data, f"{where}.data")

    def stage1_lr(self, teacher: nn.Module) -> float:
        """``lr``, or ``lr_scale`` x the RMS of ``teacher``'s attention weights."""
        if self.lr is not None:
            return self.lr
        return self.lr_scale * attention_weight_rms(teacher)

    @property
    def steps(self) -> int:
        return self.stage1_steps + self.stage2_steps

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    def key(self) -> dict[str, Any]:
        """The fields the trained weights depend on (for the checkpoint hash)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_IN_KEY}


@torch.no_grad()
def attention_weight_rms(model: nn.Module) -> float:
    """The RMS of every q/k/v/o projection weight of the model's decoder layers, together."""
    total = count = 0.0
    for layer in decoder_layers(model):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            weight = getattr(layer.self_attn, name).weight
            total += float(weight.float().pow(2).sum())
            count += weight.numel()
    return math.sqrt(total / count)


def require_budget(train: bool, cfg: TrainConfig, method: str) -> None:
    if train and cfg.steps == 0:
        raise MethodConfigError(
            f"method.train=true but the training budget is zero (method.training.stage1_steps="
            f"0 and method.training.stage2_steps=0): {method} needs recovery training; give it "
            "steps (e.g. method.training.stage1_steps=24) or set method.train=false"
        )


def require_trainable_dtype(train: bool, dtype: torch.dtype, method: str) -> None:
    """Fail for recovery training in float16: AdamW keeps its moments in the weights' dtype,
    where its eps (1e-8) rounds to 0 and squared gradients underflow, so updates blow up
    (there is no loss scaling or float32 master copy here). bfloat16 and float32 train."""
    if train and dtype == torch.float16:
        raise MethodConfigError(
            f"method={method} with method.train=true cannot train float16 weights (AdamW's "
            "state underflows without loss scaling): use model.dtype=bfloat16 (auto on CUDA) "
            "or float32, or method.train=false"
        )


def _batches(cfg: TrainConfig, teacher: nn.Module, tokenizer: Any):
    if cfg.data == "teacher":
        texts = data.teacher_texts(teacher, tokenizer, cfg.teacher_samples, cfg.seq_len, cfg.seed)
    else:
        texts = data.load_texts(cfg.data, field=cfg.data_field, split=cfg.data_split)
    limit = cfg.steps * cfg.batch_size
    chunks = data.token_chunks(texts, tokenizer, cfg.seq_len, limit=limit)
    device = next(teacher.parameters()).device
    return (batch.to(device) for batch in data.batches(chunks, cfg.batch_size, cfg.seed))


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """The learning-rate multiplier at ``step`` of ``steps``: linear warm-up over ``warmup``
    steps (the first step at 1/(warmup+1)), then cosine decay to zero over the rest."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    rest = max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, rest) / rest))


def _optimiser(params: list[nn.Parameter], lr: float, cfg: TrainConfig, steps: int):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    warmup = min(cfg.warmup_steps, steps - 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, steps, warmup))
    return opt, sched


def _layer_io(
    teacher: nn.Module, ids: torch.Tensor
) -> list[tuple[torch.Tensor, dict, torch.Tensor]]:
    """(input hidden, kwargs, output hidden) of every teacher decoder layer for ``ids``."""
    captured = []

    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        out = output[0] if isinstance(output, tuple) else output
        captured.append((hidden.detach(), rest, out.detach()))

    handles = [
        layer.register_forward_hook(hook, with_kwargs=True) for layer in decoder_layers(teacher)
    ]
    try:
        with torch.no_grad():
            teacher(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def layer_loss(out: torch.Tensor, hidden: torch.Tensor, target: torch.Tensor, kind: str):
    """One layer's Stage I loss: the MSE between the student's and the teacher's output
    (``mse``) or that MSE over the mean square of the teacher layer's own update
    ``target - hidden`` (``relative``: 1.0 is as bad as a layer that adds nothing)."""
    mse = F.mse_loss(out.float(), target.float())
    if kind == "mse":
        return mse
    return mse / (target.float() - hidden.float()).pow(2).mean().clamp_min(1e-12)


def _stage1_loss(student_layers: list[nn.Module], captured: list, kind: str) -> float:
    total = 0.0
    for layer, (hidden, kwargs, target) in zip(student_layers, captured, strict=True):
        out = layer(hidden, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        loss = layer_loss(out, hidden, target, kind) / len(student_layers)
        loss.backward()
        total += float(loss.detach())
    return total


def _stage2_loss(
    student: nn.Module, teacher: nn.Module, ids: torch.Tensor, cfg: TrainConfig
) -> float:
    if cfg.stage2_loss == "ce":
        loss = student(input_ids=ids, labels=ids, use_cache=False).loss
    else:
        with torch.no_grad():
            target = teacher(input_ids=ids, use_cache=False).logits.float()
        logits = student(input_ids=ids, use_cache=False).logits.float()
        t = cfg.temperature
        loss = F.kl_div(
            F.log_softmax(logits / t, -1).flatten(0, 1),
            F.log_softmax(target / t, -1).flatten(0, 1),
            log_target=True,
            reduction="batchmean",
        ) * (t * t)
    loss.backward()
    return float(loss.detach())


@torch.no_grad()
def layer_distillation_loss(
    student: nn.Module, teacher: nn.Module, ids: torch.Tensor, kind: str = "relative"
) -> list[float]:
    """The Stage I objective on ``ids`` (B, S), without training, per layer (see
    :func:`layer_loss`; the training loss is their mean)."""
    layers = decoder_layers(student)
    losses = []
    for layer, (hidden, kwargs, target) in zip(layers, _layer_io(teacher, ids), strict=True):
        out = layer(hidden, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        losses.append(float(layer_loss(out, hidden, target, kind)))
    return losses


def recover(
    student: nn.Module, teacher: nn.Module, tokenizer: Any, cfg: TrainConfig, label: str = ""
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Train ``student`` (in place) against ``teacher``; returns (trained tensors, loss log)
    after merging the LoRA deltas into ``student`` (see :func:`apply_trained`)."""
    torch.manual_seed(cfg.seed)
    teacher.eval()
    batches = _batches(cfg, teacher, tokenizer)
    add_lora(student, cfg.lora_rank, cfg.lora_alpha)
    params = trainable_params(student)
    student_layers = decoder_layers(student)
    rows: list[dict[str, Any]] = []
    stage1_lr = cfg.stage1_lr(teacher)
    stages = [("stage1", cfg.stage1_steps, stage1_lr), ("stage2", cfg.stage2_steps, cfg.stage2_lr)]
    bar = tqdm(total=cfg.steps, desc=f"recovery {label}".strip(), disable=not cfg.progress)
    clock = time.perf_counter()
    for stage, steps, lr in stages:
        if steps == 0:
            continue
        opt, sched = _optimiser(params, lr, cfg, steps)
        for step in range(steps):
            ids = next(batches)
            if stage == "stage1":
                loss = _stage1_loss(student_layers, _layer_io(teacher, ids), cfg.layer_loss)
            else:
                loss = _stage2_loss(student, teacher, ids, cfg)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            step_lr = opt.param_groups[0]["lr"]  # the rate this step used
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            row = {
                "stage": stage,
                "step": step,
                "loss": loss,
                "lr": step_lr,
                "tokens": (len(rows) + 1) * ids.numel(),
                "s": time.perf_counter() - clock,
            }
            rows.append(row)
            bar.update(1)
            bar.set_postfix(stage=stage, loss=f"{loss:.4g}")
            if step % cfg.log_every == 0 or step == steps - 1:
                log.info("%s %s step %d/%d loss %.5g", label, stage, step + 1, steps, loss)
    bar.close()
    state = take_state(student)
    apply_trained(student, state)
    student.eval()
    return state, rows
