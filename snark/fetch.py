"""Downloading one client-given http(s) URL (an image or a video), safely.

Every hop of a fetch is checked: http(s) only, no credentials, and the host must resolve to public
addresses only (no private, loopback, link-local, multicast, reserved or cloud-metadata address; each
redirect checked again). The connection goes to the address that was checked (no DNS rebinding), the
body is counted as it streams (a declared or actual size over the cap stops it), and the whole fetch,
every hop included, has one time budget. Errors name the setting that refused the request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
import socket
from dataclasses import dataclass

import httpx

from snark.errors import InvalidRequest, PayloadTooLarge

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_REDIRECT_STATUSES = {301, 302, 303, 307, 308}
# Cloud metadata endpoints, named even though the private/link-local checks already cover them.
_METADATA_ADDRESSES = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


@dataclass(frozen=True)
class Download:
    """What one kind of download may cost, and how its errors read. ``noun`` ("image", "video")
    starts the error codes (``image_url_timeout``) and names the thing in messages."""

    noun: str
    error: type[InvalidRequest]
    max_bytes: int
    bytes_setting: str  # the setting a too-large body names, e.g. SNARK_MAX_IMAGE_BYTES
    timeout_s: float  # connect + read of all hops together
    timeout_setting: str
    max_redirects: int = 3
    allow_private_urls: bool = False
    accept: str = "*/*"

    def scheme_hint(self) -> str:
        return (
            f"Only http, https and data: URIs are accepted (data:{self.noun}/...;base64,...); "
            "upload local files instead."
        )

    def check_byte_count(self, count: int, label: str) -> None:
        if count > self.max_bytes:
            raise PayloadTooLarge(
                f"{label} is larger than {self.bytes_setting} ({self.max_bytes} bytes). Send a smaller or more "
                f"compressed {self.noun}, or ask the operator to raise {self.bytes_setting}.",
                code=f"{self.noun}_too_large",
            )


def data_uri_bytes(uri: str, download: Download, example: str) -> bytes:
    """The bytes of a ``data:<noun>/...;base64,`` URI, refused before decoding when the payload is
    over the byte cap. ``example`` shows the client the shape (``data:image/png;base64,iVBORw0...``)."""
    match = re.match(rf"data:{download.noun}/[a-z0-9.+-]+(?:;[^;,]*)*?;base64,", uri, re.IGNORECASE)
    if match is None:
        raise download.error(
            f"data: URIs must carry base64 {download.noun} data, like {example} "
            "(no other media types, no percent-encoded data)."
        )
    payload = uri[match.end() :]
    label = f"The data: URI {download.noun}"
    # 4 base64 characters make 3 bytes: refuse oversized payloads before allocating the decoded buffer.
    download.check_byte_count(len(payload) * 3 // 4 - 2, label)
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise download.error(f"{label} is not valid base64 ({exc}); encode the file with standard base64.") from exc


def short(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def parse_url(text: str, download: Download) -> httpx.URL:
    """Parse and check one hop's URL: http(s) only, a host, no credentials."""
    error = download.error
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise error(f"{short(text)!r} is not a valid URL ({exc}). {download.scheme_hint()}") from exc
    if url.scheme not in ("http", "https"):
        raise error(
            f"Cannot load {_a(download.noun)} from {short(text)!r}. {download.scheme_hint()}",
            code=f"{download.noun}_url_scheme",
        )
    if not url.host:
        raise error(f"The {download.noun} URL {short(text)!r} has no host name; send a full http(s) URL.")
    if url.userinfo:  # credentials would end up in logs and Host-based redirects; nobody needs them here
        raise error(
            f"{download.noun.capitalize()} URLs must not contain user:password@; use a URL that needs no login."
        )
    return url


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def literal_ip(host: str) -> IPAddress | None:
    """The address a host names without DNS: plain IPv4/IPv6, or legacy forms such as 2130706433,
    0x7f000001 or 127.1 that the C resolver would also read as IPv4 (inet_aton only parses)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def is_forbidden_address(ip: IPAddress) -> bool:
    """True for anything but a public unicast address, including IPv4 hidden inside IPv6."""
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):  # NAT64 (64:ff9b::/96) already counts as reserved
        candidates += [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    return any(
        a in _METADATA_ADDRESSES
        or not a.is_global  # also catches shared (100.64/10) and documentation ranges
        or a.is_private
        or a.is_loopback
        or a.is_link_local
        or a.is_multicast
        or a.is_reserved
        or a.is_unspecified
        for a in candidates
    )


async def resolve_hop(url: httpx.URL, download: Download) -> list[IPAddress]:
    """Resolve one hop's host (without blocking the loop) and apply the SSRF guard to EVERY address:
    a name that resolves to one public and one private address is refused."""
    noun, error = download.noun, download.error
    literal = literal_ip(url.host)
    if literal is not None:
        addresses = [literal]
    else:
        port = url.port or (443 if url.scheme == "https" else 80)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(url.host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise error(
                f"The host {url.host!r} could not be resolved ({exc}). Check the {noun} URL for "
                f"typos, or send the {noun} as a data: URI or upload.",
                code=f"{noun}_url_unreachable",
            ) from exc
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
    forbidden = [a for a in addresses if is_forbidden_address(a)] if not download.allow_private_urls else []
    if forbidden:
        raise error(
            f"The {noun} URL host {url.host!r} resolves to {forbidden[0]}, an address that is not allowed "
            "(private, loopback, link-local, multicast, reserved or cloud metadata). Use a public URL or send "
            f"the {noun} inline; operators on trusted networks can set SNARK_ALLOW_PRIVATE_URLS=1.",
            code=f"{noun}_url_not_allowed",
        )
    return addresses


def _pinned_request(client: httpx.AsyncClient, url: httpx.URL, address: IPAddress, accept: str) -> httpx.Request:
    """A GET that connects to the address we checked, not to whatever DNS says a moment later
    (DNS rebinding). Host header and TLS SNI/certificate check keep the original name."""
    extensions = {}
    if url.scheme == "https" and literal_ip(url.host) is None:
        extensions["sni_hostname"] = url.host
    headers = {"Host": url.netloc.decode("ascii"), "Accept": accept}
    return client.build_request("GET", url.copy_with(host=str(address)), headers=headers, extensions=extensions)


async def fetch(source: str, download: Download) -> bytes:
    """Download ``source``, following at most ``max_redirects`` redirects, within ``timeout_s``."""
    url = parse_url(source, download)
    noun, error = download.noun, download.error
    original = str(url)
    # httpx's own timeouts bound each phase; asyncio.timeout bounds the sum (DNS, all hops, slow drips).
    timeout = httpx.Timeout(download.timeout_s)
    try:
        async with asyncio.timeout(download.timeout_s):
            # trust_env=False: a proxy from the environment would bypass the address pinning. No
            # keep-alive: pooled connections are keyed by IP, so a later hop to another name on the same
            # IP would reuse a TLS session verified for the first name.
            async with httpx.AsyncClient(
                follow_redirects=False,
                timeout=timeout,
                trust_env=False,
                limits=httpx.Limits(max_keepalive_connections=0),
            ) as client:
                for _ in range(download.max_redirects + 1):
                    response = await _send_pinned(client, url, await resolve_hop(url, download), download)
                    try:
                        if response.status_code not in _REDIRECT_STATUSES:
                            return await _read_body(response, url, download)
                        location = response.headers.get("location")
                    finally:
                        await response.aclose()
                    if not location:
                        raise error(f"{short(str(url))} redirected without a Location; use the final URL.")
                    url = parse_url(str(url.join(location)), download)  # every hop gets every check again
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise error(
            f"Fetching the {noun} at {short(original)} took longer than {download.timeout_s} s "
            f"({download.timeout_setting}). Use a faster host, send the {noun} as a data: URI or upload, "
            f"or ask the operator to raise {download.timeout_setting}.",
            code=f"{noun}_url_timeout",
        ) from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # protocol errors, dropped connections, bad Location
        raise error(
            f"Downloading the {noun} at {short(original)} failed ({type(exc).__name__}: {exc}). "
            f"Check the URL, or send the {noun} as a data: URI or upload.",
            code=f"{noun}_url_unreachable",
        ) from exc
    raise error(
        f"The {noun} URL {short(original)} redirected more than {download.max_redirects} times "
        f"(SNARK_IMAGE_URL_MAX_REDIRECTS). Send the final URL of the {noun} instead.",
        code=f"{noun}_url_too_many_redirects",
    )


async def _send_pinned(
    client: httpx.AsyncClient, url: httpx.URL, addresses: list[IPAddress], download: Download
) -> httpx.Response:
    """Try each checked address in order (a name may list an IPv6 address the server doesn't listen on)."""
    failure: httpx.ConnectError | None = None
    for address in addresses:
        try:
            return await client.send(_pinned_request(client, url, address, download.accept), stream=True)
        except httpx.ConnectError as exc:
            failure = exc
    raise download.error(
        f"The host {url.host!r} could not be reached ({failure}). Check the {download.noun} URL, "
        f"or send the {download.noun} as a data: URI or upload.",
        code=f"{download.noun}_url_unreachable",
    )


async def _read_body(response: httpx.Response, url: httpx.URL, download: Download) -> bytes:
    noun = download.noun
    label = f"The {noun} at {short(str(url))}"
    if not 200 <= response.status_code < 300:
        raise download.error(
            f"{label} answered HTTP {response.status_code} {response.reason_phrase}; check that "
            f"the URL is public and points at {_a(noun)}.",
            code=f"{noun}_url_status",
        )
    declared = response.headers.get("content-length", "")
    if declared.isdigit():  # refuse early instead of downloading what we would throw away
        download.check_byte_count(int(declared), label)
    body = bytearray()
    async for chunk in response.aiter_bytes():  # counted after Content-Encoding, so gzip bombs stop too
        body += chunk
        download.check_byte_count(len(body), label)
    return bytes(body)
