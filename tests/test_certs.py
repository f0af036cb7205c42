"""`fedcl certs`: the SuperLink certificate chains to the CA and names the hosts; private keys
are private; SuperNode keys are OpenSSH EC keys."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcl.cli import main


def test_certs_chain_hosts_and_keys(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "certs"
    assert main(["certs", str(out), "--host", "10.0.0.5", "--host", "link.example",
                 "--supernodes", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote 8 files to {out}: ca.crt, ca.key")
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert san.get_values_for_type(x509.DNSName) == ["link.example"]
    key = serialization.load_pem_private_key((out / "server.key").read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    for name in ("ca.key", "server.key", "supernode-0", "supernode-1"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    for i in range(2):
        private = serialization.load_ssh_private_key((out / f"supernode-{i}").read_bytes(), None)
        public = serialization.load_ssh_public_key((out / f"supernode-{i}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.public_key().public_numbers() == public.public_numbers()


def test_certs_errors_are_one_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "file").write_text("x")
    assert main(["certs", str(tmp_path / "file" / "sub")]) == 1
    err = capsys.readouterr().err
    assert err == f"fedcl: error: cannot write certificates to {tmp_path / 'file' / 'sub'}: " \
                  "Not a directory\n"
    assert main(["certs", str(tmp_path / "c"), "--supernodes", "-1"]) == 2
    assert capsys.readouterr().err == "fedcl: error: --supernodes must be 0 or more, got -1\n"
