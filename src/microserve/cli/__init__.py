"""The ``microserve`` command line: ``serve``, ``models``, ``profiles``, ``pull``, ``tune``, ``chat`` and ``version``.

Flags come from :class:`~microserve.settings.Settings` (see ``cli/options.py``); the commands only turn them into
settings and call the layers below, which hold all the logic.
"""

from __future__ import annotations

import typer

from microserve.cli import chat, models, serve, tune

app = typer.Typer(add_completion=False, no_args_is_help=True, help="An open inference microservice.")


@app.command()
def version() -> None:
    """Print the package version and the versions of the engine libraries."""
    from microserve import __version__
    from microserve.engines.registry import ENGINES

    engines = ", ".join(f"{spec.distribution} {spec.library_version() or 'not installed'}" for spec in ENGINES.values())
    typer.echo(f"microserve {__version__} ({engines})")


serve.register(app)
models.register(app)
tune.register(app)
chat.register(app)


def main() -> None:
    """Console-script entry point."""
    app()
