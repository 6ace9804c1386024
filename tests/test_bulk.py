"""BulkEnroll: a client stream of enrollments, validated like Enroll, committed together."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from helpers import Dev, InProcessDaemon, db_snapshot, random_encodings
from test_audit import audit_lines

from faceseal.v1 import faceseal_pb2 as pb
from faceseal.v1 import faceseal_pb2_grpc


def item(subject: str, encoding: np.ndarray, *, gallery: str = "", replace: bool = False) -> pb.BulkEnrollRequest:
    """A stream message carrying one item."""
    return pb.BulkEnrollRequest(items=[one(subject, encoding, gallery=gallery, replace=replace)])


def committed(messages: Iterable[pb.BulkEnrollRequest]) -> Iterator[pb.BulkEnrollRequest]:
    """``messages`` as a complete stream: the last one sets ``commit``, as every client must."""
    held: pb.BulkEnrollRequest | None = None
    for message in messages:
        if held is not None:
            yield held
        held = message
    assert held is not None
    last = pb.BulkEnrollRequest()
    last.CopyFrom(held)
    last.commit = True
    yield last


def one(subject: str, encoding: np.ndarray, *, gallery: str = "", replace: bool = False) -> pb.BulkEnrollItem:
    return pb.BulkEnrollItem(gallery=gallery, subject_id=subject, encoding=encoding.tolist(), replace=replace)


def test_items_packed_several_per_message_are_numbered_across_the_stream(daemon: InProcessDaemon) -> None:
    enc = random_encodings(7, seed=5)
    messages = [
        pb.BulkEnrollRequest(items=[one("m0", enc[0]), one("bad id!", enc[1]), one("m2", enc[2])]),
        pb.BulkEnrollRequest(items=[one("m3", enc[3])]),
        pb.BulkEnrollRequest(items=[one("m4", enc[4]), one("m0", enc[5], replace=True)]),
    ]
    response = stub(daemon, "enroller").BulkEnroll(committed(messages))
    assert [r.index for r in response.results] == [0, 1, 2, 3, 4, 5]
    assert [r.code for r in response.results] == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0, 0, 0, 0]
    with daemon.client("gateway") as gateway:
        assert gateway.match("m0", enc[5]).match
        assert not gateway.match("m0", enc[0]).match
        assert all(gateway.match(f"m{i}", enc[i]).match for i in (2, 3, 4))


def raw_bulk_enroll(daemon: InProcessDaemon, dev: Dev) -> Callable[[Iterator[bytes]], pb.BulkEnrollResponse]:
    """BulkEnroll as the enroller, sending raw bytes: stream messages no stub would build."""
    return dev.channel(daemon.target, "enroller").stream_unary(
        "/faceseal.v1.FaceSealService/BulkEnroll",
        request_serializer=None,
        response_deserializer=pb.BulkEnrollResponse.FromString,
    )


def stub(daemon: InProcessDaemon, profile: str) -> faceseal_pb2_grpc.FaceSealServiceStub:
    return daemon.stub(profile)


def test_valid_items_are_stored_and_invalid_ones_reported(daemon: InProcessDaemon, dev: Dev) -> None:
    enc = random_encodings(4, seed=3)
    nan = enc[3].copy()
    nan[0] = np.nan
    requests = [
        item("alice", enc[0]),
        item("bad id!", enc[1]),
        item("bob", enc[1]),
        item("carol", nan),
        item("dave", enc[2], gallery="no-such-gallery"),
        item("alice", enc[2], replace=True),  # replaces the alice enrolled two items earlier
    ]
    response = stub(daemon, "enroller").BulkEnroll(committed(requests))
    codes = [(r.index, grpc.StatusCode.OK.value[0] == r.code) for r in response.results]
    assert codes == [(0, True), (1, False), (2, True), (3, False), (4, False), (5, True)]
    by_index = {r.index: r for r in response.results}
    assert by_index[1].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert by_index[3].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert by_index[4].code == grpc.StatusCode.NOT_FOUND.value[0]
    assert all(r.template_id for r in response.results if r.code == 0)
    for r in response.results:  # messages state the rule, never the item's values
        assert not any(f"{v:.5f}" in r.message for v in enc.ravel())
    with daemon.client("gateway") as gateway:
        assert gateway.match("alice", enc[2]).match  # the replacement
        assert not gateway.match("alice", enc[0]).match  # the first alice template is gone
        assert gateway.match("bob", enc[1]).match
    rows = db_snapshot(dev.db_path)["templates"]
    assert len(rows) == 2


def test_a_stream_that_breaks_off_stores_nothing(daemon: InProcessDaemon, dev: Dev) -> None:
    enc = random_encodings(10, seed=4)
    before = db_snapshot(dev.db_path)

    def broken() -> Iterator[pb.BulkEnrollRequest]:
        for i in range(5):
            yield item(f"s{i}", enc[i])
        raise RuntimeError("the client crashed mid-stream")

    with pytest.raises(grpc.RpcError):
        stub(daemon, "enroller").BulkEnroll(broken())
    assert db_snapshot(dev.db_path) == before
    # Resending the whole batch afterwards stores each item once.
    response = stub(daemon, "enroller").BulkEnroll(committed(item(f"s{i}", enc[i]) for i in range(10)))
    assert [r.code for r in response.results] == [0] * 10
    assert len(db_snapshot(dev.db_path)["templates"]) == 10


def test_a_stream_that_ends_without_commit_stores_nothing(daemon: InProcessDaemon, dev: Dev) -> None:
    # What the daemon's handler may see of a client that crashed mid-stream: gRPC Python can end
    # the request iterator normally before it notices the cancellation.
    enc = random_encodings(3, seed=8)
    before = db_snapshot(dev.db_path)
    with pytest.raises(grpc.RpcError) as err:
        stub(daemon, "enroller").BulkEnroll(iter([item(f"c{i}", enc[i]) for i in range(3)]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'commit'" in (err.value.details() or "")
    assert "nothing was stored" in (err.value.details() or "")
    assert db_snapshot(dev.db_path) == before


def test_a_message_after_the_commit_is_refused_and_stores_nothing(daemon: InProcessDaemon, dev: Dev) -> None:
    enc = random_encodings(2, seed=9)
    before = db_snapshot(dev.db_path)
    first = item("p0", enc[0])
    first.commit = True
    with pytest.raises(grpc.RpcError) as err:
        stub(daemon, "enroller").BulkEnroll(iter([first, item("p1", enc[1])]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "followed the one that set 'commit'" in (err.value.details() or "")
    assert db_snapshot(dev.db_path) == before


def test_a_bare_commit_message_ends_a_stream(daemon: InProcessDaemon, dev: Dev) -> None:
    enc = random_encodings(2, seed=10)
    end = pb.BulkEnrollRequest(commit=True)
    response = stub(daemon, "enroller").BulkEnroll(iter([item("e0", enc[0]), item("e1", enc[1]), end]))
    assert [(r.index, r.code) for r in response.results] == [(0, 0), (1, 0)]
    assert len(db_snapshot(dev.db_path)["templates"]) == 2
    # A stream of the end marker alone is an empty batch, answered as one.
    assert len(stub(daemon, "enroller").BulkEnroll(iter([end])).results) == 0


def test_bulk_enroll_needs_the_enroll_permission(daemon: InProcessDaemon, dev: Dev) -> None:
    before = db_snapshot(dev.db_path)
    with pytest.raises(grpc.RpcError) as err:
        stub(daemon, "gateway").BulkEnroll(iter([item("x", random_encodings(1, seed=5)[0])]))
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert db_snapshot(dev.db_path) == before


def test_an_oversized_batch_is_refused_whole(harness: InProcessDaemon, dev: Dev) -> None:
    dev.set_server(max_batch=3)
    harness.start()
    before = db_snapshot(dev.db_path)
    enc = random_encodings(4, seed=6)
    with pytest.raises(grpc.RpcError) as err:
        stub(harness, "enroller").BulkEnroll(committed(item(f"s{i}", enc[i]) for i in range(4)))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 3" in (err.value.details() or "")
    assert db_snapshot(dev.db_path) == before


def test_an_undecodable_message_in_the_stream_is_invalid_argument_and_stores_nothing(
    daemon: InProcessDaemon, dev: Dev
) -> None:
    enc = random_encodings(2, seed=6)
    before = db_snapshot(dev.db_path)
    bulk = raw_bulk_enroll(daemon, dev)
    good = item("u0", enc[0]).SerializeToString()
    broken = b"\x0a\x05\xff\xff\xff"  # field 1 claims 5 bytes and carries 3: not a message
    last = item("u1", enc[1])
    last.commit = True
    with pytest.raises(grpc.RpcError) as err:
        bulk(iter([good, broken, last.SerializeToString()]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid message" in (err.value.details() or "")
    assert db_snapshot(dev.db_path) == before


def test_a_message_in_the_former_one_item_format_is_refused_not_read_as_empty(
    daemon: InProcessDaemon, dev: Dev
) -> None:
    enc = random_encodings(1, seed=7)
    before = db_snapshot(dev.db_path)
    # The old BulkEnrollRequest: subject_id = 2, encoding = 3 at the top level (gallery 1 left empty).
    old = pb.BulkEnrollItem(subject_id="legacy", encoding=enc[0].tolist()).SerializeToString()
    bulk = raw_bulk_enroll(daemon, dev)
    with pytest.raises(grpc.RpcError) as err:
        bulk(iter([old]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at least one item" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        stub(daemon, "enroller").BulkEnroll(iter([pb.BulkEnrollRequest()]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert db_snapshot(dev.db_path) == before


def keyed(key: str, messages: Iterable[pb.BulkEnrollRequest]) -> Iterator[pb.BulkEnrollRequest]:
    """``committed(messages)`` with ``key`` on the first message."""
    for n, message in enumerate(committed(messages)):
        if n == 0:
            message.idempotency_key = key
        yield message


def test_a_stream_sent_again_under_its_key_is_answered_not_stored_again(harness: InProcessDaemon, dev: Dev) -> None:
    harness.start()
    enc = random_encodings(4, seed=11)
    # Subject ids long enough that random ciphertext cannot contain one by chance (a two-byte
    # id turns up in a 100 KB file of random bytes more often than not).
    stream = [
        item("subject-quokka-0", enc[0]),
        item("bad id!", enc[1]),
        item("subject-quokka-2", enc[2]),
        item("subject-quokka-3", enc[3]),
    ]
    first = stub(harness, "enroller").BulkEnroll(keyed("batch-0001", stream))
    assert [r.code for r in first.results] == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0, 0]
    stored = db_snapshot(dev.db_path)
    assert len(stored["templates"]) == 3
    # The answer was lost (the client was killed after the commit); it sends the stream again,
    # even after the daemon restarted: the same answer, nothing stored twice.
    harness.restart()
    again = stub(harness, "enroller").BulkEnroll(keyed("batch-0001", stream))
    assert again == first
    assert db_snapshot(dev.db_path)["templates"] == stored["templates"]
    # Nothing changed, but template ids went out again: the audit trail says so.
    last = audit_lines(dev)[-1]
    assert (last["method"], last["outcome"], last["decision"], last["candidates"]) == (
        "/faceseal.v1.FaceSealService/BulkEnroll",
        "OK",
        "replayed",
        4,
    )
    # Neither the key nor a subject id is on disk in clear.
    data = dev.db_path.read_bytes() + b"".join(p.read_bytes() for p in dev.db_path.parent.glob("*-wal"))
    assert b"batch-0001" not in data
    assert b"subject-quokka" not in data
    # Another caller's key is its own: the same key and items from it are a new batch.
    dev.add_caller("enroller2", ["enroll"])
    harness.restart()
    other = stub(harness, "enroller2").BulkEnroll(keyed("batch-0001", stream))
    assert [r.code for r in other.results] == [r.code for r in first.results]
    assert {r.template_id for r in other.results if r.template_id}.isdisjoint(r.template_id for r in first.results)


def test_other_items_under_a_used_key_are_refused_whole(daemon: InProcessDaemon, dev: Dev) -> None:
    enc = random_encodings(3, seed=12)
    stub(daemon, "enroller").BulkEnroll(keyed("import-a-0-2", [item("o0", enc[0]), item("o1", enc[1])]))
    before = db_snapshot(dev.db_path)
    for changed in (
        [item("o0", enc[0]), item("o1", enc[2])],  # another encoding
        [item("o0", enc[0]), item("o1", enc[1], replace=True)],  # another flag
        [item("o0", enc[0])],  # fewer items
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub(daemon, "enroller").BulkEnroll(keyed("import-a-0-2", changed))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "other items" in (err.value.details() or "")
    assert db_snapshot(dev.db_path) == before


def test_an_idempotency_key_is_checked_and_belongs_on_the_first_message(daemon: InProcessDaemon, dev: Dev) -> None:
    enc = random_encodings(2, seed=13)
    before = db_snapshot(dev.db_path)
    for key in ("has space", "k" * 129, "zoë"):
        with pytest.raises(grpc.RpcError) as err:
            stub(daemon, "enroller").BulkEnroll(keyed(key, [item("i0", enc[0])]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "idempotency_key" in (err.value.details() or "")
        assert key not in (err.value.details() or "")
    late = item("i1", enc[1])
    late.idempotency_key = "late-key"
    with pytest.raises(grpc.RpcError) as err:
        stub(daemon, "enroller").BulkEnroll(committed([item("i0", enc[0]), late]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message" in (err.value.details() or "")
    assert db_snapshot(dev.db_path) == before


def test_the_same_keyed_stream_twice_at_once_is_stored_once(daemon: InProcessDaemon, dev: Dev) -> None:
    enc = random_encodings(50, seed=14)
    stream = [item(f"c{i}", enc[i]) for i in range(50)]
    start = threading.Barrier(2)

    def send() -> pb.BulkEnrollResponse | grpc.StatusCode:
        start.wait()
        try:
            return stub(daemon, "enroller").BulkEnroll(keyed("twice-at-once", stream))
        except grpc.RpcError as err:
            return err.code()

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: send(), range(2)))
    # One commits; the other is answered from its record, or fails UNAVAILABLE if it lost the
    # race to commit (its own rows rolled back), and a resend is then answered from the record.
    assert all(a == grpc.StatusCode.UNAVAILABLE or isinstance(a, pb.BulkEnrollResponse) for a in answers)
    assert len(db_snapshot(dev.db_path)["templates"]) == 50
    resent = stub(daemon, "enroller").BulkEnroll(keyed("twice-at-once", stream))
    assert all(a == resent for a in answers if isinstance(a, pb.BulkEnrollResponse))
    assert len(db_snapshot(dev.db_path)["templates"]) == 50


def test_a_stream_whose_answer_would_not_fit_one_message_is_refused_before_the_commit(
    harness: InProcessDaemon, dev: Dev
) -> None:
    # Committed but unanswerable would be the worst case: gRPC refuses to send the answer, and
    # the client cannot tell a stored stream from a refused one.
    dev.set_server(max_message_bytes=4096)
    harness.start()
    enc = random_encodings(100, seed=15)
    before = db_snapshot(dev.db_path)
    with pytest.raises(grpc.RpcError) as err:  # one item per message: each fits; the answer would not
        stub(harness, "enroller").BulkEnroll(committed(item(f"f{i}", enc[i]) for i in range(100)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "send fewer items per stream" in (err.value.details() or "")
    assert db_snapshot(dev.db_path) == before
    answer = stub(harness, "enroller").BulkEnroll(committed(item(f"f{i}", enc[i]) for i in range(40)))
    assert [r.code for r in answer.results] == [0] * 40
