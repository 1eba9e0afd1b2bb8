"""The wheel installs the package, the console script and the twistd plugin, nothing of Twisted."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.process import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)  # type: ignore[call-overload]
    assert result.returncode == 0, (cmd, result.stdout, result.stderr)
    return result


def test_wheel_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", "var", "build", "*.egg-info", "__pycache__"),
    )
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ]
    )
    wheel = next((tmp_path / "dist").glob("mailserv-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/mailserv_plugin.py" in names
    assert "twisted/__init__.py" not in names and "twisted/plugins/__init__.py" not in names
    assert "mailserv/service.py" in names and not any(n.startswith("tests/") for n in names)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    # mailserv is installed from the wheel alone; then the dependencies are made visible from this
    # interpreter's site-packages (a .pth file, added after the install so that pip does not see a
    # mailserv installed there, as in CI, and skip the wheel), so the test needs no download.
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    purelib = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    ).stdout.strip()
    Path(purelib, "outer.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    helptext = run(
        [
            str(python),
            "-c",
            "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
            "mailserv",
            "--help",
        ],
        cwd=outside,
        env=env,
    ).stdout
    assert "--config=" in helptext and "--domain=" in helptext
    listing = run(
        [
            str(python),
            "-c",
            "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
            "--help",
        ],
        cwd=outside,
        env=env,
    ).stdout
    assert "mailserv" in listing
    located = run(
        [str(python), "-c", "import mailserv; print(mailserv.__file__)"], cwd=outside, env=env
    ).stdout
    assert located.startswith(str(venv))
    assert run([str(venv / "bin" / "mailserv"), "version"], cwd=outside, env=env).stdout.startswith(
        "mailserv "
    )
