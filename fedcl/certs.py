"""Certificates and keys for a TLS federation (``fedcl certs DIR``).

Writes, with the ``cryptography`` library:

* ``ca.crt`` / ``ca.key``: a self-signed certificate authority (P-384, 1 year);
* ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid for
  the given hosts (IP addresses or DNS names, as subject alternative names);
* ``supernode-<i>`` / ``supernode-<i>.pub`` for each SuperNode: an EC key pair (P-384) in
  OpenSSH format, for Flower's SuperNode authentication (the SuperLink is told the public keys
  with ``flwr supernode register``; the SuperNode signs with ``--auth-supernode-private-key``).

The SuperLink serves TLS with ``--ssl-ca-certfile ca.crt --ssl-certfile server.pem
--ssl-keyfile server.key``; SuperNodes and ``flwr`` verify it with ``ca.crt``
(``--root-certificates`` / ``root-certificates``). Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 365


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcl federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    if private:
        os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def make_federation_certs(out_dir: str | os.PathLike[str], hosts: list[str],
                          supernodes: int = 0) -> list[Path]:
    """Write the CA, the SuperLink's certificate for ``hosts`` and ``supernodes`` key pairs
    into ``out_dir``; returns the files written."""
    if not hosts:
        raise ValueError("give at least one host name or address for the SuperLink")
    if supernodes < 0:
        raise ValueError(f"supernodes must be 0 or more, got {supernodes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("fedcl CA"))
               .issuer_name(_name("fedcl CA")).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                            crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (x509.CertificateBuilder().subject_name(_name(hosts[0]))
                   .issuer_name(ca_cert.subject).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
                   .add_extension(_san(hosts), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID
                                                         .SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA384()))
    pem = serialization.Encoding.PEM
    files = [_write(out / "ca.crt", ca_cert.public_bytes(pem)),
             _write(out / "ca.key", _pem_key(ca_key), private=True),
             _write(out / "server.pem", server_cert.public_bytes(pem)),
             _write(out / "server.key", _pem_key(server_key), private=True)]
    for i in range(supernodes):
        key = ec.generate_private_key(ec.SECP384R1())
        files.append(_write(out / f"supernode-{i}", key.private_bytes(
            pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
            private=True))
        files.append(_write(out / f"supernode-{i}.pub", key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"))
    return files
