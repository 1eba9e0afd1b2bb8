"""The mailserv console script: check, version, --help everywhere, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mailserv.cli.main import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith("mailserv ")


def test_check_good_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(REPO / "etc" / "mailserv.toml")]) == 0
    assert "OK (7 listeners" in capsys.readouterr().out


def test_check_reports_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'config_version = 1\nhostname = "h.test"\ndomains = ["d.test"]\nstate_dir = "s"\n'
        'shutdown_timeout = "never"\n[store]\npath = "/m/{user}"\nformat = "eml"\n'
        '[listeners.imap]\nprotocol = "imap"\nendpoints = ["tcp:143"]\ntls = "yes"\n'
    )
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3
    assert (
        f"mailserv: {bad}: listeners.imap.tls: expected one of none, starttls, implicit, got 'yes'"
        in err
    )
    assert any("store.format: expected one of maildir, mbox, got 'eml'" in e for e in err)
    assert any("shutdown_timeout: expected a duration" in e for e in err)


def test_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "none.toml")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_every_subcommand_has_help() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    names = list(subparsers.choices)  # type: ignore[union-attr]
    assert {"check", "version"} <= set(names)
    for name in names:
        result = subprocess.run(
            [sys.executable, "-m", "mailserv.cli.main", name, "--help"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert result.returncode == 0, (name, result.stderr)
        assert "usage: mailserv" in result.stdout


def test_no_command_is_an_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mailserv.cli.main"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2 and "required" in result.stderr
