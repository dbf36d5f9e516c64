"""Build microserve's CPU image with buildah from a Debian base made here with debootstrap, and run the image's
filesystem with chroot, in a network namespace that has only loopback, as a container runtime would run it.

There is no image registry and no OCI runtime on these machines: buildah (with ``--isolation chroot``) builds, a
``buildah mount`` of the result is the container's root, and ``run-in-rootfs.sh`` does the runtime's part (mounts,
user, environment). What the build needs from the host comes in through ``--volume`` and build arguments: the CA
bundle and indexes the host's pip is configured with, and a wheel cache. None of it is in the Dockerfile.

Slow steps are cached between local runs under ``MICROSERVE_IMAGE_TEST_CACHE`` (default
``~/.cache/microserve-image-test``): the debootstrapped root filesystem and base image, pip's cache (kept per
compiler and llama.cpp flags, so a change of them never reuses a wheel built another way), and buildah's layers.
"""

from __future__ import annotations

import ast
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
RUN_IN_ROOTFS = Path(__file__).resolve().parent / "run-in-rootfs.sh"
CACHE = Path(os.environ.get("MICROSERVE_IMAGE_TEST_CACHE", Path.home() / ".cache" / "microserve-image-test"))
TAG = "localhost/microserve:image-test"

SUITE = "bookworm"
MIRROR = os.environ.get("MICROSERVE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the Dockerfile needs of a base beyond Debian's minimal system: Python with venv (the official Python images
# have both), CA certificates, and useradd.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd")
# Where the build sees what the host lends it; the mount points are left behind, empty, in the image.
BUILD_HOST = "/run/build-host"

# command -> the Debian package that has it
TOOLS = {
    "buildah": "buildah",
    "debootstrap": "debootstrap",
    "ip": "iproute2",
    "unshare": "util-linux",
    "chroot": "coreutils",
}

_CLONE_NEWNET = 0x40000000

# Seconds each slow step took in this run, printed at the end of the session.
TIMINGS: dict[str, float] = {}
# The build arguments the image was built with in this run (the labels must say the same).
BUILT_WITH: dict[str, str] = {}


class HarnessError(RuntimeError):
    """A step of the build or the run failed; the message ends with its log."""


def missing_tools() -> list[str]:
    """Debian packages whose command is not on PATH (``make image-test`` installs them)."""
    return sorted({package for command, package in TOOLS.items() if shutil.which(command) is None})


def run(args: Sequence[str], log: Path | None = None, **kwargs: Any) -> str:
    """Run a command; its output goes to ``log`` (appended) or is returned. Raise with the output's tail on failure."""
    started = time.monotonic()
    if log is not None:
        with log.open("ab") as out:
            out.write(f"\n$ {' '.join(args)}\n".encode())
            out.flush()
            proc = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, check=False, **kwargs)
        output = ""
    else:
        done = subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)
        proc, output = done, done.stdout
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-6000:] if log is not None else f"{output}\n{proc.stderr}"[-6000:]
        raise HarnessError(
            f"{' '.join(args)} exited {proc.returncode} after {time.monotonic() - started:.0f}s:\n{tail}"
        )
    return output


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def image_exists(tag: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", tag], capture_output=True).returncode == 0


# -- the base image ----------------------------------------------------------------------------------------------


def base_image(log: Path) -> str:
    """A Debian base image in buildah's storage, made with debootstrap (cached by suite, mirror and packages)."""
    key = _digest(SUITE, MIRROR, *BASE_PACKAGES)
    tag = f"localhost/microserve-test-base:{SUITE}-{key}"
    if image_exists(tag):
        return tag
    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = CACHE / f"rootfs-{key}"
    complete = CACHE / f"rootfs-{key}.complete"
    if not complete.exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        include = ",".join(BASE_PACKAGES)
        run(["debootstrap", "--variant=minbase", f"--include={include}", SUITE, str(rootfs), MIRROR], log)
        # An image ships without the package downloads and indexes (as Debian's own images do).
        for leftover in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            leftover.unlink()
        shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
        (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True)
        complete.touch()
    container = run(["buildah", "from", "--pull-never", "scratch"]).strip()
    try:
        mountpoint = run(["buildah", "mount", container]).strip()
        run(["cp", "-a", f"{rootfs}/.", f"{mountpoint}/"], log)
        run(["buildah", "umount", container])
        run(
            [
                "buildah",
                "config",
                "--env",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--env",
                "LANG=C.UTF-8",
                "--cmd",
                "/bin/bash",
                container,
            ]
        )
        run(["buildah", "commit", "--quiet", container, tag], log)
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True)
    return tag


# -- what the host's pip lends the build -------------------------------------------------------------------------


def host_pip_settings() -> dict[str, str]:
    """The host pip's effective settings (environment first, then its configuration files)."""
    listed = run([sys.executable, "-m", "pip", "config", "list"])
    from_env: dict[str, str] = {}
    from_files: dict[str, str] = {}
    for line in listed.splitlines():
        name, sep, raw = line.partition("=")
        if not sep:
            continue
        section, _, key = name.rpartition(".")
        value = str(ast.literal_eval(raw))
        if section == ":env:":
            from_env[key] = value
        elif section in ("global", "install") and key not in from_files:
            from_files[key] = value
    for variable, value in os.environ.items():
        if variable.startswith("PIP_") and value:
            from_env.setdefault(variable[4:].lower().replace("_", "-"), value)
    return {**from_files, **from_env}


@dataclass
class PipPassThrough:
    """``--volume`` and ``--build-arg`` options that give the build what the host's pip uses."""

    volumes: dict[str, str] = field(default_factory=dict)  # host path -> path in the build
    build_args: dict[str, str] = field(default_factory=dict)

    def mount(self, host: Path) -> str:
        if str(host) not in self.volumes:
            self.volumes[str(host)] = f"{BUILD_HOST}/{len(self.volumes)}-{host.name}"
        return self.volumes[str(host)]

    def local(self, token: str) -> str:
        """``token`` as the build sees it: a host file or folder, or a ``file://`` index, is mounted."""
        if token.startswith("file://"):
            path = Path(urllib.parse.urlparse(token).path)
            # A simple index links its files relative to its own root (../../files/x.whl): lend the folder above.
            return f"file://{self.mount(path.parent)}/{path.name}"
        if token.startswith("/") and Path(token).exists():
            return self.mount(Path(token))
        return token

    def options(self) -> list[str]:
        opts: list[str] = []
        for host, inside in self.volumes.items():
            mode = "rw" if inside.endswith("pip-cache") else "ro"
            opts += ["--volume", f"{host}:{inside}:{mode}"]
        for name, value in self.build_args.items():
            opts += ["--build-arg", f"{name}={value}"]
        return opts


# Settings that decide where pip finds packages and whom it trusts; the rest (verbosity, ...) stays on the host.
_PASSED = ("index-url", "extra-index-url", "find-links", "cert", "client-cert", "constraint", "trusted-host")


def build_flags_key(base: str) -> str:
    """What decides how the Dockerfile compiles wheels: its compiler packages and llama.cpp flags, and the base.

    pip's cache knows a built wheel by its source alone, so the cache is kept per key: a change of flags (or of the
    compiler) builds afresh rather than reusing a wheel built another way.
    """
    lines = [
        line for line in DOCKERFILE.read_text().splitlines() if "LLAMA_CMAKE_ARGS" in line or "build-essential" in line
    ]
    return _digest(base, *lines)


def pip_pass_through(settings: dict[str, str], base: str) -> PipPassThrough:
    """Mounts and build arguments mirroring ``settings``, plus a pip cache kept between local runs."""
    lent = PipPassThrough()
    for key in _PASSED:
        value = settings.get(key)
        if value:
            lent.build_args[f"PIP_{key.upper().replace('-', '_')}"] = " ".join(lent.local(t) for t in value.split())
    if settings.get("default-timeout"):
        lent.build_args["PIP_DEFAULT_TIMEOUT"] = settings["default-timeout"]
    cache = CACHE / f"pip-{build_flags_key(base)}"
    cache.mkdir(parents=True, exist_ok=True)
    lent.volumes[str(cache)] = f"{BUILD_HOST}/pip-cache"
    lent.build_args["PIP_CACHE_DIR"] = f"{BUILD_HOST}/pip-cache"
    return lent


# -- the image ---------------------------------------------------------------------------------------------------


def project_version() -> str:
    import tomllib

    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def build_image(base: str, log: Path) -> str:
    """Build deploy/docker/Dockerfile on ``base`` with the host's pip settings; return the image's tag."""
    lent = pip_pass_through(host_pip_settings(), base)
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    BUILT_WITH.update(BASE_IMAGE=base, VERSION=project_version(), REVISION=revision or "unknown")
    run(
        [
            "buildah",
            "bud",
            "--isolation",
            "chroot",
            "--layers",
            "--pull-never",
            # Docker's format: OCI image configs have no HEALTHCHECK.
            "--format",
            "docker",
            "--file",
            str(DOCKERFILE),
            "--tag",
            TAG,
            *[option for name, value in BUILT_WITH.items() for option in ("--build-arg", f"{name}={value}")],
            *lent.options(),
            str(REPO),
        ],
        log,
    )
    return TAG


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image's config that a runtime acts on."""

    raw: dict[str, Any]

    @classmethod
    def of(cls, tag: str) -> ImageConfig:
        inspected = json.loads(run(["buildah", "inspect", "--type", "image", tag]))
        return cls(inspected["Docker"]["config"])

    @property
    def user(self) -> str:
        return str(self.raw.get("User") or "0:0")

    @property
    def env(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.raw.get("Env") or [])

    @property
    def argv(self) -> list[str]:
        return [*(self.raw.get("Entrypoint") or []), *(self.raw.get("Cmd") or [])]

    @property
    def workdir(self) -> str:
        return str(self.raw.get("WorkingDir") or "/")

    @property
    def healthcheck(self) -> list[str]:
        test = (self.raw.get("Healthcheck") or {}).get("Test") or []
        if test[:1] == ["CMD"]:
            return list(test[1:])
        if test[:1] == ["CMD-SHELL"]:
            return ["/bin/sh", "-c", test[1]]
        return []

    @property
    def start_period(self) -> float:
        return float((self.raw.get("Healthcheck") or {}).get("StartPeriod") or 0) / 1e9

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.raw.get("Labels") or {})


@contextmanager
def mounted(tag: str) -> Iterator[Path]:
    """The image's filesystem, as a buildah working container mounted on the host."""
    container = run(["buildah", "from", "--pull-never", tag]).strip()
    try:
        yield Path(run(["buildah", "mount", container]).strip())
    finally:
        subprocess.run(["buildah", "umount", container], capture_output=True)
        subprocess.run(["buildah", "rm", container], capture_output=True)


# -- running it --------------------------------------------------------------------------------------------------


class NetNamespace:
    """A network namespace with nothing in it but loopback."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> NetNamespace:
        run(["ip", "netns", "add", self.name])
        run(["ip", "-n", self.name, "link", "set", "lo", "up"])
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)

    def interfaces(self) -> list[str]:
        lines = run(["ip", "-n", self.name, "-o", "link", "show"]).splitlines()
        return [line.split(":")[1].strip() for line in lines if line.strip()]

    def routes(self) -> list[str]:
        """Every route but loopback's own (which live in the local table, not the main one)."""
        return [
            line
            for family in ("-4", "-6")
            for line in run(["ip", "-n", self.name, family, "route", "show"]).splitlines()
            if line.strip()
        ]

    @contextmanager
    def entered(self) -> Iterator[None]:
        """Sockets this thread opens inside the block belong to the namespace (setns is per thread)."""
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if libc.setns(target, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {self.name}")
            try:
                yield
            finally:
                if libc.setns(own, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back to the host's network namespace")
        finally:
            os.close(own)
            os.close(target)

    def launch(
        self,
        rootfs: Path,
        cache: Path,
        config: ImageConfig,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        **popen: Any,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` from ``rootfs`` in this namespace as the image's user, with the image's environment."""
        environment = {**config.env, **(env or {})}
        environment.setdefault("HOME", home_of(rootfs, config.user))
        assignments = [f"{k}={v}" for k, v in environment.items()]
        command = ["ip", "netns", "exec", self.name, "sh", str(RUN_IN_ROOTFS), str(rootfs), str(cache)]
        command += [config.user, config.workdir, *assignments, *argv]
        return subprocess.Popen(command, **popen)


def home_of(rootfs: Path, user: str) -> str:
    """The home directory the image's passwd gives ``user`` (a runtime sets HOME from it when the image does not)."""
    uid = user.split(":")[0]
    for line in (rootfs / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if len(fields) > 5 and uid in (fields[0], fields[2]):
            return fields[5]
    return "/"


def process_ids(pid: int) -> tuple[list[int], list[int]]:
    """The real, effective, saved and filesystem uids and gids of a running process."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
    gids = next(line for line in status if line.startswith("Gid:")).split()[1:]
    return [int(u) for u in uids], [int(g) for g in gids]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime, lock files aside (opening one for a lock rewrites it)."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in folder.rglob("*")
        if path.is_file() and path.name != ".lock"
    }
