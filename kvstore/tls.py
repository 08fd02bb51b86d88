"""TLS contexts of a node, built from its [tls] settings: the cluster CA, its certificate and key.

The Raft transport requires a client certificate signed by the CA (mutual TLS). The HTTP port
serves clients and peers alike, so it asks for a certificate without requiring one; the internal
routes then demand one whose subject marks a node (see `is_node_certificate`).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

NODE_UNIT: Final = "kvstore-node"  # must match cli.certs.NODE_UNIT


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path


def _server_context(files: TlsFiles, verify_mode: ssl.VerifyMode) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(files.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(files.cert_file), str(files.key_file))
    context.verify_mode = verify_mode
    return context


def peer_server_context(files: TlsFiles) -> ssl.SSLContext:
    """The Raft listener: a peer without a certificate the CA signed fails the handshake."""
    return _server_context(files, ssl.CERT_REQUIRED)


def http_server_context(files: TlsFiles) -> ssl.SSLContext:
    """The HTTP listener: a certificate is optional, but one the CA did not sign is refused."""
    return _server_context(files, ssl.CERT_OPTIONAL)


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """Dialing a peer: verify its certificate (and host name) against the CA, present ours."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(files.cert_file), str(files.key_file))
    return context


def is_node_certificate(peercert: Any) -> bool:
    """Whether a verified peer certificate (ssl's getpeercert() dict) is a node's."""
    if not isinstance(peercert, dict):
        return False
    for rdn in peercert.get("subject", ()):
        for name, value in rdn:
            if name == "organizationalUnitName" and value == NODE_UNIT:
                return True
    return False
