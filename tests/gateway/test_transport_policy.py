"""HTTPS only: which hosts are this machine, and the client's last guard and TLS."""

from __future__ import annotations

import datetime as dt
import json
import re
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway import client, router, transport_policy
from gateway.client import APIConnectionError, APIEndpointError, EndpointConfig
from gateway.models import Endpoint, ModelRoute
from gateway.router import RetryPolicy
from monitoring import probes
from tests.gateway.usage_support import close_thread_connections

ROOT = Path(__file__).resolve().parents[2]
SECRET = "sk-never-in-clear-0123456789"


def config(base_url: str, **fields: Any) -> EndpointConfig:
    return EndpointConfig(id=1, name="e", base_url=base_url, api_key=SECRET, **fields)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LocalHost.", True),
        ("api.localhost", True),
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("128.0.0.1", False),
        ("10.0.0.5", False),
        ("0.0.0.0", False),
        ("localhost.example.com", False),
        ("mylocalhost", False),
        ("127.0.0.1.nip.io", False),
        ("", False),
        (None, False),
    ],
)
def test_only_this_machine_counts_as_loopback(host, loopback):
    assert transport_policy.is_loopback_host(host) is loopback


@pytest.mark.parametrize(
    ("url", "allowed", "refused"),
    [
        ("https://api.example.com/v1", False, None),
        ("http://127.0.0.1:9101/v1", False, None),
        ("http://10.0.0.5/v1", True, None),
        ("http://10.0.0.5/v1", False, "Plain http:// to 10.0.0.5 would send"),
        ("http://user:pw@10.0.0.5/v1", False, "Plain http:// to 10.0.0.5 would send"),
        ("ftp://10.0.0.5/v1", True, "Use an https:// URL."),
        ("http:///v1", True, "Use an https:// URL."),
        ("http://[::1/v1", True, "Enter a valid URL."),
    ],
)
def test_the_rule_for_a_base_url(url, allowed, refused):
    problem = transport_policy.plain_http_problem(url, allow_plain_http=allowed)

    if refused is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith(refused)


# --- The client's last guard ---------------------------------------------------------


@dataclass
class Network:
    """Client pools whose requests reach a mock network that records them."""

    pools: client.ClientPools
    requests: list[httpx.Request] = field(default_factory=list)


@pytest.fixture
def network() -> Network:
    net = Network(client.ClientPools())

    def handler(request: httpx.Request) -> httpx.Response:
        net.requests.append(request)
        return httpx.Response(200, json={"data": [{"id": "m"}]})

    net.pools.transport = httpx.MockTransport(handler)
    return net


async def test_the_client_refuses_plain_http_off_this_machine_before_sending(network):
    plain = config("http://10.0.0.5:8000/v1")
    pools = network.pools

    with pytest.raises(APIEndpointError) as listed:
        await client.list_models(plain, client_pools=pools)
    with pytest.raises(APIEndpointError):
        await client.create_completion(plain, {"model": "m"}, client_pools=pools)
    with pytest.raises(APIEndpointError):
        async for _ in client.stream_completion(
            plain, {"model": "m"}, client_pools=pools
        ):
            pass
    checked = await client.health_check(plain, client_pools=pools)

    assert network.requests == []
    assert listed.value.may_fail_over
    assert str(listed.value).startswith("e: refused: Plain http:// to 10.0.0.5")
    assert SECRET not in str(listed.value)
    assert not checked.ok and isinstance(checked.error, APIEndpointError)


async def test_the_client_sends_to_loopback_https_and_opted_in_endpoints(network):
    for url, allowed in [
        ("http://127.0.0.1:9/v1", False),
        ("https://api.example.com/v1", False),
        ("http://10.0.0.5:8000/v1", True),
    ]:
        await client.list_models(
            config(url, allow_plain_http=allowed), client_pools=network.pools
        )

    assert [str(r.url) for r in network.requests] == [
        "http://127.0.0.1:9/v1/models",
        "https://api.example.com/v1/models",
        "http://10.0.0.5:8000/v1/models",
    ]


def test_the_snapshot_carries_the_opt_in():
    endpoint = Endpoint(
        name="lan", base_url="http://10.0.0.5/v1", allow_plain_http=True
    )

    assert EndpointConfig.from_model(endpoint).allow_plain_http is True
    assert EndpointConfig.from_model(Endpoint(name="x")).allow_plain_http is False


class Upstream:
    """Answers every chat request with one streamed word; records the hosts."""

    def __init__(self) -> None:
        self.hosts: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.hosts.append(request.url.host)
        events = [
            {"choices": [{"index": 0, "delta": {"content": "hi"}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        ]
        body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            content=body + b"data: [DONE]\n\n",
        )


@pytest.fixture
def _thread_connections_closed() -> Iterator[None]:
    yield
    close_thread_connections()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("_thread_connections_closed")
async def test_a_row_written_past_validation_is_not_sent_to_and_fails_over():
    upstream = Upstream()
    client.pools.transport = httpx.MockTransport(upstream)
    router.forget_routes()
    try:
        first = await Endpoint.objects.acreate(
            name="first", base_url="https://first.test/v1", priority=1
        )
        second = await Endpoint.objects.acreate(
            name="second", base_url="https://second.test/v1", priority=2
        )
        # A bulk update skips save(): only the client stands in the way.
        await Endpoint.objects.filter(pk=first.pk).aupdate(
            base_url="http://first.test/v1"
        )
        for endpoint, priority in ((first, 1), (second, 2)):
            await ModelRoute.objects.acreate(
                model_name="m", endpoint=endpoint, upstream_model="u", priority=priority
            )
        policy = RetryPolicy(jitter=0, sleep=_no_sleep)

        async with router.stream_chat(
            "m", [{"role": "user", "content": "hello"}], policy=policy
        ) as stream:
            events = [event async for event in stream]
    finally:
        client.pools.transport = None
        router.forget_routes()

    result = events[-1].result
    assert result.endpoint == "second"
    assert result.text == "hi"
    assert [hop.reason for hop in result.hops] == ["endpoint_rejected"]
    assert upstream.hosts == ["second.test"]


async def _no_sleep(seconds: float) -> None:
    return None


# --- TLS verification is never turned off --------------------------------------------


def test_the_client_and_the_monitor_verify_certificates_and_host_names():
    contexts = {"client": client._ssl_context()}
    shared = probes._SharedTransport(1)
    # httpx keeps the context on its connection pool: the one the probes use.
    contexts["monitor"] = shared._pools[0]._pool._ssl_context

    for name, context in contexts.items():
        assert context.verify_mode == ssl.CERT_REQUIRED, name
        assert context.check_hostname is True, name


def test_no_code_turns_tls_verification_off():
    pattern = re.compile(
        r"verify\s*=\s*False|CERT_NONE|check_hostname\s*=\s*False"
        r"|_create_unverified_context"
    )
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("gateway", "chat", "monitoring", "llmsite")
        for path in (ROOT / folder).rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]

    assert offenders == []


@pytest.fixture
def self_signed_server(tmp_path) -> Iterator[tuple[int, list[str]]]:
    """An HTTPS server on 127.0.0.1 with a certificate nobody vouches for."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.headers.get("Authorization", ""))
            self.send_response(200)
            self.send_header("Content-Length", "11")
            self.end_headers()
            self.wfile.write(b'{"data":[]}')

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_file, key_file)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_port, requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def test_an_untrusted_certificate_is_refused_and_the_key_never_sent(
    self_signed_server,
):
    port, requests = self_signed_server
    pools = client.ClientPools()
    try:
        with pytest.raises(APIConnectionError) as caught:
            await client.list_models(
                config(f"https://localhost:{port}/v1"), client_pools=pools
            )
    finally:
        await pools.aclose_all()

    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    assert requests == []
