"""Neural style at 256 px, 300 L-BFGS iterations on this machine: the lab versus the PyTorch tutorial's way.

    python benchmarks/neural_style.py [--steps 300] [--size 256] [--weights PATH] [--arch vgg16]

1. The lab: `python -m lab +experiment=neural_style` (bf16 autocast, channels-last, a VGG cut
   after its last loss layer, targets computed once, one L-BFGS iteration per trainer step),
   and the same at `trainer.precision=32 trainer.channels_last=false`.
2. The tutorial ("Neural Transfer Using PyTorch", pytorch.org): loss modules inserted into a copy
   of the VGG and cut after the last one, fp32, `LBFGS([img]).step(closure)` with the tutorial's
   default max_iter=20, the image clamped to [0, 1] in every closure, stopped after `steps` closure
   evaluations.

Same content and style images (chelsea, scream), size, layers (content relu4_2; style relu1_1,
relu2_1, relu3_1, relu4_1, relu5_1), weights (content 1, style 1e6) and VGG weights (the HED
VGG16 in ../shared/data: a VGG16 fine-tuned for edge detection, not ImageNet). Times count the
optimisation only; the final loss of each result (its saved 8-bit image) is measured with the same
fp32 tutorial model. Writes benchmarks/results/neural_style.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


import record  # noqa: E402
from generative.neural_style import IMAGENET_MEAN, IMAGENET_STD, layer_names, load_image, load_vgg  # noqa: E402

CONTENT_LAYERS = ["relu4_2"]
STYLE_LAYERS = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]


# ---- the PyTorch tutorial's implementation --------------------------------------------------------------
class ContentLoss(nn.Module):
    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target = target.detach()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self.loss = F.mse_loss(input, self.target)
        return input


def gram_matrix(input: torch.Tensor) -> torch.Tensor:
    a, b, c, d = input.size()
    features = input.view(a * b, c * d)
    G = torch.mm(features, features.t())
    return G.div(a * b * c * d)


class StyleLoss(nn.Module):
    def __init__(self, target_feature: torch.Tensor):
        super().__init__()
        self.target = gram_matrix(target_feature).detach()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        G = gram_matrix(input)
        self.loss = F.mse_loss(G, self.target)
        return input


class Normalization(nn.Module):
    def __init__(self, mean: tuple, std: tuple):
        super().__init__()
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return (img - self.mean) / self.std


def get_style_model_and_losses(cnn: nn.Sequential, style_img: torch.Tensor, content_img: torch.Tensor):
    """The tutorial's model builder, with Gatys' layer names (relu4_2, ...) instead of its conv_4, and the
    targets computed by the VGG layers alone (the tutorial's images are square and equal in size)."""
    model = nn.Sequential(Normalization(IMAGENET_MEAN, IMAGENET_STD))
    plain = nn.Sequential(model[0])  # targets from the layers alone: the style image has another shape
    content_losses, style_losses = [], []
    for layer, name in zip(cnn.children(), layer_names(cnn)):
        if isinstance(layer, nn.ReLU):
            layer = nn.ReLU(inplace=False)
        model.add_module(name, layer)
        plain.add_module(name, layer)
        if name in CONTENT_LAYERS:
            target = plain(content_img).detach()
            content_loss = ContentLoss(target)
            model.add_module(f"content_loss_{name}", content_loss)
            content_losses.append(content_loss)
        if name in STYLE_LAYERS:
            target_feature = plain(style_img).detach()
            style_loss = StyleLoss(target_feature)
            model.add_module(f"style_loss_{name}", style_loss)
            style_losses.append(style_loss)
    for i in range(len(model) - 1, -1, -1):  # cut after the last loss layer
        if isinstance(model[i], (ContentLoss, StyleLoss)):
            break
    return model[: i + 1], style_losses, content_losses


def run_style_transfer(cnn, content_img, style_img, input_img, num_steps, style_weight=1e6, content_weight=1):
    model, style_losses, content_losses = get_style_model_and_losses(cnn, style_img, content_img)
    input_img.requires_grad_(True)
    model.eval()
    model.requires_grad_(False)
    optimizer = torch.optim.LBFGS([input_img])
    run = [0]
    while run[0] < num_steps:  # the tutorial has <=, which runs one more step() of 20 evaluations

        def closure():
            with torch.no_grad():
                input_img.clamp_(0, 1)
            optimizer.zero_grad()
            model(input_img)
            style_score = sum(sl.loss for sl in style_losses) * style_weight
            content_score = sum(cl.loss for cl in content_losses) * content_weight
            loss = style_score + content_score
            loss.backward()
            run[0] += 1
            return style_score + content_score

        optimizer.step(closure)
    with torch.no_grad():
        input_img.clamp_(0, 1)
    return input_img, run[0]


def fp32_loss(cnn: nn.Sequential, content: torch.Tensor, style: torch.Tensor, image: torch.Tensor) -> float:
    model, style_losses, content_losses = get_style_model_and_losses(cnn, style, content)
    with torch.no_grad():
        model(image)
    return float(sum(s.loss for s in style_losses) * 1e6 + sum(c.loss for c in content_losses))


def lab_run(args, extra: list[str], name: str) -> tuple[dict, torch.Tensor]:
    run_dir = REPO / "outputs" / "benchmarks" / f"neural_style_{name}"  # kept: stylized.png and the progression
    shutil.rmtree(run_dir, ignore_errors=True)
    images = args.data / "images"
    cmd = ["+experiment=neural_style", "logger=none", "trainer.progress=false",
           f"style.content={images / 'chelsea.png'}", f"style.style={images / 'scream.jpg'}",
           f"style.size={args.size}", f"style.steps={args.steps}", f"model.arch={args.arch}",
           f"model.weights={args.weights}", *extra]
    rows, wall = record.run_lab(cmd, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    eval_s = sum(r.get("perf/eval_seconds", 0) for r in rows)
    out = load_image(run_dir / "stylized.png", None, "content")
    optimise_s = summary["elapsed_s"] - eval_s
    return {"command": " ".join(["-m", "lab", *cmd]), "optimisation_seconds": round(optimise_s, 1),
            "seconds_per_iteration": round(optimise_s / args.steps, 4), "process_wall_s": round(wall, 1),
            "run_dir": str(run_dir.relative_to(REPO)), "initial_loss_logged": summary["eval/initial_loss"],
            "final_loss_logged": summary["eval/loss"]}, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--arch", default="vgg16")
    ap.add_argument("--weights", type=Path, default=None, help="default: <data root>/weights/vgg16_hed_features.pth")
    args = ap.parse_args()
    args.data = Path(os.environ.get("LAB_DATA_DIR") or REPO.parent / "shared" / "data")
    args.weights = args.weights or args.data / "weights" / "vgg16_hed_features.pth"
    content = load_image(args.data / "images" / "chelsea.png", args.size, "content")
    style = load_image(args.data / "images" / "scream.jpg", max(content.shape[-2:]), "style")
    cnn = load_vgg(args.arch, str(args.weights)).eval()

    lab, lab_img = lab_run(args, [], "bf16")
    print(f"lab bf16: {lab}", flush=True)
    lab32, lab32_img = lab_run(args, ["trainer.precision=32", "trainer.channels_last=false"], "fp32")
    print(f"lab fp32: {lab32}", flush=True)

    t0 = time.perf_counter()
    out, evaluations = run_style_transfer(cnn, content, style, content.clone(), args.steps)
    tutorial_s = time.perf_counter() - t0
    tutorial_img = torch.from_numpy(np.round(out.detach().numpy() * 255) / 255).float()  # 8-bit, like the PNGs
    tutorial = {"optimisation_seconds": round(tutorial_s, 1), "closure_evaluations": evaluations,
                "seconds_per_iteration": round(tutorial_s / evaluations, 4)}
    print(f"tutorial: {tutorial}", flush=True)

    initial = fp32_loss(cnn, content, style, content)
    for entry, image in ((lab, lab_img), (lab32, lab32_img), (tutorial, tutorial_img)):
        entry["final_loss_fp32"] = round(fp32_loss(cnn, content, style, image), 2)
    figures = {
        "content": "chelsea.png", "style": "scream.jpg", "size": list(content.shape[-2:]), "steps": args.steps,
        "weights": f"{args.arch} {args.weights.name} (HED: VGG16 fine-tuned for edge detection, not ImageNet)",
        "initial_loss_fp32": round(initial, 2),
        "lab_bf16": lab, "lab_fp32": lab32, "pytorch_tutorial": tutorial,
        "speedup_lab_bf16_vs_tutorial": round(tutorial["seconds_per_iteration"] / lab["seconds_per_iteration"], 2),
        "speedup_lab_fp32_vs_tutorial": round(tutorial["seconds_per_iteration"] / lab32["seconds_per_iteration"], 2),
    }
    print(json.dumps({k: v for k, v in figures.items() if k.startswith("speedup")}))
    record.write("neural_style", figures)


if __name__ == "__main__":
    main()
