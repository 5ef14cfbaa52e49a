"""snark.media: real images made with PIL, a real HTTP server on 127.0.0.1, no other traffic.

Hosts used besides 127.0.0.1 are either refused before any connection (private literals,
``localhost``) or unresolvable (``nonexistent.invalid``). pytest-asyncio is not installed, so the
coroutines are driven with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import ipaddress
import queue
import socket
import struct
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from PIL import Image, ImageFile

from snark import fetch, media
from snark.config import Settings
from snark.errors import ImageError, PayloadTooLarge
from snark.media import ImageLimits, decode_image_bytes, decode_upload, load_image

LOCAL = ImageLimits(allow_private_urls=True, url_timeout_s=5.0)


# --- helpers -----------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


PNG = encode(Image.new("RGB", (32, 16), (10, 200, 30)), "PNG")
JPEG = encode(Image.new("RGB", (24, 12), (200, 30, 10)), "JPEG", quality=95)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, followed by a tiny bogus IDAT: decoding it for real
    would fail as truncated, so a 413 proves the pixel check ran first."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))


@contextlib.contextmanager
def expect(exc_type: type[Exception], status: int, *fragments: str) -> Iterator[pytest.ExceptionInfo]:
    """Expect exc_type with this HTTP status and every fragment in its message."""
    with pytest.raises(exc_type) as info:
        yield info
    assert info.value.status_code == status
    for fragment in fragments:
        assert fragment in info.value.message, (fragment, info.value.message)


def load(source: str, limits: ImageLimits = LOCAL) -> Image.Image:
    return asyncio.run(load_image(source, limits))


# --- a real local HTTP server ------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # no Content-Length means "read until close": the streamed case

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {"Content-Length": str(len(body))}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.requests.append(self.path)
        self.server.hosts.append(self.headers.get("Host"))
        path = urlparse(self.path).path
        query = parse_qs(urlparse(self.path).query)
        try:
            if path == "/png":
                self._send(200, PNG, {"Content-Type": "image/png", "Content-Length": str(len(PNG))})
            elif path == "/jpeg":
                self._send(200, JPEG)
            elif path.startswith("/redirect/"):
                left = int(path.rsplit("/", 1)[1])
                target = f"/redirect/{left - 1}" if left > 1 else "/png"  # relative Location on purpose
                self._send(302, headers={"Location": target, "Content-Length": "0"})
            elif path == "/redirect-to":
                self._send(302, headers={"Location": query["to"][0], "Content-Length": "0"})
            elif path == "/big-stream":
                self._send(200, headers={"Content-Type": "image/png"})
                try:  # 32 MiB, far more than loopback socket buffers hold, and no Content-Length
                    for _ in range(512):
                        self.wfile.write(b"\0" * 65536)
                    self.server.stream_outcomes.put("sent everything")
                except (BrokenPipeError, ConnectionResetError):
                    self.server.stream_outcomes.put("client hung up")
            elif path == "/lying-length":
                self._send(200, b"tiny", {"Content-Length": str(10**12)})
            elif path == "/slow":
                self.server.release.wait(2.0)  # released at teardown so no thread lingers
                self._send(200, PNG)
            elif path == "/text":
                self._send(200, b"hello, I am not a picture\n", {"Content-Type": "text/plain", "Content-Length": "26"})
            else:
                self._send(404, b"not found")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up on purpose (size cap, timeout)


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.requests, httpd.hosts, httpd.release = [], [], threading.Event()
    httpd.stream_outcomes = queue.Queue()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def base_url(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


# --- limits ------------------------------------------------------------------------------------


def test_limits_from_settings():
    settings = Settings(
        max_image_bytes=123,
        max_source_pixels=456,
        image_url_timeout_s=7.5,
        image_url_max_redirects=1,
        allow_private_urls=True,
    )
    assert ImageLimits.from_settings(settings) == ImageLimits(123, 456, 7.5, 1, True)


# --- fetching from the local server ------------------------------------------------------------


def test_fetches_png_and_jpeg(server):
    png = load(base_url(server) + "/png")
    assert (png.mode, png.size, png.getpixel((0, 0))) == ("RGB", (32, 16), (10, 200, 30))
    jpeg = load(base_url(server) + "/jpeg")
    assert jpeg.mode == "RGB" and jpeg.size == (24, 12)
    assert jpeg.getpixel((5, 5))[0] > 180  # red survives JPEG


def test_connection_pinned_to_checked_address(server, monkeypatch):
    # DNS rebinding: the name is resolved once, for the check, and the connection goes to that
    # answer. A second lookup (what an unpinned client would do at connect time) gets no answer here.
    real_getaddrinfo, lookups = socket.getaddrinfo, []

    def fake_getaddrinfo(host, *args, **kwargs):
        if host != "pinned.invalid":
            return real_getaddrinfo(host, *args, **kwargs)
        lookups.append(host)
        if len(lookups) > 1:
            raise socket.gaierror(socket.EAI_NONAME, "rebound: no answer the second time")
        return real_getaddrinfo("127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    port = server.server_address[1]
    assert load(f"http://pinned.invalid:{port}/png").size == (32, 16)
    assert lookups == ["pinned.invalid"]
    assert server.hosts[-1] == f"pinned.invalid:{port}"  # virtual hosting still sees the name


def test_localhost_name_reachable_when_private_allowed(server):
    port = server.server_address[1]
    assert load(f"http://localhost:{port}/png").size == (32, 16)


def test_redirect_chain_within_cap(server):
    assert load(base_url(server) + "/redirect/3").size == (32, 16)


def test_redirect_cap(server):
    with expect(ImageError, 400, "more than 3", "SNARK_IMAGE_URL_MAX_REDIRECTS"):
        load(base_url(server) + "/redirect/4")
    with expect(ImageError, 400, "more than 0"):
        load(base_url(server) + "/redirect/1", ImageLimits(allow_private_urls=True, max_redirects=0))


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "gopher://127.0.0.1/"])
def test_redirect_to_other_scheme_refused(server, target):
    with expect(ImageError, 400, "Only http, https and data: URIs are accepted") as info:
        load(f"{base_url(server)}/redirect-to?to={target}")
    assert info.value.code == "image_url_scheme"


def test_redirect_target_address_is_rechecked(server, monkeypatch):
    # Reaching the local server at all needs private URLs allowed, so narrow the guard to one
    # loopback address: the first hop (127.0.0.1) passes, the redirect to 127.0.0.2 must be refused
    # before connecting -- which only happens if every hop is checked.
    monkeypatch.setattr(fetch, "is_forbidden_address", lambda ip: str(ip) == "127.0.0.2")
    port = server.server_address[1]
    before = len(server.requests)
    with expect(ImageError, 400, "127.0.0.2", "not allowed", "SNARK_ALLOW_PRIVATE_URLS=1") as info:
        load(f"{base_url(server)}/redirect-to?to=http://127.0.0.2:{port}/png", ImageLimits())
    assert info.value.code == "image_url_not_allowed"
    assert len(server.requests) == before + 1  # only the first hop reached a server


def test_streamed_body_over_cap_is_413(server):
    with expect(PayloadTooLarge, 413, "SNARK_MAX_IMAGE_BYTES (65536 bytes)") as info:
        load(base_url(server) + "/big-stream", ImageLimits(allow_private_urls=True, max_image_bytes=65536))
    assert info.value.code == "image_too_large"
    # The client stopped reading mid-body instead of downloading all 32 MiB and refusing afterwards.
    assert server.stream_outcomes.get(timeout=10) == "client hung up"


def test_content_length_over_cap_refused_early(server):
    with expect(PayloadTooLarge, 413, "SNARK_MAX_IMAGE_BYTES") as info:
        load(base_url(server) + "/lying-length")
    assert info.value.code == "image_too_large"


def test_slow_server_times_out(server):
    with expect(ImageError, 400, "0.5 s", "SNARK_IMAGE_URL_TIMEOUT_S") as info:
        load(base_url(server) + "/slow", ImageLimits(allow_private_urls=True, url_timeout_s=0.5))
    assert info.value.code == "image_url_timeout"


def test_non_image_body(server):
    with expect(ImageError, 400, "not an image PIL can read", "JPEG, PNG"):
        load(base_url(server) + "/text")


def test_http_error_status(server):
    with expect(ImageError, 400, "404") as info:
        load(base_url(server) + "/missing.png")
    assert info.value.code == "image_url_status"


def test_connection_refused():
    with socket.socket() as sock:  # a port nobody listens on: bind, note, close
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with expect(ImageError, 400, "could not be reached") as info:
        load(f"http://127.0.0.1:{port}/png")
    assert info.value.code == "image_url_unreachable"


def test_unresolvable_host():
    with expect(ImageError, 400, "nonexistent.invalid", "could not be resolved") as info:
        load("http://nonexistent.invalid/cat.png", ImageLimits())
    assert info.value.code == "image_url_unreachable"


# --- SSRF guard --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "[::1]",
        "0.0.0.0",
        "169.254.169.254",
        "10.0.0.1",
        "192.168.1.1",
        "[fd00:ec2::254]",
        "[::ffff:169.254.169.254]",
        "[::ffff:127.0.0.1]",
        "2130706433",
        "0x7f000001",
        "127.1",
        "100.100.100.200",
        "224.0.0.1",
        "[fe80::1]",
    ],
)
def test_private_hosts_refused_before_connecting(server, host):
    before = len(server.requests)
    port = server.server_address[1]  # would reach the live server if the guard let it through
    with expect(ImageError, 400, "not allowed", "SNARK_ALLOW_PRIVATE_URLS=1") as info:
        load(f"http://{host}:{port}/png", ImageLimits())
    assert info.value.code == "image_url_not_allowed"
    assert len(server.requests) == before


@pytest.mark.parametrize(
    ("address", "forbidden"),
    [
        ("8.8.8.8", False),
        ("93.184.216.34", False),
        ("2606:4700:4700::1111", False),
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("100.64.0.1", True),
        ("169.254.169.254", True),
        ("fd00:ec2::254", True),
        ("::ffff:169.254.169.254", True),
        ("::ffff:8.8.8.8", True),
        ("64:ff9b::a00:1", True),
        ("2002:7f00:1::", True),
        ("::", True),
        ("ff02::1", True),
        ("240.0.0.1", True),
        ("198.51.100.7", True),
    ],
)
def test_address_policy(address, forbidden):
    # IPv4-mapped and NAT64 forms sit in ranges ipaddress calls reserved, so even public ones are refused.
    assert fetch.is_forbidden_address(ipaddress.ip_address(address)) is forbidden


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("::ffff:a9fe:a9fe", "::ffff:169.254.169.254"),
        ("example.com", None),
        ("nonexistent.invalid", None),
    ],
)
def test_literal_ip_forms_read_without_dns(host, address):
    expected = ipaddress.ip_address(address) if address else None
    assert fetch.literal_ip(host) == expected


def test_hop_check_passes_public_literal_without_dns_or_traffic():
    url = httpx.URL("https://93.184.216.34/x.png")
    assert asyncio.run(fetch.resolve_hop(url, ImageLimits().download)) == [ipaddress.ip_address("93.184.216.34")]


def test_hop_check_honours_allow_private():
    url = httpx.URL("http://[::1]:9/x.png")
    with pytest.raises(ImageError):
        asyncio.run(fetch.resolve_hop(url, ImageLimits().download))
    assert asyncio.run(fetch.resolve_hop(url, LOCAL.download)) == [ipaddress.ip_address("::1")]


@pytest.mark.parametrize(
    "source",
    [
        "file:///etc/passwd",
        "ftp://example.com/cat.png",
        "gopher://example.com/",
        "javascript:alert(1)",
        "/etc/passwd",
        "cat.png",
        "",
    ],
)
def test_bad_schemes(source):
    with expect(ImageError, 400, "Only http, https and data: URIs are accepted"):
        load(source, ImageLimits())


def test_userinfo_and_empty_host_refused():
    with expect(ImageError, 400, "user:password@"):
        load("http://user:secret@nonexistent.invalid/cat.png")
    with expect(ImageError, 400, "no host"):
        load("http:///cat.png")


# --- data: URIs --------------------------------------------------------------------------------


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def test_data_uri_good():
    image = load(data_uri(PNG), ImageLimits())
    assert image.size == (32, 16) and image.getpixel((3, 3)) == (10, 200, 30)
    assert load(data_uri(JPEG, "image/jpeg").replace("data:", "DATA:"), ImageLimits()).size == (24, 12)


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("data:image/png;base64,@@@not-base64@@@", "not valid base64"),
        ("data:image/png;base64,iVBORw0", "not valid base64"),  # bad padding
        ("data:text/plain;base64,aGVsbG8=", "base64 image data"),
        ("data:image/png,rawbytes", "base64 image data"),
        ("data:image/png;base64," + base64.b64encode(b"plain text").decode(), "not an image PIL can read"),
    ],
)
def test_data_uri_bad(uri, fragment):
    with expect(ImageError, 400, fragment):
        load(uri, ImageLimits())


def test_data_uri_too_large():
    big = encode(Image.effect_noise((64, 64), 50), "PNG")
    assert len(big) > 1000
    with expect(PayloadTooLarge, 413, "SNARK_MAX_IMAGE_BYTES (1000 bytes)") as info:
        load(data_uri(big), ImageLimits(max_image_bytes=1000))
    assert info.value.code == "image_too_large"
    # Estimated from the base64 length before decoding: junk that would fail to decode is still a 413.
    with expect(PayloadTooLarge, 413, "SNARK_MAX_IMAGE_BYTES"):
        load("data:image/png;base64," + "@" * 4000, ImageLimits(max_image_bytes=1000))


# --- decoding ----------------------------------------------------------------------------------


def upload(data: bytes, limits: ImageLimits = ImageLimits(), filename: str | None = "x.png") -> Image.Image:
    return asyncio.run(decode_upload(data, limits, filename=filename))


def test_rgba_composited_on_white():
    image = Image.new("RGBA", (4, 1), (255, 0, 0, 255))
    image.putpixel((1, 0), (255, 0, 0, 0))  # fully transparent red -> white
    image.putpixel((2, 0), (0, 0, 255, 128))  # half blue over white
    result = upload(encode(image, "PNG"))
    assert result.mode == "RGB"
    assert result.getpixel((0, 0)) == (255, 0, 0)
    assert result.getpixel((1, 0)) == (255, 255, 255)
    assert result.getpixel((2, 0))[2] == 255 and 120 < result.getpixel((2, 0))[0] < 135


def test_palette_with_transparency_and_la():
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    result = decode_image_bytes(encode(palette, "PNG", transparency=0), ImageLimits())
    assert result.getpixel((0, 0)) == (255, 255, 255) and result.getpixel((1, 0)) == (255, 0, 0)
    la = Image.new("LA", (1, 1), (0, 0))
    assert decode_image_bytes(encode(la, "PNG"), ImageLimits()).getpixel((0, 0)) == (255, 255, 255)


def test_other_modes_convert_cleanly():
    cmyk = decode_image_bytes(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), ImageLimits())
    assert cmyk.mode == "RGB" and cmyk.getpixel((4, 4))[0] > 200 and cmyk.getpixel((4, 4))[1] < 60
    grey = decode_image_bytes(encode(Image.new("L", (2, 2), 77), "PNG"), ImageLimits())
    assert grey.getpixel((0, 0)) == (77, 77, 77)
    deep = Image.new("I;16", (2, 1))
    deep.putpixel((0, 0), 65535)
    deep.putpixel((1, 0), 32768)
    result = decode_image_bytes(encode(deep, "PNG"), ImageLimits())
    assert result.getpixel((0, 0)) == (255, 255, 255)
    assert 120 < result.getpixel((1, 0))[0] < 135  # scaled, not clipped to white


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (6, 6), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    result = decode_image_bytes(data, ImageLimits())
    assert result.mode == "RGB" and result.getpixel((3, 3)) == (255, 0, 0)


def test_exif_orientation_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    result = upload(encode(image, "JPEG", exif=exif, quality=95))
    assert result.size == (20, 40)
    top, bottom = result.getpixel((10, 5)), result.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_truncated_jpeg():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with expect(ImageError, 400, "x.png", "truncated or corrupt", "complete file"):
        upload(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("data", [b"just some text, not an image\n", b"%PDF-1.4\n%...", b"\0" * 100])
def test_not_an_image(data):
    with expect(ImageError, 400, "not an image PIL can read (JPEG, PNG, WebP, GIF, BMP"):
        upload(data)


def test_empty_upload():
    with expect(ImageError, 400, "empty"):
        upload(b"")


def test_pixel_cap_checked_before_decoding():
    # The header says 100x100 but the pixel data is garbage: a 413 (not a "truncated" 400) shows the
    # cap is applied from the header alone.
    with expect(PayloadTooLarge, 413, "100x100", "SNARK_MAX_SOURCE_PIXELS (5000)") as info:
        upload(png_header_only(100, 100), ImageLimits(max_source_pixels=5000))
    assert info.value.code == "image_too_many_pixels"
    with expect(ImageError, 400, "truncated or corrupt"):  # same bytes under the cap: decoding fails
        upload(png_header_only(100, 100), ImageLimits(max_source_pixels=20000))


def test_decompression_bomb_header():
    with expect(PayloadTooLarge, 413, "SNARK_MAX_SOURCE_PIXELS") as info:
        decode_image_bytes(png_header_only(100_000, 100_000), ImageLimits())
    assert info.value.code == "image_too_many_pixels"


def test_absurd_aspect_ratio():
    with expect(ImageError, 400, "aspect ratio", "Crop or pad"):
        decode_image_bytes(encode(Image.new("RGB", (1, 300)), "PNG"), ImageLimits())


def test_zero_size_header():
    # Pillow already refuses zero sizes when reading the header; either way it is a clean 400.
    with expect(ImageError, 400, "x.png") as info:
        upload(png_header_only(0, 10))
    assert info.value.code == "invalid_image"


def test_upload_byte_cap():
    with expect(PayloadTooLarge, 413, "x.png", "SNARK_MAX_IMAGE_BYTES (50 bytes)") as info:
        upload(PNG, ImageLimits(max_image_bytes=50))
    assert info.value.code == "image_too_large"
    with expect(PayloadTooLarge, 413, "SNARK_MAX_IMAGE_BYTES"):
        decode_image_bytes(PNG, ImageLimits(max_image_bytes=50))


# --- images sent again ---------------------------------------------------------------------------


def jpeg_data_uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def test_an_image_sent_again_is_not_decoded_again():
    decoded = media.DecodedImages()
    data = encode(Image.new("RGB", (64, 48), (10, 200, 30)), "JPEG")
    first = asyncio.run(load_image(jpeg_data_uri(data), LOCAL, decoded=decoded))
    again = asyncio.run(load_image(jpeg_data_uri(data), LOCAL, decoded=decoded))
    upload = asyncio.run(decode_upload(data, LOCAL, filename="same.jpeg", decoded=decoded))
    assert again is first and upload is first and decoded.hits == 2
    other = asyncio.run(
        load_image(jpeg_data_uri(encode(Image.new("RGB", (64, 48), (10, 200, 31)), "PNG")), LOCAL, decoded=decoded)
    )
    assert other is not first and other.getpixel((0, 0)) == (10, 200, 31)


def test_an_image_sent_again_is_held_to_the_same_byte_limit():
    decoded = media.DecodedImages()
    data = encode(Image.new("RGB", (64, 48)), "PNG")
    asyncio.run(decode_upload(data, LOCAL, decoded=decoded))
    with expect(PayloadTooLarge, 413, "SNARK_MAX_IMAGE_BYTES"):
        asyncio.run(decode_upload(data, ImageLimits(max_image_bytes=len(data) - 1), decoded=decoded))


def test_decoded_images_are_bounded_by_their_pixels_least_recently_used_out():
    decoded = media.DecodedImages(max_bytes=2 * 64 * 48 * 3)  # room for two 64x48 RGB images
    images = [encode(Image.new("RGB", (64, 48), (i, 0, 0)), "PNG") for i in range(3)]
    a, b, c = (asyncio.run(decode_upload(data, LOCAL, decoded=decoded)) for data in images)
    assert asyncio.run(decode_upload(images[2], LOCAL, decoded=decoded)) is c
    assert asyncio.run(decode_upload(images[1], LOCAL, decoded=decoded)) is b
    assert asyncio.run(decode_upload(images[0], LOCAL, decoded=decoded)) is not a  # evicted first, decoded anew
