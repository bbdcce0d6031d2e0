"""LoRA (Hu et al. 2021, arXiv 2106.09685) through PEFT: low-rank adapters injected into a vlp
model in place, every other weight frozen, and the merged state a plain vlp model loads.

PEFT (``pip install 'vlp[lora]'``) replaces each targeted ``nn.Linear`` by a layer holding the
original as ``base_layer`` and the adapters ``lora_A`` / ``lora_B``; the model stays the same
`PretrainModel` (the same contract, the same forward). `merged_state` folds the adapters back:
``weight = base_weight + scaling * lora_B @ lora_A`` under the original names, so a checkpoint's
``model.safetensors`` loads into the family's model without PEFT.
"""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from vlp.errors import ConfigError, require_extra

ADAPTER = "default"


def _peft():
    with warnings.catch_warnings():  # PEFT warns about the transformers version it finds
        warnings.simplefilter("ignore")
        peft = require_extra("peft", "lora", "train config lora_rank (LoRA adapters)")
        lora = require_extra("peft.tuners.lora", "lora", "train config lora_rank")
    return peft, lora.LoraLayer


def add_lora(model: nn.Module, rank: int, alpha: float, targets: str,
             dropout: float = 0.0) -> None:
    """Inject rank-`rank` adapters into the modules whose names end in one of the
    comma-separated `targets`, in place; only the adapters stay trainable."""
    peft, _ = _peft()
    names = [name.strip() for name in targets.split(",") if name.strip()]
    if not names:
        raise ConfigError("train config lora_targets is empty; expected module names such as "
                          "qkv,proj")
    # weights kept as buffers (momentum encoders: copies that follow the trained weights by
    # EMA, never trained) get no adapters
    copies = [name for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and "weight" not in module._parameters]
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                             target_modules=names, bias="none", exclude_modules=copies or None)
    try:
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as error:  # no module matched, or one PEFT cannot adapt
        raise ConfigError(f"train config lora_targets={targets!r}: {error}") from error


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The adapted modules by name (none without PEFT installed or adapters injected)."""
    if not any("lora_" in name for name, _ in model.named_parameters()):
        return {}
    _, layer_type = _peft()
    return {name: module for name, module in model.named_modules()
            if isinstance(module, layer_type)}


def merged_state(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` (the adapted `model`'s state dict, or an average of it) with every adapter
    merged into its base weight, under the names of the model without adapters."""
    layers = lora_layers(model)
    merged = {name.replace(".base_layer.", "."): tensor for name, tensor in state.items()
              if ".lora_" not in name}
    for name, layer in layers.items():
        if layer.fan_in_fan_out or getattr(layer, "use_dora", {}).get(ADAPTER, False):
            raise ConfigError(f"{name}: only plain LoRA on Linear layers can be merged")
        a = state[f"{name}.lora_A.{ADAPTER}.weight"]
        b = state[f"{name}.lora_B.{ADAPTER}.weight"]
        base = merged[f"{name}.weight"]
        delta = (b.float() @ a.float()) * layer.scaling[ADAPTER]
        merged[f"{name}.weight"] = (base.float() + delta).to(base.dtype)
    return merged

