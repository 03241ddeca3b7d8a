"""wss:// and https:// on the same port when the server has a certificate."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from plexus.client import Client
from tests.conftest import ServerFactory
from tests.helpers import TIMEOUT


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certfile, keyfile


# The listener takes the WebSocket upgrades on the TLS transport and hands
# that transport over to aiohttp for every plain HTTPS request.
async def test_wss_and_https_on_one_port(make_server: ServerFactory, tmp_path: Path) -> None:
    certfile, keyfile = self_signed(tmp_path)
    server = await make_server(certfile=str(certfile), keyfile=str(keyfile))
    assert server.ws_url.startswith("wss://")
    context = ssl.create_default_context(cafile=str(certfile))
    connector = aiohttp.TCPConnector(ssl=context)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(server.url + "/health") as response:
            assert (await response.json())["status"] == "ok"
        async with Client(server.ws_url, session=session, timeout=TIMEOUT) as client:
            sub = await client.subscribe("chat:tls")
            await client.publish("chat:tls", "secret")
            assert (await sub.get(TIMEOUT, kind="message"))["data"] == "secret"
        # A client that does not trust the certificate cannot connect.
        async with aiohttp.ClientSession() as untrusting:
            try:
                await untrusting.get(server.url + "/health")
            except aiohttp.ClientConnectorCertificateError:
                pass
            else:
                raise AssertionError("an untrusted certificate was accepted")
