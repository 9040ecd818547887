"""Outbound HTTP to a tenant's URL (webhooks) without server-side request forgery.

A URL a tenant gives us is hostile until proven otherwise: it may name (or *resolve to*) the
cloud's metadata service (169.254.169.254), the database on loopback, a pod on the private
network. The defence has three parts:

1. :func:`address_refusal` — an address is refused when it is loopback, private (RFC 1918, ULA),
   link-local (which holds the metadata services), shared address space (100.64.0.0/10, carrier
   NAT: not "private" to Python's ``ipaddress``, but not the public internet either), reserved,
   multicast or unspecified; an IPv4-mapped or NAT64/6to4 IPv6 address is judged by the IPv4
   address inside it.
2. :func:`resolve_pinned` — the host is resolved **once**; every address it resolves to must pass
   (one bad address refuses the URL: a resolver could hand either out), and the first is kept.
3. :class:`PinnedTransport` — the connection goes to that kept address, with the URL's host in the
   ``Host`` header and in TLS SNI/certificate checks. A second lookup (DNS rebinding: public at
   check time, 127.0.0.1 at connect time) never happens. Redirects are not followed (the client
   is built with ``follow_redirects=False``), so a 302 to an internal address goes nowhere.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

# Carrier-grade NAT space: neither private nor global to Python's ipaddress.
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")

Resolver = Callable[[str, int], list[str]]
# The request extension that carries the checked address a request must connect to.
PIN_EXTENSION = "ldmq_pinned_address"


class RefusedDestination(ValueError):
    """The URL may not be called; the message says why, without the response of any server."""


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_refusal(address: str) -> str | None:
    """Why ``address`` (an IP literal) may not be connected to, or None when it is a public address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and (inner := _embedded_v4(ip)) is not None:
        reason = address_refusal(str(inner))
        return f"{reason} (inside {ip})" if reason else None
    for test, word in (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (isinstance(ip, ipaddress.IPv4Address) and ip in SHARED_ADDRESS_SPACE, "shared address space (100.64.0.0/10)"),
        (ip.is_multicast, "multicast"),
        (ip.is_reserved, "reserved"),
        (ip.is_private, "private"),  # RFC 1918, ULA, and the documentation and benchmark ranges
        (not ip.is_global, "not globally routable"),
    ):
        if test:
            return f"{ip} is a {word} address"
    return None


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (IPv4 and IPv6), in the resolver's order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def resolve_pinned(url: str, *, block_private: bool = True, resolver: Resolver = system_resolver) -> str:
    """Resolve ``url``'s host once and return the address to connect to.

    Raises :class:`RefusedDestination` when the URL is not http(s), has no host, does not resolve,
    or (with ``block_private``) any address it resolves to is refused by :func:`address_refusal`.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise RefusedDestination(f"scheme {parts.scheme!r} is not http or https")
    host = parts.hostname
    if not host:
        raise RefusedDestination("the URL has no host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = resolver(host, port)
    except (OSError, UnicodeError) as exc:
        raise RefusedDestination(f"host {host!r} does not resolve ({type(exc).__name__})") from None
    if not addresses:
        raise RefusedDestination(f"host {host!r} does not resolve")
    if block_private:
        for address in addresses:
            reason = address_refusal(address)
            if reason:
                raise RefusedDestination(f"refused: {host} resolves to the non-public address {address} ({reason})")
    return addresses[0]


def _pinned_transport_class():
    import httpx

    class _PinnedTransport(httpx.BaseTransport):
        """Sends each request through ``inner`` to the address fixed in advance for its host (see the
        module docstring); the request keeps its URL's host for ``Host`` and TLS (SNI, certificate)."""

        def __init__(self, pins: dict[str, str] | None = None, inner: httpx.BaseTransport | None = None):
            self.pins = pins or {}
            self.inner = inner or httpx.HTTPTransport()

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            host = request.url.host
            address = request.extensions.get(PIN_EXTENSION) or self.pins.get(host)
            if address is None:
                raise RefusedDestination(f"host {host!r} was not checked before the request")
            request.headers["Host"] = request.url.netloc.decode("ascii")
            request.extensions = {**request.extensions, "sni_hostname": host}
            request.url = request.url.copy_with(host=address)
            return self.inner.handle_request(request)

        def close(self) -> None:
            self.inner.close()

    return _PinnedTransport


def PinnedTransport(pins: dict[str, str] | None = None, inner=None):  # noqa: N802 - built lazily (httpx is heavy)
    """An httpx transport that connects each request to the address in its ``PIN_EXTENSION``
    extension, else to ``pins[host]``, and refuses a request with neither."""
    return _pinned_transport_class()(pins, inner)


def pinned_post(url: str, *, content: bytes, headers: dict[str, str], timeout_s: float, block_private: bool = True,
                resolver: Resolver = system_resolver, inner=None):
    """POST ``content`` to ``url`` after :func:`resolve_pinned`, connecting only to the checked
    address, following no redirect. Returns the ``httpx.Response``; raises RefusedDestination or
    httpx's transport errors."""
    import httpx

    address = resolve_pinned(url, block_private=block_private, resolver=resolver)
    host = urlsplit(url).hostname
    transport = PinnedTransport({host: address}, inner)
    with httpx.Client(transport=transport, timeout=timeout_s, follow_redirects=False) as client:
        return client.post(url, content=content, headers=headers)
