"""Neural style transfer (Gatys, Ecker & Bethge 2015) on the common trainer: the image is the parameter.

    features = VGG(x) at named layers (relu1_1 ... relu5_1, relu4_2, ...), inputs ImageNet-normalised
    content  = mean((F_l(x) - F_l(content))^2)                     on style.content_layers
    style    = sum_l mean((G_l(x) - G_l(style))^2),  G = F F^T / (C H W)   on style.style_layers
    loss     = content_weight * content + style_weight * style + tv_weight * total_variation(x)

x starts from the content image. With `optimizer=lbfgs` (StepLBFGS) one trainer step is one L-BFGS
iteration (one VGG forward and backward; the trainer's backward supplies the gradient, the
curvature history persists across steps): the same sequence of iterates as `LBFGS.step(closure)`
with max_iter=N and no line search, the PyTorch tutorial's setting. `optimizer=adam` is the
alternative. `model:` is the VGG (`load_vgg`). Evaluations log the current image (the progression)
and write `stylized.png`.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from lab import checkpoint, media
from lab.config import build
from lab.errors import LabError
from lab.optim import build_optimizer
from lab.task import RunContext, Task

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_image(path: str | Path, size: int | None, what: str) -> torch.Tensor:
    """An image file as (1, 3, H, W) floats in [0, 1], its longer side resized to `size` (bilinear, antialiased)."""
    from PIL import Image, UnidentifiedImageError

    if not path or not Path(str(path)).expanduser().is_file():
        raise LabError(f"style.{what}={path} is not an image file; pass style.{what}=PATH (png, jpg, ...)")
    try:
        with Image.open(Path(str(path)).expanduser()) as im:
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise LabError(f"style.{what}={path} cannot be read as an image ({e})") from None
    if size:
        scale = size / max(im.size)
        im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))),
                       Image.Resampling.BILINEAR, reducing_gap=None)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1).unsqueeze(0).contiguous()


def layer_names(features: nn.Sequential) -> list[str]:
    """conv1_1, relu1_1, ..., pool1, conv2_1, ... for each module of a torchvision VGG `features`."""
    names, block, i = [], 1, 0
    for m in features:
        if isinstance(m, nn.Conv2d):
            i += 1
            names.append(f"conv{block}_{i}")
        elif isinstance(m, nn.ReLU):
            names.append(f"relu{block}_{i}")
        elif isinstance(m, nn.MaxPool2d):
            names.append(f"pool{block}")
            block, i = block + 1, 0
        else:
            names.append(f"{type(m).__name__.lower()}{block}_{i}")
    return names


def vgg_features(arch: str) -> nn.Sequential:
    """torchvision's VGG16/VGG19 `features` with its initialisation, built alone: building the whole VGG
    would also initialise its 120M-parameter classifier (2.5 s here) only to drop it."""
    from torchvision.models import vgg

    features = vgg.make_layers(vgg.cfgs[{"vgg16": "D", "vgg19": "E"}[arch]])
    for m in features:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return features


def load_vgg(arch: str, weights: str | None, random_init: bool = False) -> nn.Sequential:
    """torchvision's VGG16/VGG19 `features` (`model:`, conf/model/vgg_features.yaml): from `model.weights` (a
    local state dict, or `imagenet` for torchvision's download), or randomly initialised only when
    `model.random_init=true`."""
    arch = str(arch)
    if arch not in ("vgg16", "vgg19"):
        raise LabError(f"model.arch={arch} is not supported; use vgg16 or vgg19")
    if random_init:
        return vgg_features(arch)
    if not weights:
        raise LabError(f"no VGG weights: pass model.weights=PATH (a torchvision {arch} state dict) or "
                       "model.weights=imagenet, or model.random_init=true for an untrained network (tests only)")
    if str(weights) == "imagenet":
        import torchvision

        enum = {"vgg16": torchvision.models.VGG16_Weights, "vgg19": torchvision.models.VGG19_Weights}[arch]
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)
        try:
            return getattr(torchvision.models, arch)(weights=enum.IMAGENET1K_V1).features
        except Exception as e:  # noqa: BLE001 - offline: say what to do instead
            raise LabError(f"cannot get torchvision's ImageNet {arch} weights ({type(e).__name__}: "
                           f"{str(e)[:120]}); offline, pass model.weights=PATH to a local torchvision-format "
                           f"state dict (e.g. model.arch=vgg16 model.weights=.../vgg16_hed_features.pth)") from None
        finally:
            socket.setdefaulttimeout(previous)
    state = checkpoint.load_weights(str(weights))
    features = vgg_features(arch)
    if any(k.startswith("features.") for k in state):  # a whole VGG's state dict: keep its features
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    try:
        features.load_state_dict(state)
    except RuntimeError as e:
        raise LabError(f"model.weights={weights} does not fit torchvision's {arch} features "
                       f"({' '.join(str(e).split())[:200]}); check model.arch") from None
    return features


def gram(f: torch.Tensor) -> torch.Tensor:
    """Gram matrix of (1, C, H, W) features, divided by C*H*W (the PyTorch tutorial's normalisation)."""
    _, c, h, w = f.shape
    f = f.reshape(c, h * w).float()
    return f @ f.T / (c * h * w)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


class StepLBFGS(torch.optim.LBFGS):
    """L-BFGS doing one iteration per `step()`, on the gradient the trainer's backward left in `.grad`."""

    def __init__(self, params: Any, lr: float = 1.0, history_size: int = 100):
        super().__init__(params, lr=lr, max_iter=1, history_size=history_size, line_search_fn=None)
        self.loss = 0.0  # the loss of the gradient in .grad (used only in L-BFGS's convergence tests)

    def step(self, closure: Any = None) -> Any:  # noqa: ARG002 - the gradient is already there
        return super().step(lambda: self.loss)


class NeuralStyle(Task):
    main_metric = "eval/loss"
    main_mode = "min"
    single_process = "it optimises one image"

    def __init__(self, cfg: DictConfig, ctx: RunContext):
        super().__init__(cfg, ctx)
        s = cfg.style
        content = load_image(s.content, s.size, "content")
        style = load_image(s.style, max(content.shape[-2:]) if s.size else None, "style")
        features = build(cfg.model, "VGG features")
        names = layer_names(features)
        wanted = list(s.content_layers) + list(s.style_layers)
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise LabError(f"unknown VGG layer(s) {unknown}; {cfg.model.arch} has {', '.join(names)}")
        last = max(names.index(n) for n in wanted)
        if s.pool == "avg":  # Gatys et al. found average pooling gives slightly smoother results
            features = nn.Sequential(*[nn.AvgPool2d(2, 2) if isinstance(m, nn.MaxPool2d) else m for m in features])
        elif s.pool != "max":
            raise LabError(f"style.pool={s.pool} is not supported; use max or avg")
        for m in features:
            if isinstance(m, nn.ReLU):
                m.inplace = False  # a ReLU's output is a style layer and also the next conv's input
        self.vgg = features[: last + 1].requires_grad_(False).eval()
        self.taps = {names.index(n): n for n in wanted}
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.register_buffer("content_image", content)
        self.register_buffer("style_image", style)
        self.image = nn.Parameter(content[0].clone())  # (3, H, W): channels_last leaves it (and L-BFGS) alone
        self.lbfgs: StepLBFGS | None = None
        self.targets: dict[str, torch.Tensor] | None = None  # content features and style Grams, computed once
        self.initial: dict[str, float] = {}

    # ---- the VGG is frozen and comes from model.weights: keep it out of checkpoints ----------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if not k.startswith("vgg.")}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith("vgg.")]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"missing keys {missing}, unexpected keys {result.unexpected_keys}")
        return result

    # ---- losses -------------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out, h = {}, (x - self.mean) / self.std
        if self.vgg[0].weight.is_contiguous(memory_format=torch.channels_last):
            h = h.contiguous(memory_format=torch.channels_last)
        for i, layer in enumerate(self.vgg):
            h = layer(h)
            if i in self.taps:
                out[self.taps[i]] = h
        return out

    def losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        s = self.cfg.style
        if self.targets is None:
            with torch.no_grad():
                c, st = self.features(self.content_image), self.features(self.style_image)
                self.targets = {**{f"c:{n}": c[n].float() for n in s.content_layers},
                                **{f"s:{n}": gram(st[n]) for n in s.style_layers}}
        f = self.features(x)
        content = sum(F.mse_loss(f[n].float(), self.targets[f"c:{n}"]) for n in s.content_layers)
        style = sum(F.mse_loss(gram(f[n]), self.targets[f"s:{n}"]) for n in s.style_layers)
        tv = total_variation(x) if s.tv_weight else x.new_zeros(())
        loss = s.content_weight * content + s.style_weight * style + s.tv_weight * tv
        return {"loss": loss, "content_loss": content, "style_loss": style, "tv_loss": tv}

    # ---- trainer contract ---------------------------------------------------------------------------------
    def optimizers(self, total_steps: int | None) -> dict[str, Any]:
        """`optimizer:` over the image: StepLBFGS (optimizer=lbfgs) or any torch optimizer (optimizer=adam)."""
        opt = build_optimizer(self.cfg.optimizer, [self.image])
        if isinstance(opt, torch.optim.LBFGS) and not isinstance(opt, StepLBFGS):
            raise LabError("optimizer._target_=torch.optim.LBFGS needs a closure the trainer does not give; use "
                           "optimizer=lbfgs (generative.neural_style.StepLBFGS: one iteration per step)")
        self.lbfgs = opt if isinstance(opt, StepLBFGS) else None
        return {"image": opt}

    def train_data(self) -> Iterator[int]:
        return itertools.count()  # no data set: the budget is trainer.max_steps = style.steps

    def samples_in(self, batch: Any) -> int:
        return 1

    def training_step(self, batch: Any, optim: Any) -> dict[str, Any]:
        if self.cfg.style.clamp:  # keep pixels in [0, 1] as the PyTorch tutorial does before each evaluation
            with torch.no_grad():
                self.image.clamp_(0, 1)
        out = self.losses(self.image[None])
        if not self.initial:
            self.initial = {f"initial_{k}": v.item() for k, v in out.items()}
        if self.lbfgs is not None:
            self.lbfgs.loss = out["loss"].item()
        optim.step("image", out["loss"])
        return {k: v.detach() for k, v in out.items()}

    def evaluate(self) -> dict[str, float]:
        image = self.image.detach().clamp(0, 1)
        out = {k: v.item() for k, v in self.losses(image[None]).items()}
        self.ctx.logger.log_image("stylized", image)
        media.save_png(self.ctx.run_dir / "stylized.png", image)
        return {**out, **self.initial}

    def get_extra_state(self) -> dict[str, Any]:
        return {"initial": self.initial}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.initial = dict(state.get("initial", {}))
