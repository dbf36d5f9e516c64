"""What this machine offers a model: CPU cores (physical and usable by this process), CPU flags, memory and NVIDIA
GPUs with their free memory. Every probe degrades to "unknown/none" instead of failing: a missing ``/proc`` file or
``nvidia-smi`` never stops the service."""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True, slots=True)
class Gpu:
    """One NVIDIA GPU as the driver reports it."""

    index: int
    name: str
    memory_total_mb: int
    memory_free_mb: int
    compute_capability: float | None = None


@dataclass(frozen=True, slots=True)
class Hardware:
    """A snapshot of the machine's resources."""

    cpu_model: str
    logical_cores: int
    physical_cores: int
    usable_cores: int
    cpu_flags: frozenset[str]
    memory_total_mb: int
    memory_available_mb: int
    gpus: tuple[Gpu, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        data = asdict(self)
        data["cpu_flags"] = sorted(self.cpu_flags)
        data["gpus"] = [asdict(g) for g in self.gpus]
        return data


def parse_cpuinfo(text: str) -> tuple[str, int, frozenset[str]]:
    """Model name, physical core count and flags from ``/proc/cpuinfo`` text."""
    model = ""
    flags: frozenset[str] = frozenset()
    cores: set[tuple[str, str]] = set()
    physical_id = core_id = ""
    processors = 0
    for line in [*text.splitlines(), ""]:
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor":
            processors += 1
        elif key == "model name" and not model:
            model = value
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            core_id = value
        elif not line.strip():
            if core_id:
                cores.add((physical_id, core_id))
            physical_id = core_id = ""
    return model, len(cores) or processors, flags


def parse_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` line (``quota period``); None when unlimited."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    quota, period = int(parts[0]), int(parts[1])
    return quota / period if quota > 0 and period > 0 else None


def _cgroup_cpu_limit(root: Path = _CGROUP) -> float | None:
    try:
        return parse_cpu_max((root / "cpu.max").read_text())
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def _cgroup_memory_limit_mb(root: Path = _CGROUP) -> int | None:
    for name in ("memory.max", "memory/memory.limit_in_bytes"):
        try:
            value = (root / name).read_text().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 1 << 60:
            return int(value) // (1 << 20)
    return None


def parse_meminfo(text: str) -> tuple[int, int]:
    """Total and available memory in MiB from ``/proc/meminfo`` text."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[key] = int(fields[0]) // 1024
    total = values.get("MemTotal", 0)
    return total, values.get("MemAvailable", values.get("MemFree", total))


def parse_nvidia_smi(text: str) -> tuple[Gpu, ...]:
    """GPUs from ``nvidia-smi --query-gpu=index,name,memory.total,memory.free,compute_cap
    --format=csv,noheader,nounits`` output."""
    gpus = []
    for line in text.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 4:
            continue
        try:
            capability = float(cells[4]) if len(cells) > 4 and cells[4] not in ("", "[N/A]") else None
            gpus.append(Gpu(int(cells[0]), cells[1], int(float(cells[2])), int(float(cells[3])), capability))
        except ValueError:
            log.warning("unreadable nvidia-smi line: %s", line)
    return tuple(gpus)


def _gpus_from_nvml() -> tuple[Gpu, ...] | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver: NVML raises its own error types
        return None
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(
                Gpu(
                    index,
                    name.decode() if isinstance(name, bytes) else str(name),
                    int(memory.total) >> 20,
                    int(memory.free) >> 20,
                    float(f"{major}.{minor}"),
                )
            )
        return tuple(gpus)
    finally:
        pynvml.nvmlShutdown()


def _gpus_from_smi() -> tuple[Gpu, ...]:
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return ()
    query = "--query-gpu=index,name,memory.total,memory.free,compute_cap"
    try:
        out = subprocess.run(
            [binary, query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=15, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed, assuming no NVIDIA GPU: %s", exc)
        return ()
    return parse_nvidia_smi(out)


def probe_gpus() -> tuple[Gpu, ...]:
    """NVIDIA GPUs visible to this process, through NVML when importable, else ``nvidia-smi``; () when neither."""
    gpus = _gpus_from_nvml()
    if gpus is None:
        gpus = _gpus_from_smi()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() not in ("", "all"):
        wanted = {v.strip() for v in visible.split(",")}
        gpus = tuple(g for g in gpus if str(g.index) in wanted)
    elif visible is not None and visible.strip() == "":
        gpus = ()
    return gpus


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def usable_cores() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (rounded up), at least 1."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 1
    quota = _cgroup_cpu_limit()
    if quota is not None:
        usable = min(usable, max(1, math.ceil(quota)))
    return max(1, usable)


def probe() -> Hardware:
    """The machine as this process sees it."""
    model, physical, flags = parse_cpuinfo(_read("/proc/cpuinfo"))
    logical = os.cpu_count() or 1
    total, available = parse_meminfo(_read("/proc/meminfo"))
    limit = _cgroup_memory_limit_mb()
    if limit is not None:
        total, available = min(total, limit), min(available, limit)
    return Hardware(
        cpu_model=model or "unknown",
        logical_cores=logical,
        physical_cores=min(physical or logical, logical),
        usable_cores=usable_cores(),
        cpu_flags=flags,
        memory_total_mb=total,
        memory_available_mb=available,
        gpus=probe_gpus(),
    )
