"""docker/ without a Docker engine: the compose file is valid under the Compose
Specification's JSON schema; its services, ports, volumes and certificates fit together, the
images built from docker/ and the README's steps; each service mounts only the files it needs
and publishes on the host's loopback only; the images start from Flower's Ubuntu-based tags
of this Flower, install the pinned versions as Flower's user, and the build context leaves
keys and the virtual environment out; the MLflow server, started with the image's own
arguments, answers the compose network's name for it.

Not checked here: building the images and running the compose file (no Docker engine), and
that the base tags exist on Docker Hub. ``FEDCL_CHECK_IMAGES=1`` adds
:func:`test_image_install_steps_resolve`, which resolves each image's pip install steps with
the same pins for the images' Python and platform (it needs the package index)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from importlib.metadata import version
from pathlib import Path

import flwr
import pytest
import yaml
from cryptography import x509

from fedcl.certs import make_federation_certs
from tests.conftest import ROOT, MlflowServer

DOCKER = ROOT / "docker"
NODES = ["supernode-0", "supernode-1", "supernode-2"]


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


def _dockerfile(service: dict) -> str:
    return (ROOT / service["build"]["dockerfile"]).read_text()


def _instructions(text: str) -> list[str]:
    """A Dockerfile's instructions, continuation lines joined, comments left out."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [" ".join(part.strip() for part in instr.split("\\\n"))
            for instr in re.split(r"(?<!\\)\n", "\n".join(lines)) if instr.strip()]


def _entrypoint(text: str) -> list[str]:
    [entry] = [i for i in _instructions(text) if i.startswith("ENTRYPOINT ")]
    return json.loads(entry.removeprefix("ENTRYPOINT "))


def test_images_start_from_flowers_ubuntu_tags_of_this_flower() -> None:
    """PyTorch has wheels for glibc, not for the musl of Flower's Alpine tags (the plain
    `flwr/superlink:1.42.0`): the images use `<flwr>-py<python>-ubuntu24.04`, with this
    Flower's version and the one Python that Flower builds SuperLink images for."""
    services = _compose()["services"]
    for name, image in (("superlink", "superlink"), ("supernode-0", "supernode")):
        text = _dockerfile(services[name])
        args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
        assert args["FLWR_VERSION"] == flwr.__version__
        assert args["PYTHON_VERSION"] == "3.13"
        [base] = re.findall(r"^FROM (\S+)$", text, re.M)
        assert base == (f"flwr/{image}:${{FLWR_VERSION}}-py${{PYTHON_VERSION}}-ubuntu24.04")
        assert "alpine" not in text.lower().replace("alpine-based", "")
        # installed as Flower's user app (uid 49999), who owns /app and the environment
        assert "USER root" not in text
        assert all("--chown=app:app" in i for i in _instructions(text) if i.startswith("COPY"))
    for service in services.values():
        assert service["build"]["context"] == ".."
        assert (ROOT / service["build"]["dockerfile"]).is_file()


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            pins[name] = pinned
    return pins


def test_images_install_the_tested_versions() -> None:
    """Every pip install in the images goes through docker/constraints.txt, which pins torch,
    torchvision, mlflow (and fedcl's other dependencies) to the versions installed here, the
    ones the tests ran with."""
    pins = _constraints()
    assert all(pins.values()), pins  # exact pins only
    for name in ("torch", "torchvision", "mlflow", "mlflow-skinny", "flwr"):
        assert pins[name] == version(name).split("+")[0], name
    for name, pinned in pins.items():
        assert version(name).split("+")[0] == pinned, name
    for dockerfile in DOCKER.glob("*.Dockerfile"):
        installs = [i for i in _instructions(dockerfile.read_text()) if "pip install" in i]
        assert installs, dockerfile.name
        for step in installs:
            assert "constraints.txt" in step, (dockerfile.name, step)


def _pattern_regex(pattern: str) -> str:
    """A .dockerignore pattern as a regular expression: ``**`` any folders, ``*`` and ``?``
    within one name."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def _excluded(path: str, patterns: list[str]) -> bool:
    """Docker's rule for a path of the build context: the last .dockerignore pattern that
    matches the path or one of its parent folders decides (``!`` re-includes)."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!").rstrip("/"))
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negated
    return excluded


def test_build_context_leaves_keys_and_the_environment_out() -> None:
    """.dockerignore: the files the images copy are in the build context, and the
    virtual environment, the certificates and keys, outputs, MLflow stores and git are not."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = set()
    for dockerfile in DOCKER.glob("*.Dockerfile"):
        for step in _instructions(dockerfile.read_text()):
            if step.startswith("COPY "):
                args = [a for a in step.split()[1:] if not a.startswith("--")]
                copied.update(args[:-1])
    assert copied == {"docker/constraints.txt", "pyproject.toml", "README.md", "fedcl",
                      "strategies"}
    for path in copied | {"fedcl/server_app.py", "fedcl/data/mnist/README.md",
                          "strategies/fot.py"}:
        assert not _excluded(path, patterns), path
    for path in (".venv/bin/python", "docker/certs/ca.key", "docker/certs/supernode-0",
                 "docker/data/MNIST", "outputs/run/summary.json", "mlflow.db", "mlruns/0",
                 ".git/HEAD", "tests/test_docker.py", "fedcl/__pycache__/cli.cpython-311.pyc",
                 ".device/site.tar.xz"):
        assert _excluded(path, patterns), path


def test_compose_services_ports_and_networks() -> None:
    """The SuperNodes dial the SuperLink's service name on its port; the SuperLink's and
    MLflow's ports are published on the host's 127.0.0.1 only (the SuperLink's port serves
    its Control API too); the ServerApp logs to MLflow by its service name, which MLflow's
    allowed hosts list."""
    compose = _compose()
    services = compose["services"]
    assert sorted(services) == ["mlflow", "superlink", *NODES]
    link = services["superlink"]
    port = _flags(link)["--port"] if "--port" in _flags(link) else (
        _entrypoint(_dockerfile(link))[_entrypoint(_dockerfile(link)).index("--port") + 1])
    assert _flags(link)["--host"] == "0.0.0.0"  # inside the container: the compose network
    for service in services.values():
        for published in service.get("ports", []):
            assert published.startswith("127.0.0.1:"), published
        assert service["networks"] == ["federation"]
    assert link["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert services["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]
    uri = link["environment"]["MLFLOW_TRACKING_URI"]
    assert uri == "http://mlflow:5000"
    entry = _entrypoint(_dockerfile(services["mlflow"]))
    allowed = entry[entry.index("--allowed-hosts") + 1].split(",")
    assert "mlflow:5000" in allowed and "localhost:5000" in allowed
    pids = []
    for name in NODES:
        node = services[name]
        flags = _flags(node)
        assert flags["--superlink"] == f"superlink:{port}"
        config = dict(kv.split("=", 1) for kv in flags["--node-config"].split())
        pids.append(int(config["partition-id"]))
        assert config["num-partitions"] == str(len(NODES))
        assert node["depends_on"] == ["superlink"]
    assert pids == [0, 1, 2]


def test_each_service_mounts_only_what_it_needs(tmp_path: Path) -> None:
    """The SuperLink mounts its certificate and key and the CA's certificate, nothing else of
    the certificates folder (not the CA's key, not the SuperNodes' keys); each SuperNode
    mounts the CA's certificate and its own key; the flags name the mounted files; the files
    are those the README's `fedcl certs` command writes, and the certificate names the host
    the SuperNodes dial. Named volumes sit on folders the images make as Flower's user, so a
    new volume is that user's."""
    compose = _compose()
    services = compose["services"]
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^fedcl certs docker/certs (.*)$", readme, re.M)
    assert command is not None
    hosts = re.findall(r"--host (\S+)", command.group(1))
    supernodes = int(re.search(r"--supernodes (\d+)", command.group(1)).group(1))
    assert supernodes == len(NODES)
    written = {f.name for f in make_federation_certs(tmp_path, hosts, supernodes)}

    def cert_mounts(service: dict) -> dict[str, str]:
        return {inside: host for inside, host in _mounts(service).items()
                if host.startswith("./certs")}

    link = services["superlink"]
    flags = _flags(link)
    assert "--insecure" not in flags and "--enable-supernode-auth" in flags
    assert cert_mounts(link) == {"/app/certificates/ca.crt": "./certs/ca.crt",
                                 "/app/certificates/server.pem": "./certs/server.pem",
                                 "/app/certificates/server.key": "./certs/server.key"}
    assert {flags["--ssl-ca-certfile"], flags["--ssl-certfile"], flags["--ssl-keyfile"]} == set(
        cert_mounts(link))
    for name in NODES:
        node = services[name]
        node_flags, mounts = _flags(node), cert_mounts(node)
        assert "--insecure" not in node_flags
        assert mounts == {"/app/certificates/ca.crt": "./certs/ca.crt",
                          "/app/certificates/supernode.key": f"./certs/supernode-{name[-1]}"}
        assert node_flags["--root-certificates"] == "/app/certificates/ca.crt"
        assert node_flags["--auth-supernode-private-key"] == "/app/certificates/supernode.key"
    for service in services.values():
        for host in cert_mounts(service).values():
            assert host.removeprefix("./certs/") in written  # a file, not the folder
            assert host != "./certs/ca.key"
    volumes = set()
    for service in services.values():
        text = _dockerfile(service)
        for inside, host in _mounts(service).items():
            if not host.startswith("."):
                volumes.add(host)
                assert re.search(rf"mkdir -p [^\n]*{re.escape(inside)}\b", text), inside
    assert volumes == set(compose["volumes"])
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dialled = _flags(services["supernode-0"])["--superlink"].split(":")[0]
    assert dialled in names.get_values_for_type(x509.DNSName)


def test_readme_gives_the_build_and_run_steps() -> None:
    readme = (ROOT / "README.md").read_text()
    for line in ("sudo chown 49999:49999 docker/certs/server.key docker/certs/supernode-?",
                 "docker compose -f docker/compose.yaml up --build -d superlink mlflow",
                 "for i in 0 1 2; do flwr supernode register docker/certs/supernode-$i.pub "
                 "docker; done",
                 "docker compose -f docker/compose.yaml up --build -d\n",
                 "fedcl submit docker --run-config",
                 "docker compose -f docker/compose.yaml down"):
        assert line in readme, line
    assert ('[superlink.docker]\naddress = "127.0.0.1:8000"\nroot-certificates = "$PWD/'
            'docker/certs/ca.crt"') in readme


@pytest.mark.e2e
def test_mlflow_server_answers_the_compose_name(tmp_path: Path) -> None:
    """The MLflow server started with the image's own --allowed-hosts answers a request
    for Host mlflow:5000 (the SuperLink's tracking URI in the compose network) and refuses
    a Host it does not list, as MLflow does."""
    entry = _entrypoint(_dockerfile(_compose()["services"]["mlflow"]))
    allowed = entry[entry.index("--allowed-hosts") + 1]
    server = MlflowServer(tmp_path / "mlflow")
    server.extra_args = ["--allowed-hosts", allowed]
    server.start()
    try:
        def status(host: str) -> int:
            request = urllib.request.Request(
                f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1",
                headers={"Host": host})
            try:
                with urllib.request.urlopen(request, timeout=30) as resp:
                    return resp.status
            except urllib.error.HTTPError as err:
                return err.code

        assert status("mlflow:5000") == 200
        assert status("localhost:5000") == 200
        assert status("attacker.example:5000") == 403
    finally:
        server.stop()


@pytest.mark.skipif(os.environ.get("FEDCL_CHECK_IMAGES") != "1",
                    reason="resolves the images' installs on the package index: "
                           "FEDCL_CHECK_IMAGES=1")
def test_image_install_steps_resolve(tmp_path: Path) -> None:
    """Each image's pip install steps, resolved by pip (``--dry-run``) in a clean target as
    the image's Python (3.13) on its platform (x86_64, glibc 2.39), wheels only, with the same
    constraints: fedcl's dependencies (from pyproject.toml) and the pinned torch and
    torchvision; and the MLflow image's mlflow for Python 3.11. PyTorch's CPU index is not
    reached from here: torch resolves from the default index at the same version."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    # Ubuntu 24.04's glibc is 2.39: wheels for manylinux 2.17 to 2.39 install there
    platforms = [arg for glibc in range(17, 40)
                 for arg in ("--platform", f"manylinux_2_{glibc}_x86_64")]
    platforms += ["--platform", "manylinux2014_x86_64"]
    for python, requirements in (("3.13", [*deps, "torch", "torchvision"]),
                                 ("3.11", ["mlflow"])):
        res = subprocess.run(
            [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run",
             "--ignore-installed", "--only-binary=:all:", "--python-version", python,
             "--implementation", "cp", *platforms,
             "--target", str(tmp_path / "target"), "--report", str(tmp_path / "report.json"),
             "-c", str(DOCKER / "constraints.txt"), *requirements],
            capture_output=True, text=True, timeout=1200,
            env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        report = json.loads((tmp_path / "report.json").read_text())
        chosen = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                  for item in report["install"]}
        for name, pinned in _constraints().items():
            if name in chosen:
                assert chosen[name] == pinned, (python, name)
