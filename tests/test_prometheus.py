"""A real Prometheus scrapes a real daemon; promtool checks the exposition and deploy/prometheus.

* A Prometheus server (the Debian ``prometheus`` binary, on loopback, a free port, a throwaway
  config and TSDB, 1 s scrapes) scrapes an in-process daemon; after a known sequence of calls its
  HTTP API must report exactly those calls per method and code, the match decisions, and a finite
  Match p99. The same server loads deploy/prometheus/faceseal.rules.yml and runs every query of
  the Grafana dashboard, so rules and dashboard are checked against live data.
* ``promtool check metrics`` accepts the daemon's exposition text without a single remark.
* ``promtool check config``, ``check rules`` and ``test rules`` pass on deploy/prometheus.
* Every metric the dashboard and the alert rules name exists in the daemon's exposition.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import InProcessDaemon, free_port, nearby, poll, random_encodings
from prometheus_client.parser import text_string_to_metric_families
from requirements import missing

from faceseal.client import InvalidArgumentError, PermissionDeniedError

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "faceseal.rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "tests" / "faceseal.rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "faceseal.json"
INSTALL = "apt-get install prometheus (or run scripts/install-test-deps.sh as root)"
SERVICE = "faceseal.v1.FaceSealService"
JOB = "faceseal"
MATCH_P99 = 'histogram_quantile(0.99, sum by (le) (rate(grpc_server_handling_seconds_bucket{grpc_method="Match"}[1m])))'
# Series Prometheus makes up itself rather than scraping.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# What the dashboard must at least show (the list of main panels).
DASHBOARD_METRICS = {
    "grpc_server_handled_total",
    "grpc_server_handling_seconds_bucket",
    "faceseal_match_decisions_total",
    "faceseal_auth_denied_total",
    "faceseal_guard_rejections_total",
    "faceseal_integrity_failures_total",
    "faceseal_sealed",
    "faceseal_templates",
    "faceseal_key_versions",
}
ALERTS = {
    "FacesealIntegrityFailure",
    "FacesealSealed",
    "FacesealDeniedCallersSpike",
    "FacesealSubjectLockouts",
    "FacesealMatchLatencyHigh",
    "FacesealAuditWriteFailures",
    "FacesealDown",
}


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing("Prometheus", INSTALL)
        raise AssertionError("unreachable")
    return path


# ------------------------------------------------------------------------------- the daemon side


def scrape(daemon: InProcessDaemon) -> str:
    assert daemon.daemon is not None
    assert daemon.daemon.metrics_port
    url = f"http://127.0.0.1:{daemon.daemon.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode("utf-8")
        return text


def exposed_names(text: str) -> set[str]:
    """Every series name in an exposition: counters with _total, histograms with their suffixes."""
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


# ---------------------------------------------------------------------------- PromQL metric names

_TOKEN = re.compile(r"\d[\w.+-]*|[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
_KEYWORDS |= {"and", "or", "unless", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana ``label_values(...)`` query) selects.

    Not a PromQL parser, but enough for our queries: strings, label matchers, ranges, label lists
    of by/without/on/ignoring, Grafana variables and function names are removed; what is left are
    metric names.
    """
    variable = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", expr, re.DOTALL)
    if variable:
        expr = variable.group(1)
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    names = set()
    for token in _TOKEN.finditer(s):
        word = token.group()
        if word[0].isdigit() or word.lower() in _KEYWORDS or s[token.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def test_metric_names_reads_our_kind_of_query() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{x="b c", y=~"$v"}[$__rate_interval])))'
        " / on (job) group_left () sum without (reason) (b_total offset 15m) > bool 0.05"
        " or c unless d{e='f'}"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d"}
    assert metric_names('label_values(faceseal_sealed{job=~"$job"}, instance)') == {"faceseal_sealed"}
    assert metric_names("max(up)") == {"up"}


# ------------------------------------------------------------------------------------- dashboard


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside a collapsed row


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """The PromQL of every panel target and every query variable."""
    queries = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def test_dashboard_is_valid_json_with_a_templated_datasource() -> None:
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    templated = {"type": "prometheus", "uid": "${datasource}"}
    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel.get("title"), panel
        assert panel["datasource"] == templated, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == templated, panel["title"]
            assert target["expr"].strip(), panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == templated, variable["name"]
    used = set().union(*(metric_names(q) for q in dashboard_queries(dashboard)))
    assert used >= DASHBOARD_METRICS, f"the dashboard lacks panels for {DASHBOARD_METRICS - used}"


def test_dashboard_metrics_exist_in_the_exposition(daemon: InProcessDaemon) -> None:
    """The dashboard and the daemon cannot drift: every name a query uses is exported."""
    exposed = exposed_names(scrape(daemon)) | SYNTHETIC
    for query in dashboard_queries(_dashboard()):
        names = metric_names(query)
        assert names, f"no metric in dashboard query {query!r}"
        assert names <= exposed, f"dashboard query {query!r} uses unexported {names - exposed}"


# ---------------------------------------------------------------------------------------- promtool


def _promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_binary("promtool"), *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_check_metrics_accepts_the_exposition(daemon: InProcessDaemon) -> None:
    enroller, gateway = daemon.client("enroller"), daemon.client("gateway")
    (alice,) = random_encodings(1, seed=1800)
    enroller.enroll("alice", alice)
    assert gateway.match("alice", alice).match is True
    assert gateway.identify(alice)
    result = _promtool("check", "metrics", stdin=scrape(daemon))
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    assert output == "", f"promtool check metrics has remarks:\n{output}"


def test_promtool_check_config() -> None:
    result = _promtool("check", "config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout, result.stdout


def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(ALERTS)} rules found" in result.stdout, result.stdout


def test_promtool_test_rules() -> None:
    result = _promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout
    # Every alert has its unit tests (firing and not firing cases are in the file's groups).
    tested = set(re.findall(r"alertname:\s*(\w+)", RULE_TESTS.read_text(encoding="utf-8")))
    assert tested == ALERTS, f"alerts without unit tests: {ALERTS - tested}"


# ------------------------------------------------------------------------------ a real Prometheus


class Prometheus:
    """``prometheus`` on 127.0.0.1 and a free port, with its own config and TSDB in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.binary = _binary("prometheus")
        self.workdir = workdir
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def start(self, target: str) -> Prometheus:
        config = {  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        for _attempt in range(5):
            self.port = free_port()
            offset = len(self.log())
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    [
                        self.binary,
                        f"--config.file={config_path}",
                        f"--storage.tsdb.path={self.workdir / 'data'}",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            if poll("Prometheus to become ready or exit", self._ready, deadline=30) == "ready":
                return self
            self.proc = None
            if "address already in use" not in self.log()[offset:]:
                raise AssertionError(f"prometheus exited at start; its log:\n{self.log()}")
        raise AssertionError("could not find a free port for prometheus")

    def _ready(self) -> str | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            return "exited"
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:  # noqa: S310
                return "ready" if response.status == 200 else None
        except urllib.error.HTTPError as err:  # 503 while starting
            err.close()
            return None
        except OSError:
            return None

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:  # noqa: S310
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query, evaluated now or at ``at`` (a Unix time in seconds)."""
        data = self.api("query", query=expr) if at is None else self.api("query", query=expr, time=f"{at:.3f}")
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def scalar(self, expr: str, at: float | None = None) -> float | None:
        """The value of a one-element result; None when the result is empty."""
        result = self.query(expr, at)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def prometheus(daemon: InProcessDaemon, tmp_path: Path) -> Iterator[Prometheus]:
    """A Prometheus scraping ``daemon`` every second, after its first successful scrape."""
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    server = Prometheus(workdir)
    assert daemon.daemon is not None
    assert daemon.daemon.metrics_port
    try:
        server.start(f"127.0.0.1:{daemon.daemon.metrics_port}")
        poll(
            "Prometheus's first scrape of the daemon",
            lambda: server.scalar(f'up{{job="{JOB}"}}') == 1 or None,
            deadline=20,
        )
        yield server
    finally:
        server.stop()


def wait_for_scrape_after(prometheus: Prometheus, moment: float) -> float:
    """Until Prometheus holds a successful scrape that started after ``moment`` (a time.time()
    value); returns that scrape's timestamp.

    Successful: a failed scrape (a 1 s timeout on a loaded machine) also records ``up``, as 0,
    but marks every scraped series stale, so queries would find nothing. The timestamp and the
    ``up == 1`` come from one query, hence from the same scrape. Query at the returned time to
    see that scrape's data even if a later scrape fails. Prometheus may shift a scrape's
    timestamp by up to 2 ms to align it; hence the margin.
    """

    def succeeded_after() -> float | None:
        stamp = prometheus.scalar(f'timestamp(up{{job="{JOB}"}}) and up{{job="{JOB}"}} == 1')
        return stamp if stamp is not None and stamp > moment + 0.05 else None

    return poll("a successful scrape after the calls", succeeded_after, deadline=20)


def _by(result: list[dict[str, Any]], *labels: str) -> dict[tuple[str, ...], int]:
    out = {}
    for item in result:
        key = tuple(item["metric"][label] for label in labels)
        assert key not in out, f"two series for {key}"
        number = float(item["value"][1])
        assert number == int(number), item
        out[key] = int(number)
    return out


def test_prometheus_counts_exactly_the_calls_made(daemon: InProcessDaemon, prometheus: Prometheus) -> None:
    enroller, gateway = daemon.client("enroller"), daemon.client("gateway")
    people = random_encodings(5, seed=1801)
    for i, encoding in enumerate(people):
        enroller.enroll(f"subject-{i}", encoding)  # 5 x Enroll OK
    assert gateway.match("subject-0", people[0]).match is True  # 3 x Match OK: 2 match, 1 no_match
    assert gateway.match("subject-1", nearby(people[1], 0.3, seed=1802)).match is True
    assert gateway.match("subject-2", people[3]).match is False
    for _ in range(2):  # 2 x Match PERMISSION_DENIED: the enroller may not match
        with pytest.raises(PermissionDeniedError):
            enroller.match("subject-0", people[0])
    with pytest.raises(InvalidArgumentError):  # 1 x Enroll INVALID_ARGUMENT: wrong dimension
        enroller.enroll("subject-5", random_encodings(1, seed=1803, dim=64)[0])
    assert [c.subject_id for c in gateway.identify(people[4], top_k=3)] == ["subject-4"]  # 1 x Identify
    at = wait_for_scrape_after(prometheus, time.time())

    ours = f'job="{JOB}", grpc_service="{SERVICE}"'
    handled = _by(prometheus.query(f"grpc_server_handled_total{{{ours}}}", at), "grpc_method", "grpc_code")
    assert handled == {
        ("Enroll", "OK"): 5,
        ("Enroll", "INVALID_ARGUMENT"): 1,
        ("Match", "OK"): 3,
        ("Match", "PERMISSION_DENIED"): 2,
        ("Identify", "OK"): 1,
        ("Delete", "OK"): 0,  # zero-initialised, never called
        ("BulkEnroll", "OK"): 0,
        ("IdentifyBatch", "OK"): 0,
    }
    started = _by(prometheus.query(f"grpc_server_started_total{{{ours}}}", at), "grpc_method")
    assert started == {
        ("Enroll",): 6,
        ("Match",): 5,
        ("Identify",): 1,
        ("Delete",): 0,
        ("BulkEnroll",): 0,
        ("IdentifyBatch",): 0,
    }
    latencies = _by(prometheus.query(f"grpc_server_handling_seconds_count{{{ours}}}", at), "grpc_method")
    assert latencies == started

    decisions = _by(prometheus.query(f'faceseal_match_decisions_total{{job="{JOB}"}}', at), "gallery", "decision")
    assert decisions == {("faces", "match"): 2, ("faces", "no_match"): 1}
    denied = _by(prometheus.query(f'faceseal_auth_denied_total{{job="{JOB}"}}', at), "reason")
    assert denied == {
        ("unknown_identity",): 0,
        ("no_permission",): 2,
        ("gallery_not_allowed",): 0,
        ("revoked",): 0,
        ("expired",): 0,
    }
    assert prometheus.scalar(f'faceseal_templates{{job="{JOB}", gallery="faces"}}', at) == 5

    p99 = prometheus.scalar(MATCH_P99, at)
    assert p99 is not None, "no Match latency series"
    assert math.isfinite(p99), f"Match p99 is {p99}"
    assert 0 < p99 <= 10


def _rules(prometheus: Prometheus) -> list[dict[str, Any]]:
    groups = prometheus.api("rules")["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _evaluated(prometheus: Prometheus) -> list[dict[str, Any]] | None:
    rules = _rules(prometheus)
    return rules if rules and all(r["health"] != "unknown" for r in rules) else None


def test_rules_and_dashboard_work_on_live_data(daemon: InProcessDaemon, prometheus: Prometheus) -> None:
    enroller, gateway = daemon.client("enroller"), daemon.client("gateway")
    (alice,) = random_encodings(1, seed=1804)
    enroller.enroll("alice", alice)
    assert gateway.match("alice", alice).match is True
    with pytest.raises(PermissionDeniedError):
        enroller.match("alice", alice)
    # Two scrapes: a status code's series is born at its first call, and rate() needs two samples.
    wait_for_scrape_after(prometheus, time.time())
    at = wait_for_scrape_after(prometheus, time.time())
    exposed = exposed_names(scrape(daemon)) | SYNTHETIC

    # The rules file loads, every rule evaluates without error and names only exported series.
    rules = poll("Prometheus to evaluate the rules", lambda: _evaluated(prometheus), deadline=20)
    assert {r["name"] for r in rules} == ALERTS
    for rule in rules:
        assert rule["type"] == "alerting", rule["name"]
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
        names = metric_names(rule["query"])
        assert names, rule["name"]
        assert names <= exposed, f"{rule['name']} uses unexported {names - exposed}"
        assert rule["labels"].get("severity") in ("critical", "warning"), rule["name"]
        assert set(rule["annotations"]) >= {"summary", "description"}, rule["name"]
        for text in rule["annotations"].values():
            # Annotations may name where (instance, gallery) and which fixed reason, never who.
            used = set(re.findall(r"\$labels\.(\w+)", text))
            assert used <= {"instance", "job", "gallery", "reason", "scope"}, (rule["name"], used)
    # Nothing is wrong with this daemon, so nothing fires: a real check for the rules without a
    # ``for`` (integrity and audit-write failures), which fire as soon as their expression holds.
    alerts = prometheus.api("alerts")["alerts"]
    assert [a for a in alerts if a["state"] == "firing"] == [], alerts
    # Nor is any about to, except where a loaded test machine is the cause, not the daemon: one
    # Match over 50 ms makes FacesealMatchLatencyHigh pending, one scrape over the 1 s timeout
    # FacesealDown. Their "for" (5m, 1m) keeps them from firing during this test; what they
    # compute is checked by promtool test rules.
    pending = {a["labels"]["alertname"] for a in alerts if a["state"] == "pending"}
    assert pending <= {"FacesealMatchLatencyHigh", "FacesealDown"}, alerts

    # Every dashboard query runs on real data: it parses, and it selects series.
    variables = {
        "$__rate_interval": "1m",
        "$__range": "5m",
        "$__interval": "1s",
        "$job": JOB,
        "$instance": ".+",
        "$gallery": ".+",
    }
    for query in dashboard_queries(_dashboard()):
        if query.startswith("label_values("):
            continue  # a Grafana function, not PromQL; its metric is checked by name above
        expr = query
        for name in sorted(variables, key=len, reverse=True):
            expr = expr.replace(name, variables[name])
        assert "$" not in expr, f"unknown variable in {query!r}"
        assert prometheus.query(expr, at), f"dashboard query selects nothing: {expr}"
