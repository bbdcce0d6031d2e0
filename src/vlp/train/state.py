"""Training state beside the weights: optimizer state keyed by parameter name, full state
dicts of sharded (FSDP) models, and RNG states. Tensors go to safetensors, the rest to JSON;
nothing here unpickles."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from vlp.contract import unwrap_model
from vlp.errors import CheckpointError
from vlp.store.files import read_json_object
from vlp.store.tensors import read_safetensors

OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
OPTIMIZER_STATE_FILE = "optimizer.json"
# optimizer options that pick an implementation, not a hyperparameter: never restored
IMPLEMENTATION_OPTIONS = ("fused", "foreach", "capturable", "differentiable")


# ---------------------------------------------------------------------------------------------
# optimizer state


def _optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    names_by_id = {id(param): name for name, param in unwrap_model(model).named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        names = []
        for param in group["params"]:
            if id(param) not in names_by_id:
                raise CheckpointError("optimizer holds a parameter that is not in the model")
            names.append(names_by_id[id(param)])
        groups.append(names)
    return groups


def _json_value(value: Any, where: str) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:  # e.g. a tensor lr
        return value.item()
    if value is None or isinstance(value, bool | int | float | str | list | dict):
        return value
    raise CheckpointError(f"{where}: {type(value).__name__} cannot be stored as JSON")


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict keyed by parameter name instead of index:
    ``{"state": {name: {...}}, "param_groups": [{options..., "params": [names]}]}`` (the layout
    of ``torch.distributed.checkpoint.state_dict``, so FSDP's full state dicts fit it too)."""
    state_dict = optimizer.state_dict()
    name_of_index: dict[int, str] = {}
    groups = []
    for group, names in zip(state_dict["param_groups"], _optimizer_param_names(model, optimizer),
                            strict=True):
        name_of_index.update(zip(group["params"], names, strict=True))
        groups.append({**{k: v for k, v in group.items() if k != "param_names"},
                       "params": names})
    return {"state": {name_of_index[index]: value for index, value in state_dict["state"].items()},
            "param_groups": groups}


def load_named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                               named: dict[str, Any]) -> None:
    """Load a `named_optimizer_state` (names already checked against the optimizer)."""
    current = optimizer.state_dict()
    index_of_name: dict[str, int] = {}
    groups = []
    for saved, names, group in zip(named["param_groups"], _optimizer_param_names(model, optimizer),
                                   current["param_groups"], strict=True):
        index_of_name.update(zip(names, group["params"], strict=True))
        restored = {**{k: v for k, v in saved.items() if k != "params"}, "params": group["params"]}
        if "param_names" in group:
            restored["param_names"] = names
        groups.append(restored)
    state = {index_of_name[name]: value for name, value in named["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def write_optimizer(named: dict[str, Any], optimizer_type: str, directory: Path) -> None:
    """Per-parameter state tensors keyed ``{param_name}::{state_key}`` in safetensors; group
    hyperparameters and non-tensor state in JSON."""
    groups_json = []
    for group in named["param_groups"]:
        options = {key: _json_value(value, f"optimizer param group {key!r}")
                   for key, value in group.items() if key not in ("params", "param_names")}
        groups_json.append({"options": options, "param_names": list(group["params"])})
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, param_state in named["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}::{key}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars.setdefault(name, {})[key] = _json_value(value, f"optimizer {name}.{key}")
    save_file(tensors, directory / OPTIMIZER_TENSORS_FILE, metadata={"format": "pt"})
    (directory / OPTIMIZER_STATE_FILE).write_text(json.dumps(
        {"type": optimizer_type, "param_groups": groups_json, "scalar_state": scalars},
        indent=2) + "\n")


def read_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path
) -> dict[str, Any]:
    """The saved optimizer state as a `named_optimizer_state`, checked against `optimizer`'s
    parameter groups by name."""
    meta = read_json_object(directory / OPTIMIZER_STATE_FILE, CheckpointError)
    tensors = read_safetensors(directory / OPTIMIZER_TENSORS_FILE)
    where = directory / OPTIMIZER_STATE_FILE
    if meta.get("type") != type(optimizer).__name__:
        raise CheckpointError(f"{where}: optimizer type {meta.get('type')!r}, expected "
                              f"{type(optimizer).__name__!r}")
    current_names = _optimizer_param_names(model, optimizer)
    saved_groups = meta["param_groups"]
    if len(saved_groups) != len(current_names):
        raise CheckpointError(f"{where}: {len(saved_groups)} param groups, the optimizer has "
                              f"{len(current_names)}")
    known: set[str] = set()
    param_groups = []
    for number, (saved, names, group) in enumerate(
            zip(saved_groups, current_names, optimizer.param_groups, strict=True)):
        if saved["param_names"] != names:
            differ = sorted(set(saved["param_names"]) ^ set(names)) or ["(order)"]
            raise CheckpointError(f"{where}: param group {number} does not hold the model's "
                                  f"parameters; first difference {differ[0]!r}")
        known.update(names)
        options = {key: tuple(value) if isinstance(value, list) else value
                   for key, value in saved["options"].items()}
        # how the update runs is this machine's choice (fused on GPU, not on CPU, ...)
        options.update({key: group[key] for key in IMPLEMENTATION_OPTIONS if key in group})
        param_groups.append({**options, "params": names})
    state: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name, _, state_key = key.rpartition("::")
        if name not in known:
            raise CheckpointError(f"{directory / OPTIMIZER_TENSORS_FILE}: state for unknown "
                                  f"parameter {name!r}")
        state.setdefault(name, {})[state_key] = tensor
    for name, values in meta.get("scalar_state", {}).items():
        if name not in known:
            raise CheckpointError(f"{where}: state for unknown parameter {name!r}")
        state.setdefault(name, {}).update(values)
    return {"state": state, "param_groups": param_groups}


# ---------------------------------------------------------------------------------------------
# sharded (FSDP) models: full state dicts in and out


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU; under FSDP a collective every rank must call."""
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
    return unwrap_model(model).state_dict()


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`named_optimizer_state`, unsharded on CPU; under FSDP a collective."""
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
    return named_optimizer_state(model, optimizer)


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        unwrap_model(model).load_state_dict(state, strict=True)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                          named: dict[str, Any]) -> None:
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(model, optimizer, named,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        load_named_optimizer_state(model, optimizer, named)


# ---------------------------------------------------------------------------------------------
# RNG state (one entry per rank)


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """This process's python, numpy and torch (CPU, CUDA) generator states as JSON + tensors."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state()
    json_state = {
        "python": [version, list(internal), gauss],
        "numpy": [str(numpy_state[0]), numpy_state[1].tolist(), int(numpy_state[2]),
                  int(numpy_state[3]), float(numpy_state[4])],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = cuda_state
    return json_state, tensors


def apply_rng_state(json_state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = json_state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = json_state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[key] for key in sorted(tensors) if key.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
        torch.cuda.set_rng_state_all(cuda_states)
