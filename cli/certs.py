"""Development certificates: a cluster CA, one certificate per node, one for kvctl.

For local clusters and tests only (`kvctl certs init DIR`): keys are written unencrypted with
mode 0600 and the CA key sits beside them. Node certificates carry the SANs 127.0.0.1 and
localhost and may act as TLS server and client (mTLS between peers); their subject's
organizational unit marks them as nodes, which the internal routes require.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cli.cluster_file import write_private
from cli.errors import KvctlError

NODE_UNIT = "kvstore-node"  # the OU of node certificates (kvstore checks it on internal routes)
CLIENT_UNIT = "kvstore-client"
VALID_DAYS = 365
CA_FILE = "ca.pem"
CA_KEY = "ca-key.pem"
CLIENT_CERT = "kvctl.pem"
CLIENT_KEY = "kvctl-key.pem"


@dataclass(frozen=True, slots=True)
class CertPair:
    cert_file: Path
    key_file: Path


def node_cert_pair(directory: Path, node_id: int) -> CertPair:
    return CertPair(directory / f"node{node_id}.pem", directory / f"node{node_id}-key.pem")


def client_cert_pair(directory: Path) -> CertPair:
    return CertPair(directory / CLIENT_CERT, directory / CLIENT_KEY)


def _name(common_name: str, unit: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pyraftkv dev"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class CertificateAuthority:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert

    @classmethod
    def create(cls, name: str | None = None) -> CertificateAuthority:
        # A distinct name per CA: two dev clusters' CAs in one trust store must not collide.
        name = name or f"pyraftkv dev CA {secrets.token_hex(4)}"
        key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(name, "kvstore-ca")
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def issue(self, common_name: str, unit: str) -> tuple[bytes, bytes]:
        """A certificate (PEM) and its key (PEM) for 127.0.0.1/localhost, server and client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, unit))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        """The CA `init_certs` wrote into directory (its key sits beside it: dev clusters only)."""
        try:
            key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
            cert = x509.load_pem_x509_certificate((directory / CA_FILE).read_bytes())
        except (OSError, ValueError) as error:
            raise KvctlError(f"cannot load the dev CA in {directory}: {error}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KvctlError(f"{directory / CA_KEY} is not the EC key `kvctl certs init` writes")
        return cls(key, cert)

    def write(self, directory: Path) -> None:
        (directory / CA_FILE).write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        write_private(directory / CA_KEY, _key_pem(self.key))


def write_pair(pair: CertPair, cert_pem: bytes, key_pem: bytes) -> None:
    pair.cert_file.write_bytes(cert_pem)
    write_private(pair.key_file, key_pem)


def init_certs(directory: Path, node_ids: list[int], *, overwrite: bool = False) -> list[Path]:
    """Writes ca.pem, node{i}.pem/-key.pem for each id, kvctl.pem/-key.pem. Returns the files."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / CA_FILE).exists() and not overwrite:
        raise KvctlError(
            f"{directory / CA_FILE} already exists; pass --force to replace every certificate "
            "(running nodes keep the old ones until restarted)"
        )
    authority = CertificateAuthority.create()
    authority.write(directory)
    written = [directory / CA_FILE]
    for node_id in node_ids:
        pair = node_cert_pair(directory, node_id)
        write_pair(pair, *authority.issue(f"node{node_id}", NODE_UNIT))
        written += [pair.cert_file, pair.key_file]
    client = client_cert_pair(directory)
    write_pair(client, *authority.issue("kvctl", CLIENT_UNIT))
    written += [client.cert_file, client.key_file]
    return written


def issue_node_cert(directory: Path, node_id: int) -> CertPair:
    """node{id}.pem/-key.pem for a node that joins later, signed by the directory's CA."""
    pair = node_cert_pair(directory, node_id)
    write_pair(pair, *CertificateAuthority.load(directory).issue(f"node{node_id}", NODE_UNIT))
    return pair
