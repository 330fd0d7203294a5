"""How many requests an engine holds: the KV budget.

The engine keeps one contiguous KV region per request row (`max_context`
positions each) plus the lattice's speculative slots, in every layer. With
`max_batch` left to auto (0), the batch is the number of full-context rows
the KV budget holds, capped where more rows stop paying on the device (a
CPU's cores are busy long before; a GPU keeps gaining up to a few dozen).
The budget is `kv_memory_gib` when given, otherwise a share of the memory
free on the device once the weights are in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dexserve.engine.config import AUTO_BATCH_CAP, FREE_SHARE
from dexserve.engine.model import ModelDims

GIB = 1 << 30


@dataclass(frozen=True)
class KvBudget:
    budget_bytes: int            # what the KV may take
    per_request_bytes: int       # one full-context request row, all layers
    max_batch: int               # requests that fit (before the cap)
    cap: int
    source: str                  # "--kv-memory" or how auto measured it

    @property
    def batch(self) -> int:
        return min(self.max_batch, self.cap)

    def describe(self) -> str:
        return (f"KV budget {self.budget_bytes / GIB:.2f} GiB ({self.source}), "
                f"{self.per_request_bytes / (1 << 20):.1f} MiB per full-context request")


def kv_bytes_per_position(dims: ModelDims, dtype: torch.dtype) -> int:
    """Keys and values of one position in every layer."""
    return 2 * dims.layers * dims.kv_heads * dims.head_dim * torch.empty((), dtype=dtype).element_size()


def weight_bytes(model_dir: Path, checkpoint_dtype: str | None, dtype: torch.dtype) -> int:
    """The weights' size in `dtype`, from the checkpoint's safetensors files."""
    on_disk = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    stored = getattr(torch, checkpoint_dtype) if checkpoint_dtype in ("float32", "bfloat16", "float16") \
        else torch.float32
    return on_disk * torch.empty((), dtype=dtype).element_size() // torch.empty((), dtype=stored).element_size()


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def host_available() -> tuple[int, str]:
    """Bytes this process may still take on the host: the kernel's MemAvailable, or less
    where a cgroup (a container's memory limit) leaves less."""
    meminfo = _read("/proc/meminfo")
    if meminfo:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo.splitlines() if ":" in line}
        avail, where = info.get("MemAvailable", info.get("MemFree", 0)), "MemAvailable"
    else:   # no /proc (a chroot): physical pages the C library reports available
        avail, where = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available pages"
    limit, usage = _read("/sys/fs/cgroup/memory.max"), _read("/sys/fs/cgroup/memory.current")
    if limit and usage and limit.strip().isdigit():
        left = int(limit) - int(usage)
        if left < avail:
            avail, where = left, "the cgroup memory limit"
    return max(0, avail), where


def host_cores() -> int:
    """Cores this process may run on: its CPU affinity, or fewer where a cgroup quota (a container's
    CPU limit, `cpu.max`) allows less than that many cores' worth of time."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = (_read("/sys/fs/cgroup/cpu.max") or "").split()
    if len(quota) == 2 and quota[0].isdigit() and quota[1].isdigit() and int(quota[1]) > 0:
        cores = min(cores, max(1, int(quota[0]) // int(quota[1])))
    return max(1, cores)


SHM_DIR = "/dev/shm"   # where explorer processes on one host share tensors and semaphores


def parallel_devices(device: str) -> int:
    """How many devices explorers could spread over: the visible GPUs for `cuda` (one for a
    numbered `cuda:N`), the usable cores on CPU, or one core where there is no writable
    shared memory for explorer processes to meet in (a bare chroot)."""
    if device.startswith("cuda"):
        return torch.cuda.device_count() if torch.device(device).index is None else 1
    return host_cores() if os.access(SHM_DIR, os.W_OK | os.X_OK) else 1


def free_memory(device: str) -> tuple[int, str]:
    """Bytes free on `device` now, and where that figure comes from."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch sees no CUDA device here")
        # an index, not torch.device("cuda"): torch < 2.5 rejects a device without one
        index = torch.device(device).index
        free, _ = torch.cuda.mem_get_info(torch.cuda.current_device() if index is None else index)
        return free, f"{device} free memory"
    return host_available()


def kv_budget(dims: ModelDims, dtype: torch.dtype, device: str, max_context: int, weights: int,
              kv_memory_gib: float | None, slots: int) -> KvBudget:
    """The batch the KV budget holds at `max_context` positions per request.
    `slots`: the lattice's speculative rows (also KV rows, whatever the batch)."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    per_pos = kv_bytes_per_position(dims, dtype)
    if kv_memory_gib is not None:
        if not kv_memory_gib > 0:
            raise ValueError(f"kv_memory must be a positive number of GiB, got {kv_memory_gib}")
        budget, source = int(kv_memory_gib * GIB), "--kv-memory"
    else:
        free, where = free_memory(device)
        budget = int(FREE_SHARE[kind] * (free - weights))
        source = f"auto: {FREE_SHARE[kind]:.0%} of {where} less the weights"
    per_request = per_pos * max_context
    fits = max(0, (budget - per_pos * slots) // per_request)
    return KvBudget(budget, per_request, int(fits), AUTO_BATCH_CAP[kind], source)
