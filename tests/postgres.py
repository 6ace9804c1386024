"""A throwaway PostgreSQL cluster for the tests: initdb + pg_ctl on a loopback port, then gone.

Debian's server binaries live in /usr/lib/postgresql/<version>/bin. initdb refuses to run as
root, so as root the cluster belongs to the ``postgres`` user (created by the Debian package).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from requirements import missing


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path is None:
        missing("PostgreSQL", "apt-get install postgresql")
        raise AssertionError("unreachable")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="faceseal-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")
        self.user = "postgres" if self._as else os.environ.get("USER", "postgres")

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(_bin("initdb"), "-D", str(self.data), "--auth=trust", "-U", self.user, "--no-sync", "-E", "UTF8")
        for _attempt in range(3):
            try:
                self._start_server()
                return
            except subprocess.CalledProcessError:
                log = (self.root / "log").read_text(errors="replace") if (self.root / "log").exists() else ""
                if "could not bind" not in log:
                    raise
                self.port = _free_port()  # another process took the port after we picked it
        self._start_server()

    def _start_server(self) -> None:
        self._run(
            _bin("pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=on",
            "start",
        )

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = "fs_" + uuid.uuid4().hex[:12]
        self._run(_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        subprocess.run(
            [*self._as, _bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb") and shutil.which("initdb") is None:
        missing("PostgreSQL", "apt-get install postgresql")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        missing("runuser", "apt-get install util-linux")
    cluster = Cluster()
    try:
        cluster.start()
    except subprocess.CalledProcessError as exc:
        cluster.stop()
        pytest.fail(f"could not start a throwaway PostgreSQL: {exc.stderr.decode(errors='replace')[-2000:]}")
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: Cluster) -> str:
    return pg_cluster.create_database()
