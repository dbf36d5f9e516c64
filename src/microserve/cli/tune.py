"""``microserve tune``: train a LoRA adapter on a JSONL file and write it where the server reads adapters.

Only typer, the settings and the knobs' model are imported here; the training stack (torch, transformers, peft)
loads when the command runs, so the rest of the CLI starts fast and works without the ``tune`` extra.
"""

from __future__ import annotations

import inspect
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn

import typer

from microserve.cli.options import model_parameters, with_settings
from microserve.finetune.config import TuneConfig
from microserve.settings import DEFAULT_MODEL, Settings

EXIT_STOPPED = 130


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"microserve: error: {message}", err=True)
    raise typer.Exit(code=code)


def missing_extra() -> str | None:
    """The message to show when the ``tune`` extra is not installed, else None."""
    from microserve.finetune.extra import missing_extra as missing

    return missing("`microserve tune`")


class _StopOnSignal:
    """The first Ctrl-C (or SIGTERM) asks the loop to stop after the current step; a second one aborts."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()
        typer.echo("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)", err=True)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


_TUNED_BY_FLAGS = [n for n in TuneConfig.model_fields if n not in ("base", "name")]
_EXTRA = [
    inspect.Parameter(
        "data",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[
            Path, typer.Argument(help="Training data, JSONL: chat `messages` or `prompt`/`completion`.")
        ],
    ),
    inspect.Parameter(
        "model",
        inspect.Parameter.KEYWORD_ONLY,
        default=DEFAULT_MODEL,
        annotation=Annotated[str, typer.Option("--model", help="Base model: catalog id, GGUF path or HF directory.")],
    ),
    inspect.Parameter(
        "name",
        inspect.Parameter.KEYWORD_ONLY,
        default="",
        annotation=Annotated[str, typer.Option("--name", help="Adapter name (its directory and served model name).")],
    ),
    inspect.Parameter(
        "validation_file",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            Path | None, typer.Option(help="Held-out JSONL in the same format; its loss is reported per epoch.")
        ],
    ),
    inspect.Parameter(
        "resume",
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")],
    ),
    inspect.Parameter(
        "overwrite",
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[bool, typer.Option("--overwrite", help="Replace an adapter of the same name.")],
    ),
    *model_parameters(TuneConfig, _TUNED_BY_FLAGS),
]


def register(app: typer.Typer) -> None:
    """Add ``tune`` to ``app``: its knobs are TuneConfig's fields, its places (adapter directory, model cache,
    catalog) the settings'."""

    @app.command()
    @with_settings(["lora_dir", "cache_dir", "catalog_dir", "offline"], extra=_EXTRA)
    def tune(
        settings: Settings,
        data: Path,
        model: str = DEFAULT_MODEL,
        name: str = "",
        validation_file: Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
        **knobs: Any,
    ) -> None:
        """Train a LoRA adapter for a served base model and write it into the adapter directory."""
        from pydantic import ValidationError

        problem = missing_extra()
        if problem:
            _fail(problem)
        if not name:
            _fail("--name is required: the adapter's directory and the model name clients will send")
        given = {k: v for k, v in knobs.items() if v is not None and v != []}
        if "target_modules" in given:  # repeated, or comma-separated, or both
            given["target_modules"] = [m.strip() for v in given["target_modules"] for m in v.split(",") if m.strip()]
        try:
            config = TuneConfig(base=model, name=name, **given)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]).replace("_", "-")
            _fail(f"--{where}: {first['msg'].removeprefix('Value error, ')}")
        run_tune(config, data, validation_file, settings, resume=resume, overwrite=overwrite)


def run_tune(
    config: TuneConfig, data: Path, validation_file: Path | None, settings: Settings, *, resume: bool, overwrite: bool
) -> None:
    """Validate, train and publish, turning each failure into a message and an exit code."""
    import time

    from microserve.finetune.base import BaseModelError, QuietLlamaLogs
    from microserve.finetune.data import DataError
    from microserve.finetune.output import OutputError
    from microserve.finetune.pipeline import prepare, run
    from microserve.finetune.progress import ConsoleProgress
    from microserve.finetune.train import ResumeError, Stopped

    lora_dir = settings.resolved_lora_dir()
    for path in (data, validation_file):
        if path is not None and not path.is_file():
            _fail(f"{path}: no such file")
    started = time.monotonic()
    quiet = QuietLlamaLogs()
    try:
        prepared = prepare(
            config,
            data,
            validation_file,
            settings.cache_dir,
            catalog_dir=settings.catalog_dir,
            offline=settings.offline,
        )
    except DataError as exc:
        _fail(f"nothing was trained: {exc.describe()}")
    except BaseModelError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot read the data: {exc}")
    typer.echo(
        f"{len(prepared.train)} training examples ({prepared.data_format} format)"
        + (f", {len(prepared.validation)} validation examples" if prepared.validation else "")
        + f"; base {prepared.base.model_id} ({prepared.base.facts.architecture})",
        err=True,
    )
    stop = threading.Event()
    progress = ConsoleProgress(f"tuning {config.name}")
    try:
        with _StopOnSignal(stop):
            outcome = run(
                config,
                prepared,
                lora_dir,
                settings.cache_dir,
                resume=resume,
                overwrite=overwrite,
                progress=progress,
                stop=stop,
                files={
                    "training_file": str(data),
                    **({"validation_file": str(validation_file)} if validation_file else {}),
                },
            )
    except Stopped as exc:
        _fail(f"{exc}; run the same command with --resume to continue", EXIT_STOPPED)
    except KeyboardInterrupt:
        _fail("aborted; the last checkpoint (if any) is kept for --resume", EXIT_STOPPED)
    except (OutputError, ResumeError) as exc:
        _fail(str(exc))
    del quiet
    report = outcome.report
    typer.echo(
        f"adapter {config.name} written to {outcome.adapter_dir} in {time.monotonic() - started:.0f}s "
        f"(training {report['wall_seconds']:.0f}s, {report['total_steps']} steps): loss "
        f"{report['first_epoch_loss']:.4f} (epoch 1) -> {report['last_epoch_loss']:.4f} (epoch {config.epochs}); "
        f"serve it with `microserve serve --lora-dir {lora_dir}` as model `{config.name}`"
    )
