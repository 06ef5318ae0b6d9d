"""router/server.tls_pair: what `serve` checks of --tls-cert / --tls-key before any worker starts. It
refuses what gRPC cannot serve (one file alone, a mismatched pair, an encrypted key: before, OpenSSL
asked for its passphrase on the terminal and serve hung) and accepts what gRPC serves (a 1024-bit RSA
pair, which Python's default security level would refuse). Certificates made with the openssl CLI."""
import subprocess

import pytest

from pdcluster.router.server import tls_pair


def pair(d, name, bits=2048, passphrase=None):
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    enc = ["-passout", f"pass:{passphrase}"] if passphrase else ["-nodes"]
    subprocess.run(["openssl", "req", "-x509", "-newkey", f"rsa:{bits}", *enc, "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def test_what_grpc_serves_passes_and_what_it_cannot_is_refused_in_words(tmp_path):
    cert, key = pair(tmp_path, "ok")
    k, c = tls_pair(cert, key)
    assert k.startswith(b"-----BEGIN PRIVATE KEY") and c.startswith(b"-----BEGIN CERTIFICATE")
    weak = pair(tmp_path, "weak", bits=1024)
    assert tls_pair(*weak)[1].startswith(b"-----BEGIN CERTIFICATE")
    with pytest.raises(ValueError, match="TLS needs both --tls-cert and --tls-key"):
        tls_pair(cert, None)
    with pytest.raises(ValueError, match="not a matching PEM certificate and private key"):
        tls_pair(cert, weak[1])
    with pytest.raises(ValueError, match="--tls-key is encrypted"):
        tls_pair(*pair(tmp_path, "enc", passphrase="secret-phrase"))
    with pytest.raises(FileNotFoundError):
        tls_pair(cert, str(tmp_path / "none.key"))
