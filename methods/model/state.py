"""What recovery training changes, as tensors: LoRA adapters on the MLP (peft) while
training, then the trained attention weights and the LoRA factors, which
:func:`apply_trained` puts into a model built by the same surgery (a freshly trained model
and one loaded from a checkpoint go through the same code, so they are the same model).

Tensor names: ``attn.<layer>.<param>`` (the layer's ``self_attn`` state dict) and
``lora.<module>.A`` (rank, in) / ``lora.<module>.B`` (out, rank), B pre-multiplied by the
LoRA scaling, so that the merged weight is ``W + B @ A``.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.model.layers import decoder_layers


def add_lora(model: nn.Module, rank: int, alpha: float) -> None:
    """Inject LoRA adapters (no dropout) into every linear layer of each decoder layer's MLP."""
    from peft import LoraConfig, inject_adapter_in_model

    names = {id(m): n for n, m in model.named_modules()}
    targets = [
        names[id(m)]
        for layer in decoder_layers(model)
        for m in layer.mlp.modules()
        if isinstance(m, nn.Linear)
    ]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)
    inject_adapter_in_model(config, model)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules peft wrapped, by name."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    """Unfreeze the attention modules and the LoRA factors (only them); return them."""
    model.requires_grad_(False)
    params = []
    for layer in decoder_layers(model):
        params += list(layer.self_attn.parameters())
    for module in lora_layers(model).values():
        params += list(module.lora_A.parameters()) + list(module.lora_B.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def take_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Attention weights and LoRA factors; removes the adapters (unmerged) from ``model``."""
    state = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, tensor in layer.self_attn.state_dict().items():
            state[f"attn.{i}.{name}"] = tensor.detach().clone()
    for name, module in lora_layers(model).items():
        a = module.lora_A["default"].weight.detach()
        b = module.lora_B["default"].weight.detach() * module.scaling["default"]
        state[f"lora.{name}.A"], state[f"lora.{name}.B"] = a.clone(), b.clone()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    model.requires_grad_(False)
    return state


@torch.no_grad()
def apply_trained(model: nn.Module, state: dict[str, torch.Tensor], dry_run: bool = False) -> None:
    """Load trained attention weights and merge the LoRA deltas ``B @ A`` into the MLP.

    Everything is checked before anything changes: ValueError when the tensors do not fit the
    model (a mismatched checkpoint). ``dry_run`` only checks."""
    layers = decoder_layers(model)
    per_layer: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(layers))}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        kind, _, rest = key.partition(".")
        if kind == "attn" and rest.partition(".")[0].isdigit():
            index, _, name = rest.partition(".")
            if int(index) not in per_layer:
                raise ValueError(f"tensor {key} names a layer the model does not have")
            per_layer[int(index)][name] = tensor
        elif kind == "lora" and rest.endswith((".A", ".B")):
            module, _, factor = rest.rpartition(".")
            lora.setdefault(module, {})[factor] = tensor
        else:
            raise ValueError(f"unexpected tensor {key}")
    for i, layer in enumerate(layers):
        expected = layer.self_attn.state_dict()
        tensors = per_layer[i]
        if set(tensors) != set(expected) or any(
            tensors[k].shape != v.shape for k, v in expected.items()
        ):
            raise ValueError(f"layer {i}: the saved attention tensors do not fit the model")
    for name, factors in lora.items():
        try:
            weight = model.get_submodule(name).weight
        except AttributeError as exc:
            raise ValueError(f"{name}: no such module for a LoRA delta") from exc
        a, b = factors.get("A"), factors.get("B")
        if a is None or b is None or (b.shape[0], a.shape[1]) != weight.shape:
            raise ValueError(f"{name}: the LoRA factors do not fit the weight")
    if dry_run:
        return
    for i, layer in enumerate(layers):
        expected = layer.self_attn.state_dict()
        layer.self_attn.load_state_dict({k: v.to(expected[k]) for k, v in per_layer[i].items()})
    for name, factors in lora.items():
        weight = model.get_submodule(name).weight
        weight += factors["B"].to(weight) @ factors["A"].to(weight)
