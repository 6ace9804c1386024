"""The ``faceseal`` command: one RPC per invocation, for operators, scripts and smoke tests.

Exit codes: 0 an answer (a non-match is an answer), 1 an RPC or local error (or a health status
other than SERVING, so the command works as a container health check; or a rewrap that left
templates behind), 2 a usage error.
With ``--json`` stdout carries exactly one JSON object, errors included, so scripts parse one thing.

``faceseal admin status|rotate|rewrap|retire VERSION|audit-hash`` drives key rotation (use ``--profile admin``);
``rewrap`` draws a progress bar on stderr when stderr is a terminal.

``faceseal import FILE`` enrolls a whole file in BulkEnroll batches (see ``_import.py``), with a
progress bar on a terminal; it exits 1 if any item was refused, and 130 (SIGINT) or 143 (SIGTERM)
when stopped between batches, with its progress in the state file so the same command resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO, TypeVar

import grpc

from faceseal.client._admin import AdminClient, RewrapProgress
from faceseal.client._client import DEFAULT_TARGET, DEFAULT_TIMEOUT, Candidate, Connection, FaceSealClient
from faceseal.client._encodings import load_encoding, load_encodings
from faceseal.client._errors import FaceSealClientError
from faceseal.client._import import (
    DEFAULT_BATCH,
    STATE_SUFFIX,
    Rate,
    default_state_path,
    read_import_file,
    resume_state,
    run_import,
)

_Number = TypeVar("_Number", int, float)
JsonValue = str | int | float | bool | None | list["JsonValue"] | dict[str, "JsonValue"]


@dataclass(frozen=True, slots=True)
class _Output:
    data: dict[str, JsonValue]
    text: str
    exit_code: int = 0


def _distance(distance: float | None) -> str:
    return "" if distance is None else f" (distance {distance:.3f})"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _enroll(client: FaceSealClient, args: argparse.Namespace) -> _Output:
    encoding = load_encoding(args.encoding_file)
    r = client.enroll(args.subject_id, encoding, gallery=args.gallery, replace=args.replace)
    return _Output(
        {"subject_id": r.subject_id, "template_id": r.template_id, "template_count": r.template_count},
        f"enrolled {r.subject_id} (template {r.template_id}, {_plural(r.template_count, 'template')})",
    )


def _match(client: FaceSealClient, args: argparse.Namespace) -> _Output:
    probe = load_encoding(args.probe_file)
    r = client.match(args.subject_id, probe, gallery=args.gallery)
    return _Output(
        {"match": r.match, "distance": r.distance},
        ("match" if r.match else "no match") + _distance(r.distance),
    )


def _identify(client: FaceSealClient, args: argparse.Namespace) -> _Output:
    probes = load_encodings(args.probe_file)
    if probes.shape[0] == 1:
        candidates = client.identify(probes[0], top_k=args.top_k, gallery=args.gallery)
        return _Output({"candidates": _candidates_json(candidates)}, _candidates_text(candidates, "\n"))
    # Several probes (one per row): IdentifyBatch, at most --batch probes per call.
    answers = [
        found
        for first in range(0, probes.shape[0], args.batch)
        for found in client.identify_batch(probes[first : first + args.batch], top_k=args.top_k, gallery=args.gallery)
    ]
    results: list[JsonValue] = [{"probe": i, "candidates": _candidates_json(f)} for i, f in enumerate(answers)]
    text = "\n".join(f"probe {i}: {_candidates_text(found, ', ')}" for i, found in enumerate(answers))
    return _Output({"results": results}, text)


def _candidates_json(candidates: list[Candidate]) -> list[JsonValue]:
    return [{"subject_id": c.subject_id, "distance": c.distance} for c in candidates]


def _candidates_text(candidates: list[Candidate], separator: str) -> str:
    return separator.join(c.subject_id + _distance(c.distance) for c in candidates) or "no candidate within threshold"


def _delete(client: FaceSealClient, args: argparse.Namespace) -> _Output:
    deleted = client.delete(args.subject_id, gallery=args.gallery)
    return _Output({"deleted": deleted}, f"deleted {_plural(deleted, 'template')}")


def _health(client: FaceSealClient, args: argparse.Namespace) -> _Output:
    status = client.health()
    return _Output({"status": status}, status, 0 if status == "SERVING" else 1)


_SHOWN_REFUSALS = 20  # refused items listed in the human output; --json lists them all


def _import(client: FaceSealClient, args: argparse.Namespace) -> _Output:
    source = read_import_file(args.file, args.ids)
    state_path: Path = args.state or default_state_path(args.file)
    state, start = resume_state(
        source, state_path, gallery=args.gallery, replace=args.replace, batch=args.batch, restart=args.restart
    )
    bar = _ProgressBar(sys.stderr) if sys.stderr.isatty() and start < state.total else None
    rate = Rate(start)

    def progress(done: int, total: int, refused: int) -> None:
        if bar is not None:
            bar.draw(done, total, f"items, {refused} refused, {rate.per_second(done):,.0f} items/s")

    def stopped_at() -> str:
        return (
            f"(stopped at item {state.done} of {state.total}; {state_path} records the progress: "
            "rerun the same command to resume)"
        )

    try:
        report = run_import(
            client,
            source,
            state,
            state_path,
            start=start,
            batch=args.batch,
            timeout=args.timeout,
            progress=progress,
            stop_after_batches=args.stop_after_batches,
        )
    except FaceSealClientError as err:
        raise FaceSealClientError(err.code, f"{err.message} {stopped_at()}") from None
    except KeyboardInterrupt:  # a second Ctrl-C: the batch in flight may or may not have been stored
        raise FaceSealClientError(
            grpc.StatusCode.CANCELLED,
            f"interrupted during a batch, which the daemon may have stored: a rerun sends it again {stopped_at()}",
        ) from None
    finally:
        if bar is not None:
            bar.finish()
    counts = report.refusal_counts()
    data: dict[str, JsonValue] = {
        "file": str(args.file),
        "state_file": str(state_path),
        "total": report.total,
        "done": report.done,
        "imported": report.imported,
        "refused": len(report.refused),
        "codes": dict(counts),
        "refused_items": [{"index": i, "code": c, "message": m} for i, c, m in report.refused],
        "resumed_from": report.resumed_from,
        "complete": report.complete,
        "stopped_by": report.stopped_by,
    }
    summary = f"imported {report.imported}, refused {len(report.refused)}"
    if counts:
        summary += " (" + ", ".join(f"{code}: {n}" for code, n in counts.items()) + ")"
    lines = []
    if report.stopped_by is not None:
        lines.append(
            f"stopped by {report.stopped_by} after {report.done} of {report.total} items: {summary}; "
            f"{state_path} records the progress: rerun the same command to resume"
        )
    elif start == report.total and report.total > 0:
        lines.append(
            f"nothing left to import: {state_path} says all {report.total} items were sent ({summary}); "
            "--restart imports the file again"
        )
    else:
        lines.append(summary + f" of {_plural(report.total, 'item')}")
        if report.resumed_from:
            lines.append(f"resumed at item {report.resumed_from} ({state_path})")
    for index, code, message in report.refused[:_SHOWN_REFUSALS]:
        lines.append(f"  item {index}: {code}: {message}")
    if len(report.refused) > _SHOWN_REFUSALS:
        lines.append(f"  ... and {len(report.refused) - _SHOWN_REFUSALS} more (--json lists every one)")
    if report.stopped_by is not None:
        exit_code = 128 + (signal.SIGTERM if report.stopped_by == "SIGTERM" else signal.SIGINT)
    else:
        exit_code = 1 if report.refused else 0
    return _Output(data, "\n".join(lines), exit_code)


def _admin_status(client: AdminClient, args: argparse.Namespace) -> _Output:
    status = client.status()
    data: dict[str, JsonValue] = {
        "sealed": status.sealed,
        "key_versions": [asdict(k) for k in status.key_versions],
        "galleries": [asdict(g) for g in status.galleries],
    }
    if status.sealed:
        return _Output(data, "sealed: yes (the daemon cannot reach its seal; keys and galleries unknown)")
    lines = ["sealed: no", "key versions:"]
    for k in status.key_versions:
        active = "  (active)" if k.active else ""
        lines.append(f"  v{k.version}  {_plural(k.template_count, 'template')}{active}")
    lines.append("galleries:")
    for g in status.galleries:
        lines.append(
            f"  {g.name}  {g.dimension}-d {g.metric}  "
            f"{_plural(g.subject_count, 'subject')}, {_plural(g.template_count, 'template')}"
        )
    return _Output(data, "\n".join(lines))


def _admin_rotate(client: AdminClient, args: argparse.Namespace) -> _Output:
    version = client.rotate_key()
    return _Output(
        {"version": version},
        f"key version {version} is active: new templates are sealed under it"
        " (`faceseal admin rewrap` re-seals the older ones)",
    )


class _ProgressBar:
    """``[#####.....] 256/1000 ...``, redrawn in place after a carriage return; on a terminal only."""

    WIDTH = 30

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._drawn = False
        self._length = 0

    def draw(self, done: int, total: int, note: str) -> None:
        filled = self.WIDTH if total == 0 else self.WIDTH * done // total
        bar = "#" * filled + "." * (self.WIDTH - filled)
        line = f"[{bar}] {done}/{total} {note}"
        self._stream.write("\r" + line.ljust(self._length))  # blank out the rest of a longer line
        self._stream.flush()
        self._length = len(line)
        self._drawn = True

    def update(self, p: RewrapProgress) -> None:
        self.draw(p.done, p.total, f"re-sealed under key version {p.target_version}")

    def finish(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()


def _admin_rewrap(client: AdminClient, args: argparse.Namespace) -> _Output:
    bar = _ProgressBar(sys.stderr) if sys.stderr.isatty() else None
    last: RewrapProgress | None = None
    try:
        for progress in client.rewrap():
            last = progress
            if bar is not None:
                bar.update(progress)
    finally:
        if bar is not None:
            bar.finish()  # end the bar's line, so an error message starts on a fresh one
    if last is None:
        raise FaceSealClientError(grpc.StatusCode.UNKNOWN, "the daemon ended the rewrap without progress")
    data: dict[str, JsonValue] = {
        "done": last.done,
        "total": last.total,
        "target_version": last.target_version,
    }
    if last.done < last.total:
        left = last.total - last.done
        return _Output(
            data,
            f"re-sealed {last.done} of {last.total} templates under key version {last.target_version}; "
            f"not re-sealed: {left} that failed to open (see the daemon's integrity alarm)",
            1,
        )
    return _Output(data, f"re-sealed {_plural(last.done, 'template')} under key version {last.target_version}")


def _admin_retire(client: AdminClient, args: argparse.Namespace) -> _Output:
    client.retire_key(args.version)
    return _Output({"retired": args.version}, f"retired key version {args.version}: it is destroyed")


def _admin_audit_hash(client: AdminClient, args: argparse.Namespace) -> _Output:
    value = client.audit_hash(args.subject, gallery=args.gallery)
    return _Output({"subject_hmac": value}, value)


def _positive(kind: Callable[[str], _Number]) -> Callable[[str], _Number]:
    def parse(text: str) -> _Number:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return parse


def _add_global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """Add the options twice (main parser and each subcommand) so they may go before or after it.

    On subcommands the defaults are suppressed, or they would overwrite what was given earlier.
    """

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    group = parser.add_argument_group("connection")
    group.add_argument("--target", default=default(DEFAULT_TARGET), help="host:port of faceseald")
    group.add_argument("--profile", default=default(None), help="dev client certificate to use (env FACESEAL_PROFILE)")
    group.add_argument(
        "--dev-dir", type=Path, default=default(None), help="dev PKI folder (env FACESEAL_DEV_DIR, or dev)"
    )
    group.add_argument("--server-name", default=default(None), help="name to verify in the server's certificate")
    group.add_argument("--ca", type=Path, default=default(None), help="CA certificate (PEM)")
    group.add_argument("--cert", type=Path, default=default(None), help="client certificate (PEM)")
    group.add_argument("--key", type=Path, default=default(None), help="client private key (PEM)")
    group.add_argument(
        "--timeout",
        type=_positive(float),
        default=default(DEFAULT_TIMEOUT),
        help="deadline per call in seconds",
    )
    parser.add_argument("--json", action="store_true", default=default(False), help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faceseal", description="Talk to a faceseald daemon over mutual TLS.")
    _add_global_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[..., _Output], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _add_global_options(sub, defaults=False)
        sub.set_defaults(handler=handler, client_class=FaceSealClient)
        return sub

    def gallery(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--gallery", default="", help="gallery name (default: the daemon's default)")

    sub = command("enroll", _enroll, "seal an encoding as a new template of a subject")
    sub.add_argument("subject_id")
    sub.add_argument("encoding_file", type=Path, help=".npy or .json")
    gallery(sub)
    sub.add_argument("--replace", action="store_true", help="drop the subject's existing templates")

    sub = command("match", _match, "1:1 - does the probe belong to this subject?")
    sub.add_argument("subject_id")
    sub.add_argument("probe_file", type=Path, help=".npy or .json")
    gallery(sub)

    sub = command("identify", _identify, "1:N - which subjects is the probe close to?")
    sub.add_argument("probe_file", type=Path, help=".npy or .json; several probes (one per row) are one IdentifyBatch")
    sub.add_argument("--top-k", type=_positive(int), default=5, help="most candidates wanted (default 5)")
    sub.add_argument(
        "--batch",
        type=_positive(int),
        default=64,
        help="most probes per IdentifyBatch call (default 64, the daemon's default max_identify_batch)",
    )
    gallery(sub)

    sub = command("import", _import, "enroll every encoding of a file, in BulkEnroll batches; resumable")
    sub.add_argument("file", type=Path, help=".npz (encodings + ids or labels), .npy (with --ids) or .jsonl")
    gallery(sub)
    sub.add_argument(
        "--batch",
        type=_positive(int),
        default=DEFAULT_BATCH,
        help=f"items per BulkEnroll stream, each stored all or nothing (default {DEFAULT_BATCH})",
    )
    sub.add_argument("--ids", type=Path, help="with a .npy file: a text file of subject ids, one per line")
    sub.add_argument("--replace", action="store_true", help="each item replaces its subject's earlier templates")
    sub.add_argument("--state", type=Path, help=f"progress file (default FILE{STATE_SUFFIX})")
    sub.add_argument("--restart", action="store_true", help="ignore the progress file and import from the first item")
    sub.add_argument("--stop-after-batches", type=_positive(int), help=argparse.SUPPRESS)  # tests: a clean interruption

    sub = command("delete", _delete, "remove every template of a subject")
    sub.add_argument("subject_id")
    gallery(sub)

    command("health", _health, "print the daemon's health: SERVING or NOT_SERVING")

    admin_help = "key administration (needs the admin permission, e.g. --profile admin)"
    admin = commands.add_parser("admin", help=admin_help, description=admin_help)
    _add_global_options(admin, defaults=False)
    actions = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")

    def action(name: str, handler: Callable[..., _Output], help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        _add_global_options(sub, defaults=False)
        sub.set_defaults(handler=handler, client_class=AdminClient)
        return sub

    action("status", _admin_status, "seal state, key versions with template counts, galleries")
    action("rotate", _admin_rotate, "add a data-key version; new templates are sealed under it")
    action("rewrap", _admin_rewrap, "re-seal every template under the active key version (no deadline)")
    sub = action("retire", _admin_retire, "destroy a key version no template uses (crypto-shredding)")
    sub.add_argument("version", type=_positive(int), help="the key version to destroy")
    sub = action("audit-hash", _admin_audit_hash, "the HMAC under which the audit log names a subject")
    sub.add_argument("--subject", required=True, help="the subject id to look up")
    sub.add_argument("--gallery", default="", help="gallery name (default: the daemon's default)")
    return parser


def _connect(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Connection:
    """Explicit files win over a profile; a profile comes from --profile, then FACESEAL_PROFILE."""
    client_class: type[Connection] = args.client_class
    files = (args.ca, args.cert, args.key)
    if any(f is not None for f in files):
        if any(f is None for f in files):
            parser.error("--ca, --cert and --key go together")
        if args.profile:
            parser.error("use either --profile or --ca/--cert/--key, not both")
        return client_class.from_files(
            args.target,
            ca=args.ca,
            cert=args.cert,
            key=args.key,
            timeout=args.timeout,
            server_name=args.server_name,
        )
    profile = args.profile or os.environ.get("FACESEAL_PROFILE")
    if not profile:
        parser.error("no credentials: pass --profile NAME (or set FACESEAL_PROFILE), or --ca, --cert and --key")
    dev_dir = args.dev_dir or os.environ.get("FACESEAL_DEV_DIR") or "dev"
    return client_class.from_profile(
        profile, dev_dir=dev_dir, target=args.target, timeout=args.timeout, server_name=args.server_name
    )


def _fail(args: argparse.Namespace, code: str, message: str) -> int:
    print(f"faceseal: {code}: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({"error": {"code": code, "message": message}}))
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _connect(parser, args) as client:
            output: _Output = args.handler(client, args)
    except FaceSealClientError as err:
        return _fail(args, err.code.name, err.message)
    except (OSError, ValueError) as err:
        # Local trouble (a missing certificate, a malformed encoding file): no RPC was made.
        return _fail(args, "CLIENT_ERROR", str(err))
    print(json.dumps(output.data) if args.json else output.text)
    return output.exit_code


if __name__ == "__main__":
    sys.exit(main())
