"""Build the llama.cpp peer binaries (``llama-server``, ``llama-batched-bench``) for benchmarks.

The binaries are built once from the llama-cpp-python sdist that the project pins, so the peers run
exactly the llama.cpp revision that microserve's engine links against. The build is cached outside the
repository (``~/.cache/microserve-bench/llama.cpp-<version>/``, root overridable with
``MICROSERVE_BENCH_CACHE``) and skipped when both binaries already exist.

Usage::

    .venv/bin/python bench/peers.py            # build if needed, print the binary paths
    .venv/bin/python bench/peers.py --force    # rebuild from scratch
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

TARGETS = ("llama-server", "llama-batched-bench")

# Everything that could reach the network at configure/build time is switched off: the machine only
# has PyPI access, and the server's web UI would otherwise be fetched from a Hugging Face bucket.
# Static libraries keep the two binaries self-contained in the cache directory (no rpath games).
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_LLGUIDANCE=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
)


@dataclass(frozen=True)
class PeerPaths:
    """Locations of the built peer binaries."""

    llama_server: Path
    llama_batched_bench: Path
    version: str
    root: Path


def pinned_version() -> str:
    """Return the installed llama-cpp-python version, i.e. the project's pin."""
    try:
        # Imported lazily: it loads libllama, which only this lookup needs.
        import llama_cpp

        return str(llama_cpp.__version__)
    except ImportError:
        # Fall back to the distribution metadata so the script still works from a Python that has
        # the package installed but cannot load its shared library.
        from importlib.metadata import version

        return version("llama_cpp_python")


def cache_root() -> Path:
    """Return the benchmark cache root (``MICROSERVE_BENCH_CACHE`` or ``~/.cache/microserve-bench``)."""
    env = os.environ.get("MICROSERVE_BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "microserve-bench"


def peer_paths(version: str | None = None, root: Path | None = None) -> PeerPaths:
    """Return where the binaries for ``version`` live (or will live), without building anything."""
    version = version or pinned_version()
    base = (root or cache_root()) / f"llama.cpp-{version}"
    bin_dir = base / "build" / "bin"
    return PeerPaths(
        llama_server=bin_dir / "llama-server",
        llama_batched_bench=bin_dir / "llama-batched-bench",
        version=version,
        root=base,
    )


def _is_built(paths: PeerPaths) -> bool:
    return all(p.is_file() and os.access(p, os.X_OK) for p in (paths.llama_server, paths.llama_batched_bench))


@contextlib.contextmanager
def _build_lock(base: Path) -> Iterator[None]:
    # Two benchmark scripts started together must not both compile into the same tree.
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], log: Callable[[str], None], cwd: Path | None = None) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, cwd=cwd, check=True)


def _fetch_source(version: str, base: Path, log: Callable[[str], None]) -> Path:
    """Download and unpack the sdist; return the vendored llama.cpp directory."""
    src_root = base / "src"
    llama_dir = src_root / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (llama_dir / "CMakeLists.txt").is_file():
        return llama_dir
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        # Only this package as an sdist: `:all:` would also compile its build backend from source.
        pip = [sys.executable, "-m", "pip", "download", "--no-binary", "llama-cpp-python", "--no-deps"]
        _run([*pip, f"llama-cpp-python=={version}", "-d", tmp], log)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if len(sdists) != 1:
            raise RuntimeError(f"expected one llama-cpp-python sdist in {tmp}, found {sdists}")
        # Unpack into a scratch dir first so an interrupted extraction never looks like a valid tree.
        staging = Path(tmp) / "unpacked"
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(staging, filter="data")
        if src_root.exists():
            shutil.rmtree(src_root)
        shutil.move(staging, src_root)
    if not (llama_dir / "CMakeLists.txt").is_file():
        raise RuntimeError(f"sdist has no vendored llama.cpp at {llama_dir}")
    return llama_dir


def ensure_peers(
    version: str | None = None,
    root: Path | None = None,
    jobs: int = 2,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> PeerPaths:
    """Build ``llama-server`` and ``llama-batched-bench`` once and return their paths.

    The build is skipped when both binaries already exist (unless ``force``). ``version`` defaults to
    the installed llama-cpp-python version so the peers follow the project's pin.
    """
    log = log or (lambda msg: print(f"[peers] {msg}", file=sys.stderr, flush=True))
    paths = peer_paths(version, root)
    if not force and _is_built(paths):
        return paths
    with _build_lock(paths.root):
        # Another process may have finished the build while we waited for the lock.
        if not force and _is_built(paths):
            return paths
        started = time.monotonic()
        llama_dir = _fetch_source(paths.version, paths.root, log)
        build_dir = paths.root / "build"
        if force and build_dir.exists():
            shutil.rmtree(build_dir)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run(["cmake", "-S", str(llama_dir), "-B", str(build_dir), *generator, *CMAKE_FLAGS], log)
        _run(["cmake", "--build", str(build_dir), "--target", *TARGETS, "-j", str(jobs)], log)
        if not _is_built(paths):
            raise RuntimeError(f"build finished but binaries are missing under {build_dir / 'bin'}")
        elapsed = time.monotonic() - started
        info = {
            "version": paths.version,
            "cmake_flags": list(CMAKE_FLAGS),
            "jobs": jobs,
            "build_seconds": round(elapsed, 1),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (paths.root / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
        log(f"built llama.cpp peers for llama-cpp-python {paths.version} in {elapsed:.0f}s")
    return paths


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build the peers if needed and print their paths."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", help="llama-cpp-python version (default: the installed one)")
    parser.add_argument("--jobs", "-j", type=int, default=2, help="parallel compile jobs (default 2)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the binaries exist")
    args = parser.parse_args(argv)
    paths = ensure_peers(version=args.version, jobs=args.jobs, force=args.force)
    print(f"llama-server        {paths.llama_server}")
    print(f"llama-batched-bench {paths.llama_batched_bench}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
