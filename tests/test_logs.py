"""The daemon's own log: JSON lines on stderr, each line of a call naming its request id, caller
and method, and nothing that identifies a subject."""

from __future__ import annotations

import json

import grpc
import pytest
from helpers import SubprocessDaemon, random_encodings

from faceseal.client import FaceSealClientError

pytestmark = pytest.mark.slow


def test_log_lines_are_json_and_name_the_call(subprocess_daemon: SubprocessDaemon) -> None:
    dev = subprocess_daemon.dev
    dev.issue_client("stranger")  # from our CA, but in no policy entry
    subprocess_daemon.start()
    encoding = random_encodings(1, seed=99)[0]
    with dev.client(subprocess_daemon.target, "stranger") as stranger:
        with pytest.raises(FaceSealClientError) as err:
            stranger.match("subject-zebra-1234", encoding)
        assert err.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert subprocess_daemon.stop() == 0

    lines = [line for line in subprocess_daemon.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "msg"} <= set(r) for r in records)
    (refusal,) = [r for r in records if r["msg"] == "unknown caller refused"]
    assert refusal["caller"] == "spiffe://faceseal.dev/stranger"
    assert refusal["method"] == "/faceseal.v1.FaceSealService/Match"
    assert len(refusal["request_id"]) == 32
    assert "subject-zebra-1234" not in subprocess_daemon.log()
