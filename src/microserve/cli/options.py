"""Command-line options derived from pydantic models, :class:`~microserve.settings.Settings` first: every setting
is a flag, declared once.

A field becomes ``--field-name`` with its description as help; booleans become ``--name/--no-name`` (or the pair
a field names in its ``json_schema_extra`` ``flag``), lists repeat, and secrets (API keys) are never flags, since a
command line shows in ``ps``. Only the flags a user gives override the environment.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, NoReturn, get_args, get_origin

import typer
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from microserve.settings import Settings


def fail(message: str) -> NoReturn:
    """Print one error line and exit with status 2."""
    typer.echo(f"microserve: error: {message}", err=True)
    raise typer.Exit(code=2)


def make_settings(**flags: Any) -> Settings:
    """Settings from the environment, overridden by the flags that were given (not None)."""
    given = {k: v for k, v in flags.items() if v is not None and v != []}
    try:
        return Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"invalid setting {'.'.join(str(p) for p in first['loc'])}: {first['msg']}")


def _scalar(annotation: Any) -> Any:
    """The annotation without ``None`` and ``Annotated`` metadata."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            return _scalar(options[0])
    return annotation


def _default_text(field: FieldInfo) -> str | None:
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined or field.default is None:
        return None
    else:
        value = field.default
    if isinstance(value, Path):
        value = str(value).replace(str(Path.home()), "~", 1)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or None
    return str(value)


_METAVARS: dict[Any, str] = {int: "INTEGER", float: "FLOAT", str: "TEXT", Path: "PATH"}


def _option(name: str, field: FieldInfo) -> inspect.Parameter | None:
    kind = _scalar(field.annotation)
    if kind is SecretStr:
        return None
    help_text = field.description or ""
    default = _default_text(field)
    if default is not None:
        help_text += f" (default: {default})"
    flag = f"--{name.replace('_', '-')}"
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if kind is bool:
        declared = str(extra.get("flag") or f"{flag}/--no-{flag[2:]}")
        annotation: Any = Annotated[bool | None, typer.Option(declared, help=help_text, show_default=False)]
    elif get_origin(kind) is list:
        option = typer.Option(flag, help=help_text + " Repeat for several.", metavar="TEXT", show_default=False)
        annotation = Annotated[list[str] | None, option]
    elif get_origin(kind) is typing.Literal:
        choices = "|".join(str(c) for c in get_args(kind))
        option = typer.Option(flag, help=help_text, metavar=f"[{choices}]", show_default=False)
        annotation = Annotated[str | None, option]
    elif kind in _METAVARS:
        option = typer.Option(flag, help=help_text, metavar=_METAVARS[kind], show_default=False)
        annotation = Annotated[kind | None, option]
    else:  # pragma: no cover - a new field type must be mapped here
        raise TypeError(f"no command-line form for setting {name}: {field.annotation}")
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def model_parameters(model: type[BaseModel], names: Iterable[str] | None = None) -> list[inspect.Parameter]:
    """One keyword parameter per field of ``model`` (all of them, or those ``names``), for a Typer command's
    signature: the flag ``--field-name``, the field's description as help, every parameter defaulting to None."""
    fields = model.model_fields
    wanted = list(fields) if names is None else list(names)
    params = [_option(name, fields[name]) for name in wanted]
    return [p for p in params if p is not None]


def settings_parameters(names: Iterable[str] | None = None) -> list[inspect.Parameter]:
    """One keyword parameter per setting (all of them, or those ``names``), for a Typer command's signature."""
    return model_parameters(Settings, names)


def with_settings(
    names: Iterable[str] | None = None, extra: Iterable[inspect.Parameter] = ()
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command the flags of the settings ``names`` (default: all); the command receives the resulting
    ``Settings`` as ``settings`` plus its ``extra`` parameters by name."""
    extra = list(extra)
    setting_params = settings_parameters(names)
    setting_names = {p.name for p in setting_params}

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(command)
        def run(**kwargs: Any) -> None:
            flags = {k: v for k, v in kwargs.items() if k in setting_names}
            others = {k: v for k, v in kwargs.items() if k not in setting_names}
            command(settings=make_settings(**flags), **others)

        params = [*extra, *setting_params]
        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        del run.__wrapped__  # Typer must read this signature, not the command's own
        return run

    return decorate
