"""Image references (http(s) URL, ``data:`` URI, uploaded bytes) -> RGB ``PIL.Image.Image``.

Every limit lives here: bytes, source pixels, fetch time, redirects and the SSRF guard. Errors are
``ImageError`` (400) or ``PayloadTooLarge`` (413) with a message that says how to fix the request.
Decoding runs in a worker thread (``asyncio.to_thread``) so the event loop never blocks on it.

Chat UIs and screenshot agents send the same image again at every turn: ``DecodedImages`` keeps
recently decoded images by a digest of their file's bytes, so a byte-identical image is not decoded
again (a 1024x768 JPEG costs about 10 ms, a screenshot PNG more). The limits are checked the same.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import re
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from snark.errors import ImageError, PayloadTooLarge
from snark.lru import BytesLRU

if TYPE_CHECKING:
    from snark.config import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Formats a client may send. Restricting Image.open keeps exotic decoders (EPS runs Ghostscript) out.
# Phone MPO files come through the JPEG opener. AVIF only counts where this Pillow build has it.
_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
_FORMAT_HINT = "JPEG, PNG, WebP, GIF, BMP, TIFF or AVIF"
# Qwen2.5-VL's resizer refuses aspect ratios above 200; say so here instead of failing later.
_MAX_ASPECT_RATIO = 200
_REDIRECT_STATUSES = {301, 302, 303, 307, 308}
# Cloud metadata endpoints, named even though the private/link-local checks already cover them.
_METADATA_ADDRESSES = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
_DATA_URI = re.compile(r"data:image/[a-z0-9.+-]+(?:;[^;,]*)*?;base64,", re.IGNORECASE)
_SCHEME_HINT = (
    "Only http, https and data: URIs are accepted (data:image/png;base64,...); upload local files instead."
)


@dataclass(frozen=True)
class ImageLimits:
    max_image_bytes: int = 20 * 1024 * 1024
    max_source_pixels: int = 64_000_000  # decompression-bomb cap, checked from the header BEFORE full decode
    url_timeout_s: float = 10.0  # total budget for connect+read of one URL fetch, all hops
    max_redirects: int = 3
    allow_private_urls: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(
            max_image_bytes=settings.max_image_bytes,
            max_source_pixels=settings.max_source_pixels,
            url_timeout_s=settings.image_url_timeout_s,
            max_redirects=settings.image_url_max_redirects,
            allow_private_urls=settings.allow_private_urls,
        )


DECODED_CACHE_BYTES = 128 * 1024**2  # decoded RGB pixels kept for images sent again


class DecodedImages:
    """Decoded RGB images by the SHA-256 of their file's bytes, least recently used out first,
    bounded by their pixels' bytes. Thread-safe: images are decoded in worker threads. The images
    are shared between requests, so nothing may change them in place."""

    def __init__(self, max_bytes: int = DECODED_CACHE_BYTES) -> None:
        self._images: BytesLRU[Image.Image] = BytesLRU(max_bytes, size_of=_pixel_bytes)
        self._lock = threading.Lock()

    @property
    def hits(self) -> int:
        return self._images.hits

    def get(self, digest: bytes) -> Image.Image | None:
        with self._lock:
            return self._images.get(digest)

    def put(self, digest: bytes, image: Image.Image) -> None:
        with self._lock:
            self._images.put(digest, image)


def _pixel_bytes(image: Image.Image) -> int:
    return image.width * image.height * len(image.getbands())


async def load_image(source: str, limits: ImageLimits, *, decoded: DecodedImages | None = None) -> Image.Image:
    """Fetch an http(s) URL or decode a ``data:image/...;base64,`` URI into an RGB image (from
    ``decoded`` when the same bytes were decoded before)."""
    if source[:5].lower() == "data:":
        return await asyncio.to_thread(_decode_data_uri, source, limits, decoded)
    data = await _fetch(_parse_url(source), limits)
    return await asyncio.to_thread(_decode_once, data, limits, f"The image at {_short(source)}", decoded)


async def decode_upload(data: bytes, limits: ImageLimits, *, filename: str | None = None,
                        decoded: DecodedImages | None = None) -> Image.Image:  # fmt: skip
    """Decode an uploaded file's bytes; ``filename`` only makes error messages clearer."""
    label = f"The uploaded file {_short(filename)!r}" if filename else "The uploaded file"
    _check_byte_count(len(data), limits, label)  # cheap, so refuse before starting a thread
    return await asyncio.to_thread(_decode_once, data, limits, label, decoded)


def decode_image_bytes(data: bytes, limits: ImageLimits) -> Image.Image:
    """The synchronous core: bytes -> RGB image with the byte and pixel caps applied."""
    return _decode(data, limits, "The image")


# --- URL fetching ------------------------------------------------------------------------------


def _short(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_url(text: str) -> httpx.URL:
    """Parse and check one hop's URL: http(s) only, a host, no credentials."""
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise ImageError(f"{_short(text)!r} is not a valid URL ({exc}). {_SCHEME_HINT}") from exc
    if url.scheme not in ("http", "https"):
        raise ImageError(f"Cannot load an image from {_short(text)!r}. {_SCHEME_HINT}", code="image_url_scheme")
    if not url.host:
        raise ImageError(f"The image URL {_short(text)!r} has no host name; send a full http(s) URL.")
    if url.userinfo:  # credentials would end up in logs and Host-based redirects; nobody needs them here
        raise ImageError("Image URLs must not contain user:password@; use a URL that needs no login.")
    return url


def _literal_ip(host: str) -> IPAddress | None:
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


def _is_forbidden_address(ip: IPAddress) -> bool:
    """True for anything but a public unicast address, including IPv4 hidden inside IPv6."""
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):  # NAT64 (64:ff9b::/96) already counts as reserved
        candidates += [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    return any(
        a in _METADATA_ADDRESSES
        or not a.is_global  # also catches shared (100.64/10) and documentation ranges
        or a.is_private or a.is_loopback or a.is_link_local
        or a.is_multicast or a.is_reserved or a.is_unspecified
        for a in candidates
    )


async def _resolve_hop(url: httpx.URL, limits: ImageLimits) -> list[IPAddress]:
    """Resolve one hop's host (without blocking the loop) and apply the SSRF guard to EVERY address:
    a name that resolves to one public and one private address is refused."""
    literal = _literal_ip(url.host)
    if literal is not None:
        addresses = [literal]
    else:
        port = url.port or (443 if url.scheme == "https" else 80)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(url.host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise ImageError(f"The host {url.host!r} could not be resolved ({exc}). Check the image URL for "
                             "typos, or send the image as a data: URI or upload.",
                             code="image_url_unreachable") from exc
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
    forbidden = [a for a in addresses if _is_forbidden_address(a)] if not limits.allow_private_urls else []
    if forbidden:
        raise ImageError(
            f"The image URL host {url.host!r} resolves to {forbidden[0]}, an address that is not allowed "
            "(private, loopback, link-local, multicast, reserved or cloud metadata). Use a public URL or send "
            "the image inline; operators on trusted networks can set SNARK_ALLOW_PRIVATE_URLS=1.",
            code="image_url_not_allowed",
        )
    return addresses


def _pinned_request(client: httpx.AsyncClient, url: httpx.URL, address: IPAddress) -> httpx.Request:
    """A GET that connects to the address we checked, not to whatever DNS says a moment later
    (DNS rebinding). Host header and TLS SNI/certificate check keep the original name."""
    extensions = {}
    if url.scheme == "https" and _literal_ip(url.host) is None:
        extensions["sni_hostname"] = url.host
    headers = {"Host": url.netloc.decode("ascii"), "Accept": "image/*"}
    return client.build_request("GET", url.copy_with(host=str(address)), headers=headers, extensions=extensions)


def _check_byte_count(count: int, limits: ImageLimits, label: str) -> None:
    if count > limits.max_image_bytes:
        raise PayloadTooLarge(
            f"{label} is larger than SNARK_MAX_IMAGE_BYTES ({limits.max_image_bytes} bytes). Send a smaller "
            "or more compressed image, or ask the operator to raise SNARK_MAX_IMAGE_BYTES.",
            code="image_too_large",
        )


async def _fetch(url: httpx.URL, limits: ImageLimits) -> bytes:
    """Download one image, following at most ``max_redirects`` redirects, within ``url_timeout_s``."""
    original = str(url)
    # httpx's own timeouts bound each phase; asyncio.timeout bounds the sum (DNS, all hops, slow drips).
    timeout = httpx.Timeout(limits.url_timeout_s)
    try:
        async with asyncio.timeout(limits.url_timeout_s):
            # trust_env=False: a proxy from the environment would bypass the address pinning. No
            # keep-alive: pooled connections are keyed by IP, so a later hop to another name on the same
            # IP would reuse a TLS session verified for the first name.
            async with httpx.AsyncClient(
                follow_redirects=False, timeout=timeout, trust_env=False,
                limits=httpx.Limits(max_keepalive_connections=0),
            ) as client:
                for _ in range(limits.max_redirects + 1):
                    response = await _send_pinned(client, url, await _resolve_hop(url, limits))
                    try:
                        if response.status_code not in _REDIRECT_STATUSES:
                            return await _read_body(response, url, limits)
                        location = response.headers.get("location")
                    finally:
                        await response.aclose()
                    if not location:
                        raise ImageError(f"{_short(str(url))} redirected without a Location; use the final URL.")
                    url = _parse_url(str(url.join(location)))  # every hop gets every check again
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise ImageError(
            f"Fetching the image at {_short(original)} took longer than {limits.url_timeout_s} s "
            "(SNARK_IMAGE_URL_TIMEOUT_S). Use a faster host, send the image as a data: URI or upload, "
            "or ask the operator to raise SNARK_IMAGE_URL_TIMEOUT_S.",
            code="image_url_timeout",
        ) from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # protocol errors, dropped connections, bad Location
        raise ImageError(
            f"Downloading the image at {_short(original)} failed ({type(exc).__name__}: {exc}). "
            "Check the URL, or send the image as a data: URI or upload.",
            code="image_url_unreachable",
        ) from exc
    raise ImageError(
        f"The image URL {_short(original)} redirected more than {limits.max_redirects} times "
        "(SNARK_IMAGE_URL_MAX_REDIRECTS). Send the final URL of the image instead.",
        code="image_url_too_many_redirects",
    )


async def _send_pinned(client: httpx.AsyncClient, url: httpx.URL, addresses: list[IPAddress]) -> httpx.Response:
    """Try each checked address in order (a name may list an IPv6 address the server doesn't listen on)."""
    error: httpx.ConnectError | None = None
    for address in addresses:
        try:
            return await client.send(_pinned_request(client, url, address), stream=True)
        except httpx.ConnectError as exc:
            error = exc
    raise ImageError(f"The host {url.host!r} could not be reached ({error}). Check the image URL, or send "
                     "the image as a data: URI or upload.", code="image_url_unreachable")


async def _read_body(response: httpx.Response, url: httpx.URL, limits: ImageLimits) -> bytes:
    label = f"The image at {_short(str(url))}"
    if not 200 <= response.status_code < 300:
        raise ImageError(f"{label} answered HTTP {response.status_code} {response.reason_phrase}; check that the "
                         "URL is public and points at an image.", code="image_url_status")
    declared = response.headers.get("content-length", "")
    if declared.isdigit():  # refuse early instead of downloading what we would throw away
        _check_byte_count(int(declared), limits, label)
    body = bytearray()
    async for chunk in response.aiter_bytes():  # counted after Content-Encoding, so gzip bombs stop too
        body += chunk
        _check_byte_count(len(body), limits, label)
    return bytes(body)


# --- decoding ----------------------------------------------------------------------------------


def _decode_data_uri(uri: str, limits: ImageLimits, decoded: DecodedImages | None = None) -> Image.Image:
    match = _DATA_URI.match(uri)
    if match is None:
        raise ImageError("data: URIs must carry base64 image data, like data:image/png;base64,iVBORw0... "
                         "(no other media types, no percent-encoded data).")
    payload = uri[match.end():]
    label = "The data: URI image"
    # 4 base64 characters make 3 bytes: refuse oversized payloads before allocating the decoded buffer.
    _check_byte_count(len(payload) * 3 // 4 - 2, limits, label)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"{label} is not valid base64 ({exc}); encode the file with standard base64.") from exc
    return _decode_once(data, limits, label, decoded)


def _decode_once(data: bytes, limits: ImageLimits, label: str, decoded: DecodedImages | None) -> Image.Image:
    """``_decode``, or the image these very bytes decoded to before (they passed the same limits)."""
    if decoded is None:
        return _decode(data, limits, label)
    _check_byte_count(len(data), limits, label)
    digest = hashlib.sha256(data).digest()
    image = decoded.get(digest)
    if image is None:
        image = _decode(data, limits, label)
        decoded.put(digest, image)
    return image


def _decode(data: bytes, limits: ImageLimits, label: str) -> Image.Image:
    """Bytes -> RGB image: cap bytes, read the header, cap pixels, then decode frame 0."""
    _check_byte_count(len(data), limits, label)
    not_an_image = f"{label} is not an image PIL can read ({_FORMAT_HINT}); send one of those formats."
    if not data:
        raise ImageError(f"{label} is empty; send the image file's bytes.")
    try:
        # Image.open reads only the header; PIL raises DecompressionBombError past 2x its own cap.
        available = set(Image.registered_extensions().values())  # Image.open raises KeyError on unknown ones
        image = Image.open(io.BytesIO(data), formats=[f for f in _FORMATS if f in available])
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(label, limits, str(exc)) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(not_an_image) from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{label} has no pixels ({width}x{height}); send a non-empty image.")
    if width * height > limits.max_source_pixels:
        raise _too_many_pixels(label, limits, f"{width}x{height} = {width * height} pixels")
    if max(width, height) > _MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(f"{label} is {width}x{height}; the model accepts aspect ratios up to "
                         f"{_MAX_ASPECT_RATIO}:1. Crop or pad the image.")
    try:
        image.load()  # frame 0 only: animated images are read as their first frame
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(label, limits, str(exc)) from exc
    except (OSError, SyntaxError, ValueError) as exc:  # LOAD_TRUNCATED_IMAGES stays False: truncation raises
        raise ImageError(f"{label} is truncated or corrupt ({exc}); send the complete file.") from exc
    try:  # also detaches frame 0 from the file (a copy) when there is nothing to rotate
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        image = image.copy()  # broken EXIF should not cost the user a viewable image; use it unrotated
    return _to_rgb(image, label)


def _too_many_pixels(label: str, limits: ImageLimits, detail: str) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"{label} has too many pixels ({detail}); the limit is SNARK_MAX_SOURCE_PIXELS "
        f"({limits.max_source_pixels}). Send a smaller image, or ask the operator to raise the limit.",
        code="image_too_many_pixels",
    )


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    """Any mode -> RGB. Transparent pixels become white, which is what a viewer would show on paper."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):  # 16-bit grey: convert("RGB") would clip almost everything to white
        return image.convert("I").point(lambda v: v * (1 / 257)).convert("RGB")
    if image.mode in ("I", "F"):
        low, high = image.getextrema()
        if low < 0 or high > 255:  # stretch an unknown range linearly onto 0..255
            scale = 255 / ((high - low) or 1)
            image = image.point(lambda v: v * scale - low * scale)
        return image.convert("L").convert("RGB")
    try:
        if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"{label} uses colour mode {image.mode}, which cannot be converted to RGB; "
                         "save it as an RGB PNG or JPEG.") from exc
