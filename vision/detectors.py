"""Detectors from torchvision (`models.detection`) on a backbone from the lab's vision zoo.

    faster_rcnn(...)   two stages: a region-proposal network, then RoIAlign and a box head (Ren et al., 2015)
    fcos(...)          one stage, anchor-free: per-location class, box and centre-ness (Tian et al., 2019)
    retinanet(...)     one stage, anchors and the focal loss (Lin et al., 2017)

Each is the `_target_` of a model config (conf/model/faster_rcnn.yaml, fcos.yaml, retinanet.yaml). The
backbone is any lab classifier whose layers run in sequence (`model.backbone`: vision.resnet.resnet18/34/50,
vision.vgg.VGG, vision.deep_cnn.DeepCNN): its head is dropped and the feature maps at `model.levels` (their
strides, e.g. [8, 16, 32]) feed a feature pyramid (`model.fpn_channels`; null: one level, no pyramid).
`model.weights=PATH` loads the backbone from a lab classifier's checkpoint (its best.pt or last.pt) or a
torchvision-format state dict, as vision/transfer.py does for classifiers; `model.freeze=true` trains the
detector's heads only, `model.freeze=S` (a stride) freezes the backbone's layers up to its stride-S maps.
Labels are 0-based class indices everywhere in the lab; Faster R-CNN reserves 0 for the background, so
`Detector` shifts its labels by one on the way in and out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.resnet import ResNet
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from lab.config import build
from lab.errors import LabError
from vision import transfer
from vision.resnet import CifarResNet


def _layers(model: nn.Module) -> list[nn.Module]:
    """The classifier's feature layers in the order its forward runs them (its head and global pool left out)."""
    if isinstance(model, ResNet):
        return [model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3,
                model.layer4]
    if isinstance(model, CifarResNet):
        return [model.conv1, model.bn1, nn.ReLU(inplace=True), model.layer1, model.layer2, model.layer3]
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        return [m for m in features if not isinstance(m, (nn.Flatten, nn.Identity))]
    raise LabError(f"model.backbone {type(model).__name__} does not run its layers in sequence; use "
                   "vision.resnet.resnet18/20/34/50/56, vision.vgg.VGG or vision.deep_cnn.DeepCNN")


class Body(nn.Module):
    """The backbone's layers, returning {"0": map at the first level, "1": ...} (one level: the map itself).
    Its first `frozen` layers keep their BatchNorm statistics as loaded."""

    def __init__(self, layers: list[nn.Module], returns: list[int], single: bool, frozen: int = 0):
        super().__init__()
        self.layers = nn.ModuleList(layers[: max(returns) + 1])
        self.returns, self.single, self.frozen = returns, single, frozen

    def train(self, mode: bool = True) -> Body:
        super().train(mode)
        for layer in self.layers[: self.frozen]:
            for m in layer.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        out = {}
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.returns:
                out[str(self.returns.index(i))] = x
        return out["0"] if self.single else out


class Pyramid(nn.Module):
    """A body's maps through torchvision's feature pyramid network (as its `BackboneWithFPN`)."""

    def __init__(self, body: Body, channels: list[int], out_channels: int, extra_pool: bool):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(channels, out_channels, LastLevelMaxPool() if extra_pool else None)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def make_body(spec: Any, in_channels: int, image_size: int, levels: Sequence[int], weights: str | None = None,
              freeze: bool | int = False, single: bool = False) -> tuple[Body, list[int]]:
    """A lab classifier cut into a `Body` returning its maps at the strides `levels`, and their channels."""
    spec = OmegaConf.create(OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else spec)
    classifier = build(spec, "model.backbone", in_channels=in_channels, num_classes=10, image_size=image_size)
    if weights:
        loaded = transfer.load_pretrained(classifier, str(weights))
        print(f"[lab] backbone: loaded {len(loaded)} tensors from {weights}", flush=True)
    layers = _layers(classifier.eval())
    strides, channels, x = [], [], torch.zeros(1, in_channels, image_size, image_size)
    with torch.no_grad():
        for layer in layers:
            x = layer(x)
            strides.append(image_size // x.shape[-1])
            channels.append(x.shape[1])
    classifier.train()
    levels = [int(v) for v in levels]
    if not levels or sorted(set(levels)) != levels or any(s not in strides for s in levels):
        raise LabError(f"model.levels={levels} must be increasing strides the backbone has: "
                       f"{sorted(set(strides))} (at {image_size} px)")
    returns = [max(i for i, s in enumerate(strides) if s == level) for level in levels]
    frozen = _frozen(freeze, strides, len(layers))
    for layer in layers[:frozen]:
        for p in layer.parameters():
            p.requires_grad_(False)
    return Body(layers, returns, single=single, frozen=frozen), [channels[i] for i in returns]


def make_backbone(spec: Any, in_channels: int, image_size: int, levels: Sequence[int], fpn_channels: int | None,
                  weights: str | None = None, freeze: bool | int = False, extra_pool: bool = False) -> nn.Module:
    """A lab classifier cut into a detection backbone with `out_channels`: its maps at the strides `levels`,
    through a feature pyramid of `fpn_channels` (plus a max-pooled level with `extra_pool`)."""
    if fpn_channels is None and (len(levels) > 1 or extra_pool):
        raise LabError(f"model.levels={list(levels)} (or model.extra_pool) needs a feature pyramid: set "
                       "model.fpn_channels (e.g. 64), or keep one level")
    body, channels = make_body(spec, in_channels, image_size, levels, weights, freeze, single=fpn_channels is None)
    if fpn_channels is None:
        body.out_channels = channels[0]
        return body
    return Pyramid(body, channels, int(fpn_channels), extra_pool)


def _frozen(freeze: bool | int, strides: list[int], n: int) -> int:
    """How many leading layers `model.freeze` freezes: true all, false none, a stride S the layers whose maps
    are at stride S or finer (freeze=4 on a ResNet: its stem and layer1; freeze=8 on VGG16: up to conv4_3)."""
    if isinstance(freeze, bool) or freeze is None:
        return n if freeze else 0
    if int(freeze) not in strides:
        raise LabError(f"model.freeze={freeze}: give true, false or a stride the backbone has "
                       f"({sorted(set(strides))}): the layers up to that stride are frozen")
    return max(i for i, s in enumerate(strides) if s == int(freeze)) + 1


def _maps(levels: Sequence[int], extra_pool: bool) -> int:
    return len(levels) + int(extra_pool)


def _anchors(sizes: Sequence[Sequence[int]], ratios: Sequence[float], maps: int) -> AnchorGenerator:
    if len(sizes) != maps:
        raise LabError(f"model.anchor_sizes has {len(sizes)} entries, the backbone {maps} feature maps: give one "
                       "list of sizes per map (model.levels, plus one with model.extra_pool)")
    return AnchorGenerator(tuple(tuple(int(v) for v in s) for s in sizes), (tuple(float(r) for r in ratios),) * maps)


def _normalisation(mean: Sequence[float] | None, std: Sequence[float] | None, c: int) -> tuple[list, list]:
    mean, std = list(mean or [0.5] * c), list(std or [0.5] * c)
    if len(mean) != c or len(std) != c:
        raise LabError(f"model.image_mean={mean} and model.image_std={std} need {c} values (one per channel)")
    return mean, std


class Detector(nn.Module):
    """A torchvision detector with the lab's 0-based labels: `forward(images, targets)` returns the losses in
    training and the detections in eval mode, as torchvision's do."""

    def __init__(self, net: nn.Module, background: bool):
        super().__init__()
        self.net, self.shift = net, int(background)

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        if targets is not None and self.shift:
            targets = [{**t, "labels": t["labels"] + self.shift} for t in targets]
        out = self.net(images, targets)
        if self.training or not self.shift:
            return out
        return [{**d, "labels": d["labels"] - self.shift} for d in out]


def faster_rcnn(num_classes: int, in_channels: int, backbone: Any, image_size: int = 128,
                levels: Sequence[int] = (8, 16, 32), fpn_channels: int | None = 64, extra_pool: bool = False,
                weights: str | None = None, freeze: bool | int = False,
                anchor_sizes: Sequence[Sequence[int]] = ((16,), (32,), (64,)),
                aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), min_size: int = 128, max_size: int = 128,
                image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None,
                rpn_pre_nms_top_n_train: int = 600, rpn_post_nms_top_n_train: int = 300,
                rpn_pre_nms_top_n_test: int = 300, rpn_post_nms_top_n_test: int = 150, rpn_nms_thresh: float = 0.7,
                rpn_batch_size_per_image: int = 128, roi_output_size: int = 7, representation_size: int = 256,
                box_batch_size_per_image: int = 128, box_score_thresh: float = 0.05, box_nms_thresh: float = 0.5,
                box_detections_per_img: int = 100) -> Detector:
    """Faster R-CNN (torchvision) on a lab backbone, sized for small images on a CPU."""
    body = make_backbone(backbone, in_channels, image_size, levels, fpn_channels, weights, freeze, extra_pool)
    maps = _maps(levels, extra_pool)
    mean, std = _normalisation(image_mean, image_std, in_channels)
    names = [str(i) for i in range(len(levels))]
    net = FasterRCNN(
        body, num_classes=None, min_size=min_size, max_size=max_size, image_mean=mean, image_std=std,
        rpn_anchor_generator=_anchors(anchor_sizes, aspect_ratios, maps),
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        rpn_nms_thresh=rpn_nms_thresh, rpn_batch_size_per_image=rpn_batch_size_per_image,
        box_roi_pool=MultiScaleRoIAlign(names, roi_output_size, sampling_ratio=2),
        box_head=TwoMLPHead(body.out_channels * roi_output_size**2, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
        box_score_thresh=box_score_thresh, box_nms_thresh=box_nms_thresh,
        box_detections_per_img=box_detections_per_img, box_batch_size_per_image=box_batch_size_per_image)
    return Detector(net, background=True)


def fcos(num_classes: int, in_channels: int, backbone: Any, image_size: int = 128,
         levels: Sequence[int] = (8, 16, 32), fpn_channels: int = 64, extra_pool: bool = False,
         weights: str | None = None, freeze: bool | int = False, anchor_sizes: Sequence[Sequence[int]] | None = None,
         head_convs: int = 2, min_size: int = 128, max_size: int = 128, image_mean: Sequence[float] | None = None,
         image_std: Sequence[float] | None = None, center_sampling_radius: float = 1.5, score_thresh: float = 0.05,
         nms_thresh: float = 0.6, detections_per_img: int = 100, topk_candidates: int = 1000) -> Detector:
    """FCOS (torchvision) on a lab backbone; its "anchor" per map is one size (default: the map's stride), from
    which FCOS sets the range of box sizes that map learns."""
    if not fpn_channels:
        raise LabError("model=fcos needs a feature pyramid: set model.fpn_channels (e.g. 64)")
    body = make_backbone(backbone, in_channels, image_size, levels, fpn_channels, weights, freeze, extra_pool)
    maps = _maps(levels, extra_pool)
    sizes = anchor_sizes or [[s] for s in [*levels, *([2 * levels[-1]] if extra_pool else [])]]
    mean, std = _normalisation(image_mean, image_std, in_channels)
    net = FCOS(body, num_classes, min_size=min_size, max_size=max_size, image_mean=mean, image_std=std,
               anchor_generator=_anchors(sizes, [1.0], maps),
               head=FCOSHead(body.out_channels, 1, num_classes, num_convs=head_convs),
               center_sampling_radius=center_sampling_radius, score_thresh=score_thresh, nms_thresh=nms_thresh,
               detections_per_img=detections_per_img, topk_candidates=topk_candidates)
    return Detector(net, background=False)


def retinanet(num_classes: int, in_channels: int, backbone: Any, image_size: int = 128,
              levels: Sequence[int] = (8, 16, 32), fpn_channels: int = 64, extra_pool: bool = False,
              weights: str | None = None, freeze: bool | int = False,
              anchor_sizes: Sequence[Sequence[int]] = ((16, 20, 25), (32, 40, 50), (64, 80, 101)),
              aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), min_size: int = 128, max_size: int = 128,
              image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None,
              score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
              topk_candidates: int = 1000) -> Detector:
    """RetinaNet (torchvision) on a lab backbone."""
    if not fpn_channels:
        raise LabError("model=retinanet needs a feature pyramid: set model.fpn_channels (e.g. 64)")
    body = make_backbone(backbone, in_channels, image_size, levels, fpn_channels, weights, freeze, extra_pool)
    maps = _maps(levels, extra_pool)
    anchors = _anchors(anchor_sizes, aspect_ratios, maps)
    mean, std = _normalisation(image_mean, image_std, in_channels)
    net = RetinaNet(body, num_classes, min_size=min_size, max_size=max_size, image_mean=mean, image_std=std,
                    anchor_generator=anchors,
                    head=RetinaNetHead(body.out_channels, anchors.num_anchors_per_location()[0], num_classes),
                    score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                    topk_candidates=topk_candidates)
    return Detector(net, background=False)
