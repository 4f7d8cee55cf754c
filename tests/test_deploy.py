"""deploy/: what can be checked without Docker or Kubernetes -- YAML that parses and validates, shell scripts
that pass shellcheck and run, systemd units that `systemd-analyze verify` accepts, TLS everywhere, no secrets."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SCRIPTS = sorted(DEPLOY.rglob("*.sh"))
K8S_VERSION = "1.30.0"
# What a committed file may never hold: a password in a URL, a private key, a password assignment with a value.
SECRET = re.compile(r"://[^/\s:@]+:[^@\s]+@|-----BEGIN [A-Z ]*PRIVATE KEY-----|(?i:password)\s*[:=]\s*['\"]?[A-Za-z0-9]{6,}")


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml"))


def test_every_yaml_file_parses():
    assert _yaml_files(), "deploy/ holds no YAML"
    for path in _yaml_files():
        assert list(yaml.safe_load_all(path.read_text())), path


def test_no_secret_is_committed_under_deploy():
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        text = path.read_text()
        assert not SECRET.search(text), f"{path}: {SECRET.search(text).group(0)!r}"


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())


def test_compose_has_the_services_and_every_dask_connection_uses_tls():
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"postgres", "migrate", "dask-scheduler", "dask-worker", "runner"}
    scheduler = services["dask-scheduler"]["command"]
    assert scheduler[:4] == ["dask", "scheduler", "--protocol", "tls"]
    worker = services["dask-worker"]["command"]
    assert worker[2] == "tls://dask-scheduler:8786"
    for command in (scheduler, worker):
        assert {"--tls-ca-file", "--tls-cert", "--tls-key"} <= set(command)
    gpu = services["dask-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert worker[worker.index("--nthreads") + 1] == "1" and worker[worker.index("--resources") + 1] == "GPU=1"
    runner = services["runner"]
    assert runner["environment"]["DEFECTSCAN_CLUSTER__SCHEDULER"].startswith("tls://")
    assert runner["environment"]["DEFECTSCAN_CLUSTER__TLS__KEY_FILE"] == "/run/secrets/dask_key"
    # Passwords only through secrets files: the database password file and the pgpass file.
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert runner["environment"]["PGPASSFILE"] == "/run/secrets/pgpass"
    assert set(compose["secrets"]) == {"postgres_password", "pgpass", "dask_ca", "dask_cert", "dask_key"}
    env_example = (DEPLOY / "compose" / "defectscan.env.example").read_text()
    assert "DEFECTSCAN_DATABASE_URL=postgresql://defectscan@postgres:5432/defectscan" in env_example
    assert {"defectscan.env", "secrets/"} <= set((DEPLOY / "compose" / ".gitignore").read_text().split())


def test_kubernetes_manifests_validate_and_the_dask_cluster_uses_tls_and_gpus():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate to check against the schemas")
    documents = [d for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")) for d in yaml.safe_load_all(path.read_text())]
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == ["DaskCluster", "Namespace", "NetworkPolicy", "PersistentVolumeClaim", "Secret", "Secret"]
    for document in documents:
        if document["kind"] != "DaskCluster":
            kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    [cluster] = [d for d in documents if d["kind"] == "DaskCluster"]
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1"
    # A custom resource has no schema here: its pod and service specs are checked as what they become.
    scheduler, worker = cluster["spec"]["scheduler"], cluster["spec"]["worker"]
    for name, pod in (("scheduler", scheduler["spec"]), ("worker", worker["spec"])):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": pod}, K8S_VERSION, strict=True)
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": scheduler["service"]}, K8S_VERSION, strict=True)
    scheduler_args = scheduler["spec"]["containers"][0]["args"]
    worker_container = worker["spec"]["containers"][0]
    assert scheduler_args[:4] == ["dask", "scheduler", "--protocol", "tls"]
    assert worker_container["args"][2].startswith("tls://defectscan-scheduler.")
    assert worker_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for args in (scheduler_args, worker_container["args"]):
        assert {"--tls-ca-file", "--tls-cert", "--tls-key"} <= set(args)


def test_dockerfile_builds_cpu_and_gpu_targets_as_a_non_root_user():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    targets = re.findall(r"^FROM \S+ AS (\w+)$", text, re.MULTILINE)
    assert targets == ["build", "cpu", "gpu"]
    assert re.findall(r"^USER (\S+)$", text, re.MULTILINE)[-1] == "10001:10001"
    assert "tensorflow[and-cuda]" in text.split("AS gpu", 1)[1]
    assert "ENTRYPOINT [\"tini\", \"--\"]" in text
    # Every path the build copies is let through the ignore file.
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().split()
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for item in source.split():
            assert f"!{item.rstrip('/')}" in ignore or f"!{item.rstrip('/')}/" in ignore, item


def test_deployed_dask_workers_get_the_settings_a_local_cluster_gives_its_workers():
    """The container image and the systemd worker unit set WORKER_CONFIG as DASK_ environment variables, each value as it is there."""
    from defectscan.pipeline.cluster import WORKER_CONFIG

    expected = {"DASK_" + key.upper().replace(".", "__").replace("-", "_"): str(value) for key, value in WORKER_CONFIG.items()}
    for path in (DEPLOY / "docker" / "Dockerfile", DEPLOY / "systemd" / "defectscan-dask-worker@.service"):
        found = dict(re.findall(r"\b(DASK_DISTRIBUTED__[A-Z_]+)=(\S+?)(?=\s|\\|$)", path.read_text()))
        assert {name: found.get(name) for name in expected} == expected, path.name


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_scripts_pass_shellcheck():
    assert SCRIPTS
    result = subprocess.run(["shellcheck", "--shell=sh", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_make_certs_writes_a_ca_and_a_certificate_for_the_given_names(tmp_path):
    out = tmp_path / "tls"
    subprocess.run(["/bin/sh", str(DEPLOY / "tls" / "make-certs.sh"), str(out), "dask-scheduler", "10.1.2.3"], check=True, capture_output=True)
    assert subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "tls.crt")], capture_output=True, text=True).stdout.strip() == f"{out / 'tls.crt'}: OK"
    san = subprocess.run(["openssl", "x509", "-in", str(out / "tls.crt"), "-noout", "-ext", "subjectAltName"], capture_output=True, text=True, check=True).stdout
    assert "DNS:dask-scheduler, IP Address:10.1.2.3" in san
    assert (out / "tls.key").stat().st_mode & 0o077 == 0 and (out / "ca.key").stat().st_mode & 0o077 == 0
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "ca.key", "tls.crt", "tls.key"]
    usage = subprocess.run(["/bin/sh", str(DEPLOY / "tls" / "make-certs.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("usage:")


def test_compose_make_secrets_is_idempotent(tmp_path):
    compose = tmp_path / "compose"
    compose.mkdir()
    shutil.copy(DEPLOY / "compose" / "make-secrets.sh", compose)
    for _ in range(2):
        subprocess.run(["/bin/sh", str(compose / "make-secrets.sh")], check=True, capture_output=True)
    password = (compose / "secrets" / "postgres_password").read_text().strip()
    assert len(password) == 48
    assert (compose / "secrets" / "pgpass").read_text() == f"postgres:5432:defectscan:defectscan:{password}\n"
    assert (compose / "secrets" / "pgpass").stat().st_mode & 0o077 == 0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_units_pass_systemd_analyze_verify(tmp_path):
    # The units name /opt/defectscan/bin/...; verify checks that the executables exist, so point them at this venv.
    venv_bin = f"{Path(sys.executable).parent}/"
    units = []
    for path in sorted((DEPLOY / "systemd").glob("*.service")):
        name = path.name.replace("@.service", "@0.service")
        target = tmp_path / name
        target.write_text(path.read_text().replace("/opt/defectscan/bin/", venv_bin))
        units.append(str(target))
        assert "--tls-ca-file /etc/defectscan/tls/ca.crt" in path.read_text()
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if "defectscan" in line], result.stderr
