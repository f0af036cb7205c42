"""docker/: the compose file's services, ports, volumes and certificates fit together, match
the images built from docker/ and the README's steps, and the file is valid under the Compose
Specification's JSON schema (no Docker engine needed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import flwr
import yaml
from cryptography import x509

from fedcl.certs import make_federation_certs
from tests.conftest import ROOT

DOCKER = ROOT / "docker"


def _check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema against the Compose Specification's JSON schema (vendored by it)."""
    return subprocess.run([str(Path(sys.executable).parent / "check-jsonschema"),
                           "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_compose_file_is_valid_under_the_compose_specification(tmp_path: Path) -> None:
    """The Compose Specification's schema accepts the file, and the same check refuses a copy
    with a misspelt key (so it does look at the services)."""
    ok = _check_compose_schema(DOCKER / "compose.yaml")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "validation done" in ok.stdout
    text = (DOCKER / "compose.yaml").read_text()
    assert "    ports:" in text
    (tmp_path / "compose.yaml").write_text(text.replace("    ports:", "    portz:", 1))
    bad = _check_compose_schema(tmp_path / "compose.yaml")
    assert bad.returncode == 1
    assert "'portz' was unexpected" in bad.stdout


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _flags(service: dict) -> dict[str, str]:
    return dict(arg.split("=", 1) if "=" in arg else (arg, "") for arg in service["command"])


def _mounts(service: dict) -> dict[str, str]:
    """container path -> host path or volume name"""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def test_compose_services_images_and_ports() -> None:
    compose = _compose()
    services = compose["services"]
    assert sorted(services) == ["mlflow", "superlink", "supernode-0", "supernode-1",
                                "supernode-2"]
    for name, service in services.items():
        dockerfile = ROOT / service["build"]["dockerfile"]
        assert service["build"]["context"] == ".." and dockerfile.is_file(), name
    version = flwr.__version__
    for name, image in (("superlink", "superlink"), ("supernode-0", "supernode")):
        text = (ROOT / services[name]["build"]["dockerfile"]).read_text()
        assert f"FROM flwr/{image}:{version}" in text  # Flower's own image, this Flower
        assert "pip install --no-cache-dir /app/fedcl" in text
    link = services["superlink"]
    port = re.search(r'"--port", "(\d+)"',
                     (ROOT / link["build"]["dockerfile"]).read_text()).group(1)
    assert link["ports"] == [f"{port}:{port}"]
    assert services["mlflow"]["ports"] == ["5000:5000"]
    assert link["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    pids = []
    for i in range(3):
        node = services[f"supernode-{i}"]
        flags = _flags(node)
        assert flags["--superlink"] == f"superlink:{port}"
        config = dict(kv.split("=", 1) for kv in flags["--node-config"].split())
        pids.append(int(config["partition-id"]))
        assert config["num-partitions"] == "3"
        assert node["depends_on"] == ["superlink"]
    assert pids == [0, 1, 2]


def test_compose_tls_volumes_and_certificates(tmp_path: Path) -> None:
    """The SuperLink serves the certificate `fedcl certs` writes for the host name the
    SuperNodes dial, and every SuperNode verifies it with the CA; declared volumes are used."""
    compose = _compose()
    services = compose["services"]
    link = services["superlink"]
    flags, mounts = _flags(link), _mounts(link)
    assert mounts["/certs"] == "./certs"
    assert {flags["--ssl-ca-certfile"], flags["--ssl-certfile"], flags["--ssl-keyfile"]} == {
        "/certs/ca.crt", "/certs/server.pem", "/certs/server.key"}
    assert "--insecure" not in flags
    assert "--enable-supernode-auth" in flags
    used = set()
    for name, service in services.items():
        for host in _mounts(service).values():
            if not host.startswith("."):
                used.add(host)
        if name.startswith("supernode"):
            node_flags, node_mounts = _flags(service), _mounts(service)
            assert node_flags["--root-certificates"] == "/certs/ca.crt"
            assert node_mounts["/certs/ca.crt"] == "./certs/ca.crt"
            assert "--insecure" not in node_flags
            # each SuperNode signs in with its own key from `fedcl certs --supernodes 3`
            key = node_mounts[node_flags["--auth-supernode-private-key"]]
            assert key == f"./certs/supernode-{name.split('-')[1]}"
    assert used == set(compose["volumes"])
    # the README's certificate command, run for real: the certificate names the SuperLink
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^fedcl certs docker/certs (.*)$", readme, re.M)
    assert command is not None
    hosts = re.findall(r"--host (\S+)", command.group(1))
    supernodes = int(re.search(r"--supernodes (\d+)", command.group(1)).group(1))
    assert supernodes == len([n for n in services if n.startswith("supernode")])
    make_federation_certs(tmp_path, hosts, supernodes)
    assert (tmp_path / "supernode-2").is_file()
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dialled = _flags(services["supernode-0"])["--superlink"].split(":")[0]
    assert dialled in names.get_values_for_type(x509.DNSName)


def test_readme_gives_the_build_and_run_steps() -> None:
    readme = (ROOT / "README.md").read_text()
    for line in ("docker compose -f docker/compose.yaml up --build -d superlink mlflow",
                 "for i in 0 1 2; do flwr supernode register docker/certs/supernode-$i.pub "
                 "docker; done",
                 "docker compose -f docker/compose.yaml up --build -d\n",
                 "flwr run . docker --stream",
                 "docker compose -f docker/compose.yaml down"):
        assert line in readme, line
    assert '[superlink.docker]\naddress = "127.0.0.1:8000"\nroot-certificates = ' in readme
