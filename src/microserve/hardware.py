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
_SELF_CGROUP = Path("/proc/self/cgroup")


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
    # CPUs the cgroup CPU quota allows (cpu.max), None when unlimited; usable_cores is already capped by it.
    cpu_quota: float | None = None

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


def parse_self_cgroup(text: str) -> dict[str, str]:
    """This process's cgroup path per controller from ``/proc/self/cgroup`` text; ``""`` is the v2 hierarchy."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    return paths


def _up_from(base: Path, path: str) -> list[Path]:
    """``base``/``path`` and each of its ancestors up to ``base``, the existing ones, innermost first. A container
    that mounts its own cgroup at ``base`` while the path names it from the host finds its files at ``base``."""
    parts = [p for p in path.strip("/").split("/") if p and p != ".."]
    candidates = [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return [c for c in candidates if c.is_dir()]


def _read_quota_v1(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(root: Path | None = None, self_cgroup: str | None = None) -> float | None:
    """CPUs the cgroup CPU quota allows this process, the tightest along its cgroup's path (a parent's quota
    binds its children too): cgroup v2 ``cpu.max`` (pure or hybrid hierarchy), else v1 ``cpu.cfs_quota_us``.
    None when no quota applies. ``root`` is the cgroup mount and ``self_cgroup`` ``/proc/self/cgroup`` text (both
    this machine's when None)."""
    root = _CGROUP if root is None else root
    if self_cgroup is None:
        try:
            self_cgroup = _SELF_CGROUP.read_text()
        except OSError:
            self_cgroup = ""
    paths = parse_self_cgroup(self_cgroup)
    limits: list[float] = []
    for base in (root, root / "unified"):
        for directory in _up_from(base, paths.get("", "/")):
            try:
                quota = parse_cpu_max((directory / "cpu.max").read_text())
            except (OSError, ValueError):
                continue
            if quota is not None:
                limits.append(quota)
    if not limits:
        for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            for directory in _up_from(root / name, paths.get("cpu", "/")):
                quota = _read_quota_v1(directory)
                if quota is not None:
                    limits.append(quota)
            if limits:
                break
    return min(limits) if limits else None


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


def usable_cores(quota: float | None = None, *, probe_quota: bool = True) -> int:
    """CPUs this process may use: its affinity mask (a cpuset or ``taskset`` narrows it), capped by the cgroup CPU
    quota rounded up, at least 1. A pod limited to 2 CPUs on a 64-core node gets 2, not 64."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 1
    if quota is None and probe_quota:
        quota = cgroup_cpu_limit()
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
    quota = cgroup_cpu_limit()
    return Hardware(
        cpu_model=model or "unknown",
        logical_cores=logical,
        physical_cores=min(physical or logical, logical),
        usable_cores=usable_cores(quota, probe_quota=False),
        cpu_flags=flags,
        memory_total_mb=total,
        memory_available_mb=available,
        gpus=probe_gpus(),
        cpu_quota=quota,
    )
