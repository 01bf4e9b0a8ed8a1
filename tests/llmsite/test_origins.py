"""The websocket opens only from this site's own origin or a trusted one."""

from __future__ import annotations

import pytest
from channels.layers import channel_layers
from channels.testing import WebsocketCommunicator
from django.test import Client

from llmsite.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _fresh_channel_layer():
    # channels-redis lets one event loop at a time receive on a layer object;
    # one an earlier test's server thread used may still count its receive.
    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()


@pytest.fixture
def alice_cookie(owner) -> str:
    client = Client()
    client.force_login(owner)
    return client.cookies["sessionid"].value


async def opens(
    cookie: str,
    origin: str | None,
    host: str = "127.0.0.1:8000",
    scheme: str = "ws",
    extra: list[tuple[bytes, bytes]] = (),
) -> bool:
    headers = [(b"host", host.encode()), (b"cookie", f"sessionid={cookie}".encode())]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    communicator = WebsocketCommunicator(
        application, "/ws/chat/", headers=[*headers, *extra]
    )
    communicator.scope["scheme"] = scheme
    connected, _ = await communicator.connect()
    if connected:
        await communicator.disconnect()
    return connected


async def test_a_page_of_the_same_origin_opens_a_socket(alice_cookie):
    assert await opens(alice_cookie, "http://127.0.0.1:8000") is True


async def test_default_ports_match_a_host_without_a_port(alice_cookie):
    assert await opens(alice_cookie, "http://127.0.0.1", host="127.0.0.1") is True
    assert await opens(alice_cookie, "http://127.0.0.1:80", host="127.0.0.1") is True


async def test_a_page_on_another_port_of_the_same_host_is_refused(alice_cookie):
    assert await opens(alice_cookie, "http://127.0.0.1:9999") is False


async def test_a_page_on_another_scheme_is_refused(alice_cookie):
    assert await opens(alice_cookie, "https://127.0.0.1:8000") is False
    assert await opens(alice_cookie, "http://127.0.0.1:8000", scheme="wss") is False


async def test_a_host_outside_allowed_hosts_is_refused_even_if_it_matches(
    alice_cookie,
):
    # A DNS-rebinding page: its own origin and Host agree, but the name is not ours.
    assert (
        await opens(alice_cookie, "http://evil.example:8000", host="evil.example:8000")
        is False
    )


async def test_a_trusted_origin_opens_a_socket(alice_cookie, settings):
    settings.CSRF_TRUSTED_ORIGINS = ["https://chat.example.com"]

    assert await opens(alice_cookie, "https://chat.example.com") is True
    assert await opens(alice_cookie, "https://chat.example.com:8443") is False


async def test_a_socket_without_an_origin_is_refused(alice_cookie):
    assert await opens(alice_cookie, None) is False


@pytest.mark.parametrize(
    "origin", ["null", "", "file://", "http://127.0.0.1:8000/path", "http://[::1"]
)
async def test_malformed_origins_are_refused(alice_cookie, origin):
    assert await opens(alice_cookie, origin) is False


async def test_behind_a_proxy_the_forwarded_scheme_decides(alice_cookie, settings):
    proto = [(b"x-forwarded-proto", b"https")]
    settings.ALLOWED_HOSTS = ["chat.example.com"]

    settings.BEHIND_PROXY = False
    assert (
        await opens(
            alice_cookie, "https://chat.example.com", "chat.example.com", "ws", proto
        )
        is False
    )
    settings.BEHIND_PROXY = True
    assert (
        await opens(
            alice_cookie, "https://chat.example.com", "chat.example.com", "ws", proto
        )
        is True
    )
    assert (
        await opens(
            alice_cookie, "http://chat.example.com", "chat.example.com", "ws", proto
        )
        is False
    )
