"""Client library and CLI checks that need no daemon: files, error mapping, argument handling."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from faceseal.client import (
    Candidate,
    DataLossError,
    DeadlineExceededError,
    EnrollResult,
    FaceSealClient,
    FaceSealClientError,
    InvalidArgumentError,
    MatchResult,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    from_rpc_error,
    load_encoding,
)
from faceseal.client.cli import main

# ---------------------------------------------------------------- load_encoding


def test_npy_1d_is_float32(tmp_path: Path) -> None:
    path = tmp_path / "e.npy"
    np.save(path, np.linspace(-1, 1, 128))  # float64 on disk
    values = load_encoding(path)
    assert values.dtype == np.float32
    assert values.shape == (128,)
    assert values[0] == pytest.approx(-1.0)


def test_npy_single_row_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "e.npy"
    np.save(path, np.ones((1, 4), dtype=np.float32))
    assert load_encoding(str(path)).shape == (4,)


def test_npy_several_rows_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "e.npy"
    np.save(path, np.ones((2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="1-D"):
        load_encoding(path)


def test_npy_object_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.npy"
    np.save(path, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickled data is refused"):
        load_encoding(path)


def test_raw_pickle_named_npy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.npy"
    path.write_bytes(pickle.dumps([0.1, 0.2]))
    with pytest.raises(ValueError, match="pickled data is refused"):
        load_encoding(path)


def test_npy_non_numeric_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.npy"
    np.save(path, np.array(["a", "b"]))
    with pytest.raises(ValueError, match="numeric"):
        load_encoding(path)


def test_json_list_and_object(tmp_path: Path) -> None:
    plain = tmp_path / "a.json"
    plain.write_text("[0.5, -1, 2.25]")
    wrapped = tmp_path / "b.json"
    wrapped.write_text(json.dumps({"encoding": [0.5, -1, 2.25], "model": "dlib"}))
    for path in (plain, wrapped):
        values = load_encoding(path)
        assert values.dtype == np.float32
        assert values.tolist() == [0.5, -1.0, 2.25]


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '"0.5"',
        '["0.5", 1]',
        "[true, 1.0]",
        "[[0.5, 1.0]]",
        '{"other": [1.0]}',
        "[]",
    ],
)
def test_json_bad_shapes_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"bad\.json"):
        load_encoding(path)


def test_unknown_suffix_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "e.pkl"
    path.write_bytes(pickle.dumps([0.1]))
    with pytest.raises(ValueError, match="unsupported"):
        load_encoding(path)


def test_error_messages_do_not_echo_values(tmp_path: Path) -> None:
    path = tmp_path / "e.npy"
    np.save(path, np.full((3, 2), 0.123456, dtype=np.float32))
    with pytest.raises(ValueError, match="1-D") as info:
        load_encoding(path)
    assert "0.123" not in str(info.value)


# ---------------------------------------------------------------- from_rpc_error


class FakeRpcError(grpc.RpcError):
    """What a failed sync call looks like to from_rpc_error, rich status included."""

    def __init__(self, code: grpc.StatusCode, details: str, status: status_pb2.Status | None = None) -> None:
        super().__init__()
        self._code = code
        self._details = details
        self._metadata = () if status is None else (("grpc-status-details-bin", status.SerializeToString()),)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._metadata


def _rich_status(code: grpc.StatusCode, message: str, retry: duration_pb2.Duration | None) -> status_pb2.Status:
    status = status_pb2.Status(code=code.value[0], message=message)
    if retry is not None:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=retry))
        status.details.append(detail)
    return status


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.UNAUTHENTICATED, UnauthenticatedError),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (grpc.StatusCode.DATA_LOSS, DataLossError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
        (grpc.StatusCode.INTERNAL, FaceSealClientError),
        (grpc.StatusCode.UNKNOWN, FaceSealClientError),
        (grpc.StatusCode.UNIMPLEMENTED, FaceSealClientError),
    ],
)
def test_codes_map_to_classes(code: grpc.StatusCode, cls: type[FaceSealClientError]) -> None:
    err = from_rpc_error(FakeRpcError(code, "server says no"))
    assert type(err) is cls
    assert isinstance(err, FaceSealClientError)
    assert err.code is code
    assert err.message == "server says no"
    assert str(err) == f"{code.name}: server says no"


def test_retry_info_is_parsed() -> None:
    code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, "subject locked out"
    status = _rich_status(code, message, duration_pb2.Duration(seconds=2, nanos=500_000_000))
    err = from_rpc_error(FakeRpcError(code, message, status))
    assert isinstance(err, ResourceExhaustedError)
    assert err.retry_after == pytest.approx(2.5)


def test_retry_after_is_none_without_retry_info() -> None:
    code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, "over budget"
    for status in (None, _rich_status(code, message, None)):
        err = from_rpc_error(FakeRpcError(code, message, status))
        assert isinstance(err, ResourceExhaustedError)
        assert err.retry_after is None


def test_inconsistent_rich_status_is_ignored() -> None:
    # grpc_status refuses a Status whose code disagrees with the call's; that must not crash us.
    status = _rich_status(grpc.StatusCode.INTERNAL, "over budget", duration_pb2.Duration(seconds=1))
    err = from_rpc_error(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "over budget", status))
    assert isinstance(err, ResourceExhaustedError)
    assert err.retry_after is None


def test_garbage_status_details_are_ignored() -> None:
    err = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "over budget")
    err._metadata = (("grpc-status-details-bin", b"\xff\xff not a proto"),)
    mapped = from_rpc_error(err)
    assert isinstance(mapped, ResourceExhaustedError)
    assert mapped.retry_after is None


# ---------------------------------------------------------------- FaceSealClient construction


def _dev_dir(tmp_path: Path, *profiles: str) -> Path:
    """PEM contents do not matter offline: the channel connects lazily."""
    (tmp_path / "clients").mkdir(parents=True)
    (tmp_path / "ca.crt").write_bytes(b"ca")
    for profile in profiles:
        (tmp_path / "clients" / f"{profile}.crt").write_bytes(b"cert")
        (tmp_path / "clients" / f"{profile}.key").write_bytes(b"key")
    return tmp_path


def test_from_profile_names_the_missing_file(tmp_path: Path) -> None:
    dev = _dev_dir(tmp_path, "gateway", "enroller")
    with pytest.raises(FileNotFoundError, match=r"clients/nobody\.crt") as info:
        FaceSealClient.from_profile("nobody", dev_dir=dev)
    assert "enroller, gateway" in str(info.value)


def test_from_profile_in_an_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ca\.crt"):
        FaceSealClient.from_profile("gateway", dev_dir=tmp_path)


def test_from_profile_refuses_path_like_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid profile name"):
        FaceSealClient.from_profile("../gateway", dev_dir=tmp_path)


def test_from_profile_builds_a_client(tmp_path: Path) -> None:
    with FaceSealClient.from_profile("gateway", dev_dir=_dev_dir(tmp_path, "gateway")) as client:
        assert isinstance(client, FaceSealClient)


def test_probe_must_be_one_dimensional(tmp_path: Path) -> None:
    with (
        FaceSealClient.from_profile("gateway", dev_dir=_dev_dir(tmp_path, "gateway")) as client,
        pytest.raises(ValueError, match="1-D"),
    ):
        client.match("alice", np.zeros((2, 2)))


# ---------------------------------------------------------------- CLI


@pytest.fixture
def dev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FACESEAL_PROFILE", "gateway")
    dev = _dev_dir(tmp_path / "dev", "gateway")
    monkeypatch.setenv("FACESEAL_DEV_DIR", str(dev))
    np.save(tmp_path / "probe.npy", np.ones(4, dtype=np.float32))
    return tmp_path


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["match", "alice"],
        ["identify", "p.npy", "--top-k", "0"],
        ["--timeout", "-1", "health"],
        ["--timeout", "soon", "health"],
        ["--ca", "ca.crt", "health"],
        ["--profile", "gateway", "--ca", "a", "--cert", "b", "--key", "c", "health"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FACESEAL_PROFILE", raising=False)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_no_credentials_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("FACESEAL_PROFILE", raising=False)
    with pytest.raises(SystemExit) as info:
        main(["health"])
    assert info.value.code == 2
    assert "--profile" in capsys.readouterr().err


def test_missing_profile_is_a_local_error(dev: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--profile", "nobody", "health"]) == 1
    assert "nobody.crt does not exist" in capsys.readouterr().err


def test_bad_encoding_file_is_a_local_error(dev: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (dev / "bad.json").write_text('{"nope": 1}')
    assert main(["match", "alice", str(dev / "bad.json"), "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("faceseal: CLIENT_ERROR: ")
    assert json.loads(captured.out)["error"]["code"] == "CLIENT_ERROR"


@pytest.mark.parametrize(
    ("result", "text", "data"),
    [
        (MatchResult(True, None), "match", {"match": True, "distance": None}),
        (MatchResult(False, 0.75), "no match (distance 0.750)", {"match": False, "distance": 0.75}),
    ],
)
def test_match_output(
    dev: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    result: MatchResult,
    text: str,
    data: dict[str, object],
) -> None:
    monkeypatch.setattr(FaceSealClient, "match", lambda *a, **k: result)
    probe = str(dev / "probe.npy")
    assert main(["match", "alice", probe]) == 0
    assert capsys.readouterr().out == text + "\n"
    assert main(["match", "alice", probe, "--json"]) == 0  # global options may follow the command
    assert json.loads(capsys.readouterr().out) == data


def test_enroll_identify_delete_output(
    dev: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(FaceSealClient, "enroll", lambda *a, **k: EnrollResult("alice", "t1", 2))
    monkeypatch.setattr(FaceSealClient, "delete", lambda *a, **k: 1)
    probe = str(dev / "probe.npy")
    assert main(["enroll", "alice", probe]) == 0
    assert capsys.readouterr().out == "enrolled alice (template t1, 2 templates)\n"
    assert main(["delete", "alice"]) == 0
    assert capsys.readouterr().out == "deleted 1 template\n"

    monkeypatch.setattr(FaceSealClient, "identify", lambda *a, **k: [])
    assert main(["identify", probe]) == 0
    assert capsys.readouterr().out == "no candidate within threshold\n"
    found = [Candidate("alice", 0.25), Candidate("bob", None)]
    monkeypatch.setattr(FaceSealClient, "identify", lambda *a, **k: found)
    assert main(["identify", probe]) == 0
    assert capsys.readouterr().out == "alice (distance 0.250)\nbob\n"


def test_rpc_error_output(dev: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def locked(*args: object, **kwargs: object) -> MatchResult:
        raise ResourceExhaustedError(grpc.StatusCode.RESOURCE_EXHAUSTED, "subject locked out", retry_after=30)

    monkeypatch.setattr(FaceSealClient, "match", locked)
    assert main(["--json", "match", "alice", str(dev / "probe.npy")]) == 1
    captured = capsys.readouterr()
    assert captured.err == "faceseal: RESOURCE_EXHAUSTED: subject locked out\n"
    assert json.loads(captured.out) == {"error": {"code": "RESOURCE_EXHAUSTED", "message": "subject locked out"}}


@pytest.mark.parametrize(("status", "exit_code"), [("SERVING", 0), ("NOT_SERVING", 1)])
def test_health_exit_code(
    dev: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    status: str,
    exit_code: int,
) -> None:
    monkeypatch.setattr(FaceSealClient, "health", lambda *a, **k: status)
    assert main(["health"]) == exit_code
    assert capsys.readouterr().out == status + "\n"
