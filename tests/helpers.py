"""Small helpers for tests against live services."""

from __future__ import annotations

import datetime
import time
import urllib.request


def metric(port: int, name: str, labels: dict | None = None) -> float:
    """The value of one Prometheus sample from a service's /metrics (0 when absent)."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in body.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if labels and not all(f'{k}="{v}"' in head for k, v in labels.items()):
            continue
        total += float(value)
    return total


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> float:
    """Polls until predicate() is true; returns the seconds it took, fails after `timeout`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
    return time.monotonic() - started


def make_certificates(directory) -> dict:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = key()
    ca = (x509.CertificateBuilder().subject_name(name("genrpc test CA")).issuer_name(name("genrpc test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def issue(cn, san=None):
        k = key()
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                   .public_key(k.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=1))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return k, builder.sign(ca_key, hashes.SHA256())

    server_key, server_cert = issue("localhost", [x509.DNSName("localhost"),
                                                  x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_key, client_cert = issue("genrpc test client")
    files = {}
    for label, obj in [("ca", ca), ("server_cert", server_cert), ("client_cert", client_cert)]:
        files[label] = str(directory / f"{label}.pem")
        with open(files[label], "wb") as f:
            f.write(obj.public_bytes(serialization.Encoding.PEM))
    for label, k in [("server_key", server_key), ("client_key", client_key)]:
        files[label] = str(directory / f"{label}.pem")
        with open(files[label], "wb") as f:
            f.write(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return files
