"""``microserve models``, ``profiles`` and ``pull``: the catalog, the profile choice for this machine, and the
model cache, as tables for people and ``--json`` for scripts."""

from __future__ import annotations

import inspect
import json
from typing import Annotated, Any

import typer

from microserve.cli.options import fail, with_settings
from microserve.settings import Settings

_AS_JSON = inspect.Parameter(
    "as_json",
    inspect.Parameter.KEYWORD_ONLY,
    default=False,
    annotation=Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")],
)


def _model_argument(help_text: str, *, required: bool) -> inspect.Parameter:
    kind: Any = str if required else str | None
    annotation = Annotated[kind, typer.Argument(help=help_text)]
    default = inspect.Parameter.empty if required else None
    return inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover - the loop always returns


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        # Cells are plain text: "pip install 'microserve[vllm]'" must not lose its brackets to rich's markup.
        table.add_row(*(escape(cell) for cell in row))
    Console(width=max(160, Console().width)).print(table)


def register(app: typer.Typer) -> None:
    """Add the model commands to ``app``."""

    @app.command()
    @with_settings(["cache_dir", "catalog_dir"], extra=[_AS_JSON])
    def models(settings: Settings, as_json: bool = False) -> None:
        """The model catalog and what is in the cache, with sizes."""
        from microserve.catalog.manifest import catalog
        from microserve.catalog.store import ModelStore

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
    @with_settings(
        ["profile", "cache_dir", "catalog_dir"],
        extra=[
            _model_argument("Catalog id, GGUF path or hf://... (default: every catalog model)", required=False),
            _AS_JSON,
        ],
    )
    def profiles(settings: Settings, model: str | None = None, as_json: bool = False) -> None:
        """Every profile of a model with compatible/incompatible and why, the selected one marked."""
        from microserve import hardware
        from microserve.catalog.manifest import catalog
        from microserve.catalog.profiles import ProfileError, check_all, select_profile
        from microserve.catalog.resolve import lookup
        from microserve.catalog.store import ArtifactError, ModelStore

        store = ModelStore(settings.cache_dir)
        machine = hardware.probe()
        try:
            manifests = [lookup(model, None, settings.catalog_dir).manifest] if model else catalog(settings.catalog_dir)
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
                            "derived_from": getattr(manifest.parent(c.profile), "id", None),
                            "description": c.profile.description,
                            "compatible": c.compatible,
                            "reasons": list(c.reasons),
                            "selected": c.profile.id == selected,
                            "auto_select": c.profile.auto_select,
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
            quota = f" (cgroup quota {machine.cpu_quota:g} CPUs)" if machine.cpu_quota is not None else ""
            typer.echo(
                f"{machine.cpu_model}: {machine.usable_cores}/{machine.logical_cores} cores usable{quota}, "
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
                        "selected"
                        if p["selected"]
                        else ("compatible" if p["auto_select"] else "only when asked")
                        if p["compatible"]
                        else "incompatible",
                        "; ".join(p["reasons"]) or "-",
                        "yes" if p["cached"] else "no",
                        f"made here from {p['derived_from']}" if p["derived_from"] else p["source"],
                    ]
                    for p in entry["profiles"]
                ]
                _print_table(
                    f"Profiles of {entry['model']}",
                    ["", "profile", "engine", "device", "format", "min memory", "status", "why", "cached", "source"],
                    rows,
                )
                for p in entry["profiles"]:
                    if p["derived_from"]:
                        typer.echo(
                            f"{p['id']}: made once on this machine from {p['derived_from']}'s file by the "
                            f"{p['engine']} engine ({p['format']} {p['quantization'] or ''}".rstrip()
                            + "), then cached and verified like a downloaded file; "
                            + ("already made." if p["cached"] else "made on first use or by `microserve pull`.")
                        )
                for p in entry["profiles"]:
                    if not p["auto_select"]:
                        typer.echo(
                            f"{p['id']}: never chosen for the machine; served only when asked for with "
                            f"--profile {p['id']} or MICROSERVE_PROFILE={p['id']}."
                        )
        if errors:
            fail("; ".join(errors))

    @app.command()
    @with_settings(
        ["profile", "cache_dir", "catalog_dir", "offline"],
        extra=[_model_argument("Catalog id or hf://owner/repo/file.gguf.", required=True)],
    )
    def pull(settings: Settings, model: str) -> None:
        """Download a model's artifact into the cache and verify it (a verified cached one is not fetched again); make
        a derived profile's file from its parent's (placed first); do the one-time work its engine would do on a
        first start (an encoder's ONNX export). With --profile, that profile is fetched even if it cannot run on this
        machine (a note says why)."""
        import logging
        import sys

        from microserve import hardware
        from microserve.catalog.errors import CatalogError
        from microserve.catalog.profiles import check_profile, select_profile
        from microserve.catalog.resolve import lookup
        from microserve.catalog.store import ModelStore, artifact_size, sha256_file
        from microserve.engines.registry import EngineTarget, prepare_engine

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        machine = hardware.probe()
        try:
            manifest = lookup(model, None, settings.catalog_dir).manifest
            wanted = settings.profile
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
            parent = manifest.parent(chosen)
            store = ModelStore(settings.cache_dir, offline=settings.offline)
            if parent is not None and not store.is_cached(manifest, chosen):
                typer.echo(
                    f"{manifest.id} ({chosen.id}): made once from {parent.id}'s file as "
                    f"{chosen.quantization or chosen.format} by the {chosen.engine} engine",
                    err=True,
                )
            path = store.ensure(manifest, chosen)
            # Done here, an image or an offline host starts with the model ready.
            target = EngineTarget(engine=chosen.engine, name=manifest.id, path=path, task=manifest.task)
            prepared = prepare_engine(target, settings)
            if prepared is not None:
                typer.echo(f"{manifest.id}: prepared {prepared}")
        except (CatalogError, OSError, RuntimeError) as exc:
            fail(str(exc))
        digest = sha256_file(path) if path.is_file() else "(directory)"
        typer.echo(f"{manifest.id} ({chosen.id}): {path} {artifact_size(path)} bytes sha256 {digest}")
