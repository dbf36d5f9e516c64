"""Usable cores honour the cgroup CPU quota along the process's own cgroup path (fake cgroup trees)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from microserve import hardware
from microserve.hardware import cgroup_cpu_limit, parse_self_cgroup, usable_cores


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_quota_of_the_process_cgroup(tmp_path: Path) -> None:
    _write(tmp_path / "kubepods" / "pod1" / "cpu.max", "150000 100000\n")
    _write(tmp_path / "kubepods" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(tmp_path, "0::/kubepods/pod1\n") == 1.5


def test_a_parent_quota_binds_the_child(tmp_path: Path) -> None:
    _write(tmp_path / "a" / "b" / "cpu.max", "400000 100000\n")
    _write(tmp_path / "a" / "cpu.max", "100000 100000\n")
    assert cgroup_cpu_limit(tmp_path, "0::/a/b\n") == 1.0


def test_a_container_that_mounts_its_own_cgroup_reads_the_root(tmp_path: Path) -> None:
    # /proc/self/cgroup names the host's path, but /sys/fs/cgroup is the container's own cgroup.
    _write(tmp_path / "cpu.max", "200000 100000\n")
    assert cgroup_cpu_limit(tmp_path, "0::/docker/0123abcd\n") == 2.0


def test_hybrid_hierarchy_and_v1(tmp_path: Path) -> None:
    _write(tmp_path / "unified" / "svc" / "cpu.max", "50000 100000\n")
    assert cgroup_cpu_limit(tmp_path, "1:cpu,cpuacct:/svc\n0::/svc\n") == 0.5
    v1 = tmp_path / "v1"
    _write(v1 / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us", "300000\n")
    _write(v1 / "cpu,cpuacct" / "job" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(v1, "4:cpu,cpuacct:/job\n0::/\n") == 3.0
    _write(v1 / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_limit(v1, "4:cpu,cpuacct:/job\n0::/\n") is None


def test_no_quota(tmp_path: Path) -> None:
    _write(tmp_path / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(tmp_path, "0::/\n") is None
    assert cgroup_cpu_limit(tmp_path / "missing", "") is None


def test_parse_self_cgroup() -> None:
    text = "12:cpu,cpuacct:/a\n3:memory:/m\n0::/unified/path\n"
    assert parse_self_cgroup(text) == {"cpu": "/a", "cpuacct": "/a", "memory": "/m", "": "/unified/path"}


def test_usable_cores_is_the_affinity_capped_by_the_quota_rounded_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "cpu.max", "120000 100000\n")
    monkeypatch.setattr(hardware, "_CGROUP", tmp_path)
    monkeypatch.setattr(hardware, "_SELF_CGROUP", tmp_path / "self")
    _write(tmp_path / "self", "0::/\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    # A pod limited to 1.2 CPUs on a 64-core node: two threads, not 64.
    assert usable_cores(cgroup_cpu_limit(tmp_path)) == 2
    assert hardware.probe().usable_cores == 2
    assert hardware.probe().cpu_quota == 1.2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert usable_cores(1.2) == 1
