"""Throw-away credentials for the internal hops: a CA, a server certificate, a client certificate
and a random shared secret, written as files into one private folder.

`make run` (the supervisor) and the test and bench stacks (launch.py) make a fresh set per run, so
the gateway's calls to the tokenizer and model services are encrypted and authenticated by default
with nothing to configure. A deployment brings its own (see deploy/k8s).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Credentials:
    """Paths of PEM files and of the shared-secret file (one token a line)."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    token_file: str

    def server_flags(self) -> list[str]:
        """What the tokenizer and model services are started with: TLS with client certificates
        required, and the shared secret."""
        return ["--tls-cert", self.server_cert, "--tls-key", self.server_key, "--tls-client-ca", self.ca,
                "--auth-tokens-file", self.token_file]

    def client_flags(self) -> list[str]:
        """What the gateway is started with to call them."""
        return ["--internal-tls-ca", self.ca, "--internal-tls-cert", self.client_cert,
                "--internal-tls-key", self.client_key, "--internal-token-file", self.token_file]


def make_credentials(directory: str, server_names: tuple[str, ...] = LOOPBACK_NAMES,
                     days: int = 30) -> Credentials:
    """Writes a new CA, a server certificate for `server_names` (DNS names or IP addresses), a
    client certificate and a 256-bit secret into `directory` (made private: 0700, files 0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days))

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer).public_key(public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(valid[0]).not_valid_after(valid[1]))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (builder("genrpc internal CA", name("genrpc internal CA"), ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def issue(cn: str, usage, san: list | None = None):
        key = ec.generate_private_key(ec.SECP256R1())
        b = builder(cn, ca.subject, key.public_key()).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False)
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, b.sign(ca_key, hashes.SHA256())

    san = []
    for n in server_names:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            san.append(x509.DNSName(n))
    server_key, server_cert = issue(server_names[0], ExtendedKeyUsageOID.SERVER_AUTH, san)
    client_key, client_cert = issue("genrpc gateway", ExtendedKeyUsageOID.CLIENT_AUTH)

    def write(label: str, data: bytes) -> str:
        path = os.path.join(directory, label)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path

    def cert_pem(cert) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    return Credentials(
        ca=write("ca.pem", cert_pem(ca)),
        server_cert=write("server.pem", cert_pem(server_cert)), server_key=write("server.key", key_pem(server_key)),
        client_cert=write("client.pem", cert_pem(client_cert)), client_key=write("client.key", key_pem(client_key)),
        token_file=write("internal-token", (secrets.token_urlsafe(32) + "\n").encode()),
    )
