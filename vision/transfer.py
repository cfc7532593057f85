"""Transfer learning: load a torchvision-format state dict into a model, replace its head, freeze the backbone.

    model.weights=PATH          a state dict saved with torch.save(model.state_dict()) by torchvision or
                                by this lab (a whole model, or one part of it such as `vgg16().features`)
    model.weights=torchvision   torchvision's ImageNet weights for this architecture (needs the internet)
    model.freeze=true           train only the head (`fc` or `classifier`); false: fine-tune everything

The head is always new (its size is the data set's classes), so the file's head weights are skipped.
Every other tensor in the file must match the model by name and shape, or the run stops with one line
naming the first mismatch and what to change. Files are read with `weights_only=True`: they cannot run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lab import checkpoint
from lab.errors import LabError

HEADS = ("fc", "classifier")
KEYS = ("weights", "freeze", "arch")  # the model config's transfer keys, not constructor arguments


def split_config(cfg: DictConfig) -> tuple[DictConfig, dict[str, Any]]:
    """`model:` config -> (what builds the network, {weights, freeze, arch})."""
    spec = OmegaConf.to_container(cfg, resolve=True)
    options = {k: spec.pop(k, None) for k in KEYS}
    return OmegaConf.create(spec), options


def head_name(model: nn.Module) -> str:
    name = next((h for h in HEADS if isinstance(getattr(model, h, None), nn.Module)), None)
    if name is None:
        raise LabError(f"{type(model).__name__} has no head called {' or '.join(HEADS)}: transfer needs one")
    return name


def torchvision_state(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's default pretrained weights for `arch` (e.g. resnet18), downloaded once into the torch hub cache."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        return weights.get_state_dict(progress=False, weights_only=True)
    except Exception as e:  # noqa: BLE001 - offline or unknown architecture: one line
        raise LabError(f"cannot get torchvision's {arch} weights ({' '.join(str(e).split())[:160]}); "
                       "offline, pass a local state dict with model.weights=PATH") from None


def load_pretrained(model: nn.Module, weights: str, arch: str | None = None) -> list[str]:
    """Copy the file's tensors into `model` (all but the head); returns the names loaded."""
    if weights == "torchvision":
        if not arch:
            raise LabError("model.weights=torchvision needs model.arch (e.g. resnet18, vgg16)")
        state, source = torchvision_state(arch), f"torchvision's {arch}"
    else:
        state, source = checkpoint.load_weights(weights), str(Path(weights).expanduser())
    own = model.state_dict()
    head = head_name(model)
    state = {k: v for k, v in _align(state, own).items() if k.split(".")[0] != head}
    for k, v in state.items():
        if k not in own:
            raise LabError(f"{source} does not fit {type(model).__name__}: it has {k!r}, the model does not; "
                           "choose the model (and model.batch_norm / depth) the file was saved from")
        if own[k].shape != v.shape:
            fix = ("set data.channels to the file's input channels" if v.dim() == 4 and v.shape[1] != own[k].shape[1]
                   and own[k].shape[0] == v.shape[0] else "choose the architecture the file was saved from"
                   + (" (model.stem=imagenet for torchvision's 7x7 stem)" if v.dim() == 4 and v.shape[-1] == 7 else ""))
            raise LabError(f"{source} does not fit {type(model).__name__}: {k} is {list(v.shape)} in the file, "
                           f"{list(own[k].shape)} in the model; {fix}")
    if not state:
        raise LabError(f"{source} holds no weights for {type(model).__name__} outside its head; check the file")
    model.load_state_dict(state, strict=False)
    return sorted(state)


def _align(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of one child module (`vgg16().features`: `0.weight`) gets the prefix that fits it best."""
    prefixes = ["", *dict.fromkeys(k.split(".")[0] + "." for k in own)]
    best = max(prefixes, key=lambda p: sum(p + k in own for k in state))
    return {best + k: v for k, v in state.items()}


def freeze_backbone(model: nn.Module) -> list[nn.Module]:
    """No gradients outside the head; returns the frozen BatchNorm layers (to keep in eval mode)."""
    head = getattr(model, head_name(model))
    head_params = {id(p) for p in head.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in head_params)
    head_modules = set(head.modules())
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m not in head_modules]
