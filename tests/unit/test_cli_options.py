"""Every setting is declared once, in Settings: the serve command's flags come from it, and the configuration
page documents each one with its flag."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from microserve.cli import app
from microserve.cli.options import make_settings, settings_parameters
from microserve.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_serve_has_a_flag_for_every_setting_but_secrets() -> None:
    params = {p.name for p in settings_parameters()}
    secret = {n for n, f in Settings.model_fields.items() if f.annotation in (SecretStr, SecretStr | None)}
    assert secret == {"api_keys"}
    assert params == set(Settings.model_fields) - secret
    help_text = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for name in params:
        assert _flag(name) in help_text, name
    assert "--api-keys" not in help_text


def test_flags_override_the_environment_and_unset_flags_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROSERVE_PORT", "9100")
    monkeypatch.setenv("MICROSERVE_PARALLEL", "3")
    settings = make_settings(port=9200, parallel=None, model=[])
    assert (settings.port, settings.parallel, settings.model) == (9200, 3, ["smollm2-135m-instruct"])


def test_the_configuration_page_documents_every_setting_with_its_flag() -> None:
    rows = {
        match.group(1): match.group(2)
        for match in re.finditer(r"^\| (\w+) \| ([^|]*) \|", DOC.read_text(encoding="utf-8"), re.MULTILINE)
    }
    for name, field in Settings.model_fields.items():
        assert name in rows, f"docs/configuration.md has no row for {name}"
        if field.annotation in (SecretStr, SecretStr | None):
            assert "none" in rows[name]
        else:
            assert _flag(name) in rows[name], (name, rows[name])


def test_serve_has_ray_flags_and_replicas_alone_is_refused() -> None:
    runner = CliRunner()
    help_text = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    assert "--ray" in help_text and "[ADDRESS]" in help_text and "--replicas" in help_text
    refused = runner.invoke(app, ["serve", "--replicas", "2"])
    assert refused.exit_code == 2 and "--replicas needs --ray" in refused.output
    assert runner.invoke(app, ["serve", "--ray", "--replicas", "0"]).exit_code == 2
