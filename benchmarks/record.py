"""The record every benchmark writes with its figures: when, on what machine, under what load, by which
command; and the one writer of benchmark JSON (atomic, NaN allowed for a timing that did not happen).

    record = BenchmarkRecord()           # at the start: notes the 1-minute load average
    ...                                  # the measurement
    record.write(out, figures)           # figures + {"date", "machine", "load_average_1m": [start, end], ...}

A speed claim compares paths timed in one run; the load average says whether the machine was shared meanwhile
(benchmarks/RESULTS.md rows quote it).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from rayblora.manifest import write_json_atomic


def machine(device: str = "cpu") -> str:
    """One line naming the hardware the figures come from (the GPU's name on a CUDA device)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}"


class BenchmarkRecord:
    """Started when a benchmark starts; `meta()` / `write()` add the context every result must carry."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.started = time.time()
        self.load_start = os.getloadavg()[0]

    def meta(self) -> dict[str, Any]:
        """Date, machine, 1-minute load average at start and now, the command line, wall seconds so far."""
        return {"date": time.strftime("%Y-%m-%d"), "machine": machine(self.device),
                "load_average_1m": [round(self.load_start, 2), round(os.getloadavg()[0], 2)],
                "command": " ".join(["python", *sys.argv]), "wall_s": round(time.time() - self.started, 1)}

    def write(self, path: str | os.PathLike, figures: dict[str, Any]) -> dict[str, Any]:
        """Write `figures` with :meth:`meta` (its keys first) to `path` as JSON, atomically; returns the record."""
        result = {**self.meta(), **figures}
        write_json_atomic(Path(path), result, allow_nan=True)
        return result
