"""From a fresh clone, `make run` serves and the README walk-through works exactly as written."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PORT = 50051  # the walk-through uses the daemon's default address


def walkthrough() -> list[tuple[str, str]]:
    """(command, expected output) pairs of the README block after the walk-through marker."""
    text = (REPO / "README.md").read_text()
    after = text.split("<!-- walkthrough:", 1)[1]
    block = re.search(r"```sh\n(.*?)```", after, re.S)
    assert block, "README.md lost its walk-through block"
    steps = []
    for line in block.group(1).splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        command, _, expected = line.partition("# =>")
        steps.append((command.strip(), expected.strip()))
    return steps


def test_walkthrough_has_the_promised_steps() -> None:
    commands = " ".join(c for c, _ in walkthrough())
    for word in ("enroll", "match", "identify", "delete"):
        assert f" {word} " in commands


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def fresh_clone(tmp_path: Path) -> Iterator[Path]:
    if not (REPO / ".git").exists():
        pytest.fail("the README test needs the repository's .git to clone from")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    yield clone
    shutil.rmtree(clone, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_make_run_and_walkthrough_from_a_fresh_clone(fresh_clone: Path) -> None:
    if _port_open(PORT):
        pytest.fail(f"port {PORT} is taken (is `make run` already running?); the walk-through needs it")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FACESEAL_", "VIRTUAL_ENV"))}
    log = (fresh_clone / "make-run.log").open("wb")
    daemon = subprocess.Popen(
        ["make", "run"],
        cwd=fresh_clone,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not _port_open(PORT):
            assert daemon.poll() is None, (fresh_clone / "make-run.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "make run did not start serving within 10 minutes"
            time.sleep(0.5)
        for command, expected in walkthrough():
            result = subprocess.run(
                ["bash", "-c", command], cwd=fresh_clone, env=env, capture_output=True, text=True, timeout=60
            )
            output = result.stdout + result.stderr
            refused = expected.startswith("faceseal: ")
            assert result.returncode == (1 if refused else 0), f"{command}\n{output}"
            assert expected in output, f"{command}: expected {expected!r}, got:\n{output}"
            if command.endswith(("match alice alice-2.npy", "match alice bob.npy")):
                assert output.strip() == expected, "the gateway must see a bare decision, no distance"
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        assert daemon.wait(timeout=60) is not None
        log.close()
