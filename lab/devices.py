"""Devices and precision: which device a run uses, which precision runs fast there, and autocast."""

from __future__ import annotations

import contextlib
import re

import torch

from lab.errors import LabError

PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_SPEC = r"auto|cpu|mps|cuda(:\d+)?"


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 runs at hardware speed here: a CUDA GPU with bf16, or a CPU with oneDNN bf16 kernels
    (AVX512/AVX512-BF16/AMX). On an AVX2-only CPU bf16 is emulated and several times slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(spec: object, device: torch.device) -> str:
    """`auto` is bf16 where the device runs it natively, else 32; an explicit bf16 on a CPU that only
    emulates it runs as asked, with a one-line warning."""
    spec = str(spec)
    if spec not in (*PRECISIONS, "auto"):
        raise LabError(f"trainer.precision={spec!r} is not supported; use one of auto, 32, bf16, fp16")
    if spec == "auto":
        spec = "bf16" if native_bf16(device) else "32"
        print(f"[lab] trainer.precision=auto: {spec} on {device}", flush=True)
    elif spec == "bf16" and device.type == "cpu" and not native_bf16(device):
        print(f"[lab] warning: trainer.precision=bf16 on a CPU without bf16 kernels "
              f"({torch.backends.cpu.get_cpu_capability()}): emulated, several times slower than float32; "
              "trainer.precision=auto picks the fast one", flush=True)
    return spec


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA (this process's local rank), then MPS, then CPU; explicit choices are checked."""
    spec = str(spec)
    if not re.fullmatch(DEVICE_SPEC, spec):
        raise LabError(f"trainer.device={spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LabError(f"trainer.device={spec} but no CUDA device is visible; use trainer.device=auto or cpu")
        index = int(spec.split(":")[1]) if ":" in spec else local_rank
        if index >= torch.cuda.device_count():
            raise LabError(f"trainer.device={spec}: only {torch.cuda.device_count()} CUDA device(s) here")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if spec == "mps" and not mps:
        raise LabError("trainer.device=mps but MPS is not available; use trainer.device=auto or cpu")
    return torch.device(spec)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to the run's precision on `device` (a no-op context for 32)."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
