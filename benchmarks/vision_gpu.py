"""ResNet-18 training throughput on CIFAR-sized input on one GPU: bf16 and torch.compile on and off.

    python benchmarks/vision_gpu.py [--batch-size 512] [--steps 200]

CIFAR-10 cannot be downloaded on the development machines, so this measures images per second of the
training step (forward, backward, SGD with Nesterov momentum) on random 32x32x3 batches already on the
GPU: the lab's resnet18 (3x3 stem), channels-last, for each of fp32 / bf16 autocast x eager / compiled.
Warm-up steps (compilation included) are not timed. Writes benchmarks/results/vision_gpu.json.
Needs CUDA; on a machine without it, it says so and records nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import record  # noqa: E402
from vision.resnet import resnet18  # noqa: E402


def throughput(precision: str, compile_: bool, batch_size: int, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = resnet18(3, 10, 32).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    step_model = torch.compile(model) if compile_ else model
    x = torch.randn(batch_size, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(step_model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=30)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device here: this benchmark needs a GPU (nothing recorded)")
    torch.backends.cudnn.benchmark = True
    results = {}
    for precision in ("32", "bf16"):
        for compile_ in (False, True):
            key = f"{'bf16' if precision == 'bf16' else 'fp32'}_{'compiled' if compile_ else 'eager'}"
            results[key] = round(throughput(precision, compile_, args.batch_size, args.steps, args.warmup), 1)
            print(f"{key}: {results[key]:,.0f} images/s", flush=True)
    record.write("vision_gpu", {"model": "resnet18 (3x3 stem), 32x32x3 random batches, channels-last",
                                "batch_size": args.batch_size, "timed_steps": args.steps,
                                "images_per_sec": results})


if __name__ == "__main__":
    main()
