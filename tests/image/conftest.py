"""The CPU image, built once per session with buildah from a debootstrapped base (``make image-test``)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from image_harness import CACHE, TIMINGS, ImageConfig, base_image, build_image, missing_tools, mounted


@pytest.fixture(scope="session")
def build_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("image") / "build.log"


@pytest.fixture(scope="session")
def image(build_log: Path) -> str:
    """The image's tag in buildah's local storage."""
    missing = missing_tools()
    if missing:
        pytest.fail(
            f"the image test needs Debian's {', '.join(missing)}: `apt-get install {' '.join(missing)}` "
            "(`make image-test` installs them)"
        )
    if os.geteuid() != 0:
        pytest.fail("the image test needs root: debootstrap, buildah's chroot isolation, mounts and network namespaces")
    started = time.monotonic()
    base = base_image(build_log)
    TIMINGS["base image (debootstrap + import, cached)"] = time.monotonic() - started
    started = time.monotonic()
    tag = build_image(base, build_log)
    TIMINGS["buildah bud"] = time.monotonic() - started
    return tag


@pytest.fixture(scope="session")
def config(image: str) -> ImageConfig:
    return ImageConfig.of(image)


@pytest.fixture(scope="session")
def rootfs(image: str) -> Iterator[Path]:
    with mounted(image) as root:
        yield root


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("image test timings")
        for what, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{what}: {seconds:.1f} s")
        terminalreporter.write_line(f"cache: {CACHE}")
