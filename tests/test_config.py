"""The configuration file: what ``init --dev`` writes loads, and every mistake stops the daemon
with a message that names the file and the dotted key to fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from faceseal.server.config import load_config
from faceseal.server.devinit import init_dev
from faceseal.server.errors import ConfigError

FACESEALD = Path(sys.executable).with_name("faceseald")

GOOD = """\
mode = "dev"
default_gallery = "faces"

[server]
listen = "127.0.0.1:50051"
tls_cert = "server.crt"
tls_key = "server.key"
client_ca = "ca.crt"
policy = "policy.toml"

[store]
url = "sqlite:data/faceseal.db"

[seal]
type = "file"
key_file = "seal.key"

[galleries.faces]
dimension = 128
metric = "euclidean"
threshold = 0.6
"""


def _edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "faceseal.toml"
    path.write_text(text, encoding="utf-8")
    return path.resolve()


def test_dev_init_config_loads(tmp_path: Path) -> None:
    init_dev(tmp_path)
    config = load_config(tmp_path / "faceseal.toml")
    base = tmp_path.resolve()
    assert config.mode == "dev"
    assert config.default_gallery == "faces"
    faces = config.galleries["faces"]
    assert (faces.dimension, faces.metric, faces.threshold) == (128, "euclidean", 0.6)
    # Relative paths are relative to the config file's folder, wherever the daemon runs from.
    assert config.server.tls_cert == base / "server.crt"
    assert config.server.client_ca == base / "ca.crt"
    assert config.server.policy == base / "policy.toml"
    assert config.store.sqlite_path(config.base_dir) == base / "data" / "faceseal.db"
    for p in (config.server.tls_cert, config.server.tls_key, config.server.client_ca, config.server.policy):
        assert p.is_file(), p


def test_base_config_of_this_table_is_valid(tmp_path: Path) -> None:
    """The broken cases below each differ from this one by one edit; it must load by itself."""
    config = load_config(_write(tmp_path, GOOD))
    assert set(config.galleries) == {"faces"}


def test_a_moved_config_directory_still_loads(tmp_path: Path) -> None:
    init_dev(tmp_path / "a")
    (tmp_path / "a").rename(tmp_path / "b")
    config = load_config(tmp_path / "b" / "faceseal.toml")
    assert config.server.tls_cert == (tmp_path / "b" / "server.crt").resolve()


# Each case: (id, edit of GOOD, the dotted key the message must name).
BROKEN: list[tuple[str, tuple[str, str], str]] = [
    ("missing-server", ("[server]\n", "[not_server]\n"), "server"),
    (
        "typo-thresold-extra",
        ("threshold = 0.6\n", "threshold = 0.6\nthresold = 0.5\n"),
        "galleries.faces.thresold",
    ),
    ("typo-thresold-instead", ("threshold = 0.6\n", "thresold = 0.6\n"), "galleries.faces.threshold"),
    (
        "typo-optional-server-key",
        ('listen = "127.0.0.1:50051"\n', 'listen = "127.0.0.1:50051"\ngrace_secs = 5\n'),
        "server.grace_secs",
    ),
    ("typo-top-level", ('mode = "dev"\n', 'mode = "dev"\ndefault_galery = "faces"\n'), "default_galery"),
    ("metric-manhattan", ('metric = "euclidean"', 'metric = "manhattan"'), "galleries.faces.metric"),
    ("metric-missing", ('metric = "euclidean"\n', ""), "galleries.faces.metric"),
    ("dimension-0", ("dimension = 128", "dimension = 0"), "galleries.faces.dimension"),
    ("dimension-5000", ("dimension = 128", "dimension = 5000"), "galleries.faces.dimension"),
    ("dimension-negative", ("dimension = 128", "dimension = -128"), "galleries.faces.dimension"),
    ("dimension-string", ("dimension = 128", 'dimension = "128"'), "galleries.faces.dimension"),
    ("dimension-float", ("dimension = 128", "dimension = 128.0"), "galleries.faces.dimension"),
    ("dimension-bool", ("dimension = 128", "dimension = true"), "galleries.faces.dimension"),
    ("threshold-nan", ("threshold = 0.6", "threshold = nan"), "galleries.faces.threshold"),
    ("threshold-minus-nan", ("threshold = 0.6", "threshold = -nan"), "galleries.faces.threshold"),
    ("threshold-inf", ("threshold = 0.6", "threshold = inf"), "galleries.faces.threshold"),
    ("threshold-minus-inf", ("threshold = 0.6", "threshold = -inf"), "galleries.faces.threshold"),
    ("threshold-negative", ("threshold = 0.6", "threshold = -0.6"), "galleries.faces.threshold"),
    ("threshold-zero", ("threshold = 0.6", "threshold = 0.0"), "galleries.faces.threshold"),
    ("threshold-string", ("threshold = 0.6", 'threshold = "0.6"'), "galleries.faces.threshold"),
    ("threshold-huge", ("threshold = 0.6", "threshold = 1e300"), "galleries.faces.threshold"),
    ("file-seal-in-production", ('mode = "dev"', 'mode = "production"'), "seal.type"),
    ("file-seal-mode-defaulted", ('mode = "dev"\n', ""), "seal.type"),
    ("mode-unknown", ('mode = "dev"', 'mode = "develop"'), "mode"),
    ("seal-type-unknown", ('type = "file"', 'type = "rot13"'), "seal.type"),
    ("seal-key-file-missing", ('key_file = "seal.key"\n', ""), "seal.key_file"),
    ("default-gallery-missing", ('default_gallery = "faces"', 'default_gallery = "door"'), "default_gallery"),
    (
        "no-galleries",
        ('[galleries.faces]\ndimension = 128\nmetric = "euclidean"\nthreshold = 0.6\n', "[galleries]\n"),
        "galleries",
    ),
    ("gallery-bad-name", ("[galleries.faces]", '[galleries."my faces"]'), "galleries.my faces"),
    ("listen-no-port", ('listen = "127.0.0.1:50051"', 'listen = "127.0.0.1"'), "server.listen"),
    ("listen-empty-port", ('listen = "127.0.0.1:50051"', 'listen = "127.0.0.1:"'), "server.listen"),
    ("listen-no-host", ('listen = "127.0.0.1:50051"', 'listen = ":50051"'), "server.listen"),
    ("listen-port-too-big", ('listen = "127.0.0.1:50051"', 'listen = "127.0.0.1:99999"'), "server.listen"),
    ("listen-port-65536", ('listen = "127.0.0.1:50051"', 'listen = "127.0.0.1:65536"'), "server.listen"),
    ("listen-url", ('listen = "127.0.0.1:50051"', 'listen = "http://127.0.0.1:50051"'), "server.listen"),
    ("listen-space", ('listen = "127.0.0.1:50051"', 'listen = "127.0.0.1: 50051"'), "server.listen"),
    ("listen-not-string", ('listen = "127.0.0.1:50051"', "listen = 50051"), "server.listen"),
    ("tls-cert-missing", ('tls_cert = "server.crt"\n', ""), "server.tls_cert"),
    ("tls-cert-empty", ('tls_cert = "server.crt"', 'tls_cert = ""'), "server.tls_cert"),
    (
        "max-top-k-zero",
        ('policy = "policy.toml"\n', 'policy = "policy.toml"\nmax_top_k = 0\n'),
        "server.max_top_k",
    ),
    (
        "grace-negative",
        ('policy = "policy.toml"\n', 'policy = "policy.toml"\ngrace_seconds = -1\n'),
        "server.grace_seconds",
    ),
]


@pytest.mark.parametrize(("edit", "dotted"), [(e, d) for _, e, d in BROKEN], ids=[c[0] for c in BROKEN])
def test_broken_config_names_file_and_key(tmp_path: Path, edit: tuple[str, str], dotted: str) -> None:
    path = _write(tmp_path, _edit(GOOD, *edit))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert f"'{dotted}'" in message, message


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD + "\nthis is = = not toml\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert str((tmp_path / "nope.toml").resolve()) in str(info.value)


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "[::1]:50051", "localhost:65535", "0.0.0.0:443"])
def test_good_listen_addresses_load(tmp_path: Path, listen: str) -> None:
    text = _edit(GOOD, 'listen = "127.0.0.1:50051"', f'listen = "{listen}"')
    assert load_config(_write(tmp_path, text)).server.listen == listen


def test_cli_serve_with_broken_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path, _edit(GOOD, 'metric = "euclidean"', 'metric = "manhattan"'))
    result = subprocess.run(
        [str(FACESEALD), "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "galleries.faces.metric" in result.stderr
    assert str(path) in result.stderr
