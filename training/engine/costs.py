"""What a run costs, measured where it runs: the peak memory of its device and the time of the model's forward pass.

Peak memory: on CUDA the peak of tensor memory torch allocated (`torch.cuda.max_memory_allocated`, reset
when a run starts); on CPU the peak resident set of the process (Linux `VmHWM`, reset when a run starts
through /proc/self/clear_refs so a worker process reused for the next trial does not report the last
one's peak; where that reset is refused, the process's lifetime peak `ru_maxrss`). The CPU figure
includes the interpreter, torch and the data the process holds: compare it between trials, not with a GPU's.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn

CUDA, CPU_RSS = "cuda", "cpu_rss"


class PeakMemory:
    """The peak memory of one run on `device`, in MiB, from the moment it is created."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = CUDA if device.type == "cuda" else CPU_RSS
        if self.kind == CUDA:
            torch.cuda.reset_peak_memory_stats(device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS to the current RSS (Linux >= 4.0)
            except OSError:
                pass

    def peak_mb(self) -> float:
        if self.kind == CUDA:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
        except (OSError, AttributeError):  # no /proc: the process's lifetime peak (bytes on macOS, kB elsewhere)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class ForwardTimer:
    """Wall time of a module's forward passes and the images they saw, while the `with` block runs.

    Forward hooks time exactly the model (not data loading, resizing or the loss); on CUDA each
    pass is synchronised first and last, so the time is the kernels' and not their launch.
    """

    def __init__(self, module: nn.Module, device: torch.device):
        self.module, self.device = module, device
        self.seconds, self.images = 0.0, 0
        self._started = 0.0
        self._handles: list = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _before(self, module: nn.Module, args: tuple) -> None:
        self._sync()
        self._started = time.perf_counter()

    def _after(self, module: nn.Module, args: tuple, output) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._started
        self.images += int(args[0].shape[0])

    def __enter__(self) -> "ForwardTimer":
        self._handles = [self.module.register_forward_pre_hook(self._before), self.module.register_forward_hook(self._after)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    @property
    def ms_per_image(self) -> float:
        return 1000.0 * self.seconds / max(self.images, 1)
