"""Mutual TLS on the Raft transport: peers with certificates from the cluster CA talk; a peer
with a certificate from another CA, without one, or without TLS at all is refused at the
handshake, and every refusal is logged and counted."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import pytest

from cli.certs import CA_FILE, init_certs, node_cert_pair
from kvstore.tls import TlsFiles, client_context, peer_server_context
from tests.raft.test_transport import (
    LOCALHOST,
    LOGGER,
    Inbox,
    MakeTransport,
    connect_all,
    eventually,
    heartbeat,
)
from tests.raft.test_transport import make_transport as make_transport_fixture

make_transport = make_transport_fixture  # the fixture, under the name the tests ask for


async def hung_up(reader: asyncio.StreamReader) -> bool:
    """Whether the other end closes the connection (cleanly or with a TLS alert) within 10 s."""
    try:
        async with asyncio.timeout(10):
            return await reader.read() == b""
    except (ssl.SSLError, ConnectionError):
        return True


def tls_files(directory: Path, node_id: int) -> TlsFiles:
    pair = node_cert_pair(directory, node_id)
    return TlsFiles(directory / CA_FILE, pair.cert_file, pair.key_file)


@pytest.fixture(scope="module")
def cluster_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cluster-ca")
    init_certs(directory, [1, 2])
    return directory


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("other-ca")
    init_certs(directory, [1, 2])
    return directory


async def test_peers_with_certificates_of_the_cluster_ca_exchange_messages(
    make_transport: MakeTransport, cluster_ca: Path
) -> None:
    inbox = Inbox()
    transports = []
    for node_id, box in ((1, Inbox()), (2, inbox)):
        files = tls_files(cluster_ca, node_id)
        transports.append(
            await make_transport(
                node_id,
                box,
                ssl_server=peer_server_context(files),
                ssl_client=client_context(files),
            )
        )
    connect_all(*transports)
    transports[0].send(5, [heartbeat(1, 2, commit=3)])
    transports[0].flush()
    await eventually(lambda: inbox.commits_from(1) == [3], timeout_s=10)
    assert transports[1].refused_connections == {"tls_handshake": 0, "too_many": 0}


async def test_a_peer_with_a_certificate_of_another_ca_is_refused_and_counted(
    make_transport: MakeTransport,
    cluster_ca: Path,
    other_ca: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    inbox = Inbox()
    files = tls_files(cluster_ca, 2)
    target = await make_transport(
        2, inbox, ssl_server=peer_server_context(files), ssl_client=client_context(files)
    )
    # The intruder does not care whom it talks to; it presents a certificate another CA signed.
    intruder_context = client_context(tls_files(other_ca, 1))
    intruder_context.check_hostname = False
    intruder_context.verify_mode = ssl.CERT_NONE
    intruder = await make_transport(1, Inbox(), ssl_client=intruder_context)
    connect_all(intruder, target)
    for commit in range(1, 4):
        intruder.send(5, [heartbeat(1, 2, commit=commit)])
        intruder.flush()
        await asyncio.sleep(0.05)
    await eventually(lambda: target.refused_connections["tls_handshake"] >= 1, timeout_s=10)
    assert inbox.calls == []
    assert "refused a peer connection at the TLS handshake" in caplog.text


async def test_plain_tcp_and_a_peer_without_a_certificate_are_refused_and_counted(
    make_transport: MakeTransport, cluster_ca: Path
) -> None:
    inbox = Inbox()
    files = tls_files(cluster_ca, 2)
    target = await make_transport(2, inbox, ssl_server=peer_server_context(files))
    host, port = target.listen_address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"\x00\x00\x00\x10not a TLS hello, a frame header")
    await writer.drain()
    assert await hung_up(reader)
    writer.close()
    no_certificate = ssl.create_default_context(cafile=str(cluster_ca / CA_FILE))
    reader, writer = await asyncio.open_connection(
        LOCALHOST, port, ssl=no_certificate, server_hostname=LOCALHOST
    )
    writer.write(b"\x00\x00\x00\x04junk")  # TLS 1.3: the server refuses after our Finished
    assert await hung_up(reader)
    writer.close()
    await eventually(lambda: target.refused_connections["tls_handshake"] == 2, timeout_s=10)
    assert inbox.calls == []


async def test_inbound_connections_over_the_cap_are_closed_and_counted(
    make_transport: MakeTransport,
) -> None:
    target = await make_transport(2, Inbox(), max_inbound_connections=2)
    host, port = target.listen_address
    held = [await asyncio.open_connection(host, port) for _ in range(2)]
    await eventually(lambda: len(target._inbound) == 2)
    reader, writer = await asyncio.open_connection(host, port)
    assert await hung_up(reader)
    writer.close()
    assert target.refused_connections["too_many"] == 1
    for _, held_writer in held:
        held_writer.close()
