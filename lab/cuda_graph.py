"""One training step replayed as a CUDA graph: for small networks whose GPU work is shorter than the
host's time to issue it. One eager Nature-DQN update took 4.6 ms of host time on the CPU of an H200
machine at any batch size from 32 to 512, and the GPU sat idle most of it
(benchmarks/results/dqn_gpu_parts.json); a graph replays all of its kernels with one launch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lab.errors import LabError


class GraphedStep:
    """`fn()` captured once as a CUDA graph and replayed by every call; on any other device it just runs.

    `fn` takes no arguments: it reads its inputs from tensors that keep their storage between calls
    (fill them in place before a call) and must not wait for the GPU (no `.item()`, `.cpu()`, boolean
    masks). What it returns is rewritten by the next replay: clone what must outlive it. On CUDA the
    first call runs `fn` `warmup` times on a side stream, as capture requires (each run does its work:
    an optimizer step steps), then captures it and replays it once. A capture that fails ends in one
    `LabError` naming `what` was captured and the `fix` (how to run without graphs)."""

    def __init__(self, fn: Callable[[], Any], device: torch.device, warmup: int = 3, what: str = "a step",
                 fix: str = "run it without CUDA graphs"):
        self.fn, self.device, self.warmup, self.what, self.fix = fn, device, warmup, what, fix
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Any = None

    @property
    def warmup_runs(self) -> int:
        """How many times the capture ran `fn` before replaying it (0 until captured, and off CUDA)."""
        return self.warmup if self.graph is not None else 0

    def __call__(self) -> Any:
        if self.device.type != "cuda":
            return self.fn()
        if self.graph is None:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.out = self.fn()
            except Exception as e:  # noqa: BLE001 - torch's capture errors are long; say what failed and the way out
                detail = " ".join(str(e).split())[:400]
                raise LabError(f"capturing {self.what} as a CUDA graph failed ({type(e).__name__}: {detail}); "
                               f"{self.fix}") from None
            self.graph = graph
        self.graph.replay()
        return self.out
