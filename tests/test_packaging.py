"""Every subpackage on disk ships in the wheel, under its namespaced import name."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"server": "faceseal/server", "client": "faceseal/client"}


def modules_on_disk() -> set[str]:
    found = set()
    for folder, prefix in ROOTS.items():
        for path in (REPO / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                found.add(f"{prefix}/{path.relative_to(REPO / folder).as_posix()}")
    return found


@pytest.mark.slow
def test_wheel_contains_every_module(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("faceseal-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(modules_on_disk() - names)
    assert not missing, f"not packaged (add to [tool.setuptools] packages): {missing}"
    assert "faceseal/v1/faceseal_pb2.py" in names
    assert "faceseal/v1/faceseal_pb2_grpc.py" in names
    assert "faceseal/server/py.typed" in names
    assert not any(n.startswith(("server/", "client/", "tests/")) for n in names), "bare folders leaked"


def test_console_scripts_are_declared() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert 'faceseald = "faceseal.server.cli:main"' in text
    assert 'faceseal = "faceseal.client.cli:main"' in text
