"""``microserve models``, ``profiles`` and ``pull``: the catalog, the profile choice for this machine, and the
model cache, as tables for people and ``--json`` for scripts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from microserve.settings import Settings

_JSON = typer.Option("--json", help="Print JSON for scripts.")
_PROFILE = typer.Option(help="Force a profile id; an incompatible one is an error.")
_OFFLINE = typer.Option("--offline/--online", help="Never touch the network; use cached artifacts only.")
_CATALOG = typer.Option(help="Folder of extra model manifests (*.yaml).")
_CACHE = typer.Option(help="Model cache [~/.cache/microserve].")


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover - the loop always returns


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(width=max(160, Console().width)).print(table)


def register(app: typer.Typer, make_settings: Callable[..., Settings], fail: Callable[[str], NoReturn]) -> None:
    """Add the model commands to ``app``; ``make_settings`` turns flags into Settings, ``fail`` exits with 2."""

    @app.command()
    def models(
        as_json: Annotated[bool, _JSON] = False,
        cache_dir: Annotated[Path | None, _CACHE] = None,
        catalog_dir: Annotated[Path | None, _CATALOG] = None,
    ) -> None:
        """The model catalog and what is in the cache, with sizes."""
        from microserve.catalog.manifest import catalog
        from microserve.store import ModelStore

        settings = make_settings(cache_dir=cache_dir, catalog_dir=catalog_dir)
        store = ModelStore(settings.cache_dir)
        cached = store.cached()
        entries: list[dict[str, Any]] = []
        for manifest in catalog(settings.catalog_dir):
            # Packaged directories are used where they are installed, so they count as present without a copy.
            here = [c for c in cached if c.model == manifest.id] + store.in_place(manifest)
            entries.append(
                {
                    "id": manifest.id,
                    "aliases": manifest.aliases,
                    "task": manifest.task,
                    "context_length": manifest.context_length,
                    "profiles": [p.id for p in manifest.profiles],
                    "cached": [{"profile": c.profile, "path": str(c.path), "size": c.size} for c in here],
                }
            )
        known = {e["id"] for e in entries}
        for item in cached:
            if item.model not in known:  # pulled from a path or the Hub without a manifest
                entries.append(
                    {
                        "id": item.model,
                        "aliases": [],
                        "task": None,
                        "context_length": None,
                        "profiles": [item.profile],
                        "cached": [{"profile": item.profile, "path": str(item.path), "size": item.size}],
                    }
                )
        if as_json:
            typer.echo(json.dumps({"cache_dir": str(settings.cache_dir), "models": entries}, indent=2))
            return
        rows = [
            [
                e["id"],
                e["task"] or "-",
                ", ".join(e["aliases"]) or "-",
                str(e["context_length"] or "-"),
                ", ".join(e["profiles"]),
                "\n".join(f"{c['profile']} ({_human(c['size'])})" for c in e["cached"]) or "not cached",
            ]
            for e in entries
        ]
        _print_table(
            f"Models (cache: {settings.cache_dir})",
            ["model", "task", "aliases", "context", "profiles", "cached"],
            rows,
        )

    @app.command()
    def profiles(
        model: Annotated[
            str | None, typer.Argument(help="Catalog id, GGUF path or hf://... (default: every catalog model)")
        ] = None,
        profile: Annotated[str | None, _PROFILE] = None,
        as_json: Annotated[bool, _JSON] = False,
        cache_dir: Annotated[Path | None, _CACHE] = None,
        catalog_dir: Annotated[Path | None, _CATALOG] = None,
    ) -> None:
        """Every profile of a model with compatible/incompatible and why, the selected one marked."""
        from microserve import hardware
        from microserve.catalog.manifest import catalog
        from microserve.catalog.resolve import plan_model
        from microserve.profiles import ProfileError, check_all, select_profile
        from microserve.store import ArtifactError, ModelStore

        settings = make_settings(cache_dir=cache_dir, catalog_dir=catalog_dir, profile=profile)
        store = ModelStore(settings.cache_dir)
        machine = hardware.probe()
        try:
            manifests = [plan_model(model, settings.catalog_dir)] if model else catalog(settings.catalog_dir)
        except ArtifactError as exc:
            fail(str(exc))
        report: list[dict[str, Any]] = []
        errors: list[str] = []
        for manifest in manifests:
            forced = settings.profile if settings.profile and (model or manifest.profile(settings.profile)) else None
            try:
                selected: str | None = select_profile(manifest, machine, forced).id
            except ProfileError as exc:
                selected = None
                errors.append(str(exc))
            report.append(
                {
                    "model": manifest.id,
                    "selected": selected,
                    "profiles": [
                        {
                            "id": c.profile.id,
                            "engine": c.profile.engine,
                            "device": c.profile.device,
                            "format": c.profile.format,
                            "quantization": c.profile.quantization,
                            "min_memory_mb": c.profile.min_memory_mb,
                            "source": c.profile.source.describe(),
                            "compatible": c.compatible,
                            "reasons": list(c.reasons),
                            "selected": c.profile.id == selected,
                            "cached": store.is_cached(manifest, c.profile),
                        }
                        for c in check_all(manifest, machine)
                    ],
                }
            )
        if as_json:
            typer.echo(json.dumps({"hardware": machine.to_dict(), "models": report}, indent=2))
        else:
            gpus = ", ".join(f"{g.name} ({g.memory_free_mb} MiB free)" for g in machine.gpus) or "no NVIDIA GPU"
            typer.echo(
                f"{machine.cpu_model}: {machine.usable_cores}/{machine.logical_cores} cores usable, "
                f"{machine.memory_available_mb} MiB RAM available, {gpus}"
            )
            for entry in report:
                rows = [
                    [
                        "*" if p["selected"] else "",
                        p["id"],
                        p["engine"],
                        p["device"],
                        f"{p['format']} {p['quantization'] or ''}".strip(),
                        f"{p['min_memory_mb']} MiB",
                        "selected" if p["selected"] else "compatible" if p["compatible"] else "incompatible",
                        "; ".join(p["reasons"]) or "-",
                        "yes" if p["cached"] else "no",
                    ]
                    for p in entry["profiles"]
                ]
                _print_table(
                    f"Profiles of {entry['model']}",
                    ["", "profile", "engine", "device", "format", "min memory", "status", "why", "cached"],
                    rows,
                )
        if errors:
            fail("; ".join(errors))

    @app.command()
    def pull(
        model: Annotated[str, typer.Argument(help="Catalog id or hf://owner/repo/file.gguf.")],
        profile: Annotated[
            str | None, typer.Option(help="Profile to fetch (default: the one selected for this machine).")
        ] = None,
        cache_dir: Annotated[Path | None, _CACHE] = None,
        catalog_dir: Annotated[Path | None, _CATALOG] = None,
        offline: Annotated[bool | None, _OFFLINE] = None,
    ) -> None:
        """Download a model's artifact into the cache and verify it (a verified cached one is not fetched again); an
        embedding or ranking model is also exported to ONNX there, as serving it would on its first start."""
        import logging
        import sys

        from microserve import hardware
        from microserve.catalog.resolve import plan_model
        from microserve.engines.base import EncoderKind
        from microserve.engines.encoder.onnx_export import ExportError, exported_model
        from microserve.profiles import ProfileError, check_profile, select_profile
        from microserve.store import ArtifactError, ModelStore, artifact_size, sha256_file

        settings = make_settings(cache_dir=cache_dir, catalog_dir=catalog_dir, offline=offline)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        machine = hardware.probe()
        try:
            manifest = plan_model(model, settings.catalog_dir)
            wanted = profile or settings.profile
            if wanted:
                # Fetching for another machine is legitimate: pull any profile, and say when it cannot run here.
                chosen = manifest.profile(wanted)
                if chosen is None:
                    fail(
                        f"model {manifest.id} has no profile `{wanted}` ({', '.join(p.id for p in manifest.profiles)})"
                    )
                check = check_profile(chosen, machine)
                if not check.compatible:
                    typer.echo(f"note: {chosen.id} cannot run on this machine: {'; '.join(check.reasons)}", err=True)
            else:
                chosen = select_profile(manifest, machine)
            path = ModelStore(settings.cache_dir, offline=settings.offline).ensure(manifest, chosen)
            if chosen.engine == "encoder":
                # The encoder serves an ONNX export kept in the cache: making it here spares the first start the
                # export, so an image or an offline host starts with the model ready.
                kind: EncoderKind = "cross-encoder" if manifest.task == "ranking" else "embedding"
                typer.echo(f"{manifest.id}: ONNX graph {exported_model(path, kind, settings.cache_dir)}")
        except (ArtifactError, ProfileError, OSError, ExportError) as exc:
            fail(str(exc))
        digest = sha256_file(path) if path.is_file() else "(directory)"
        typer.echo(f"{manifest.id} ({chosen.id}): {path} {artifact_size(path)} bytes sha256 {digest}")
