"""Image references (http(s) URL, ``data:`` URI, uploaded bytes) -> RGB ``PIL.Image.Image``.

Every limit lives here: bytes, source pixels, and (through ``snark.fetch``) fetch time, redirects and
the SSRF guard. Errors are
``ImageError`` (400) or ``PayloadTooLarge`` (413) with a message that says how to fix the request.
Decoding runs in a worker thread (``asyncio.to_thread``) so the event loop never blocks on it.

Chat UIs and screenshot agents send the same image again at every turn: ``DecodedImages`` keeps
recently decoded images by a digest of their file's bytes, so a byte-identical image is not decoded
again (a 1024x768 JPEG costs about 10 ms, a screenshot PNG more). The limits are checked the same.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError

from snark.errors import ImageError, PayloadTooLarge
from snark.fetch import Download, data_uri_bytes, fetch, short
from snark.lru import SharedCache

if TYPE_CHECKING:
    from snark.config import Settings

# Formats a client may send. Restricting Image.open keeps exotic decoders (EPS runs Ghostscript) out.
# Phone MPO files come through the JPEG opener. AVIF only counts where this Pillow build has it.
_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
_FORMAT_HINT = "JPEG, PNG, WebP, GIF, BMP, TIFF or AVIF"
# Qwen2.5-VL's resizer refuses aspect ratios above 200; say so here instead of failing later.
_MAX_ASPECT_RATIO = 200


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

    @property
    def download(self) -> Download:
        return Download(
            noun="image",
            error=ImageError,
            max_bytes=self.max_image_bytes,
            bytes_setting="SNARK_MAX_IMAGE_BYTES",
            timeout_s=self.url_timeout_s,
            timeout_setting="SNARK_IMAGE_URL_TIMEOUT_S",
            max_redirects=self.max_redirects,
            allow_private_urls=self.allow_private_urls,
            accept="image/*",
        )


DECODED_CACHE_BYTES = 128 * 1024**2  # decoded RGB pixels kept for images sent again


class DecodedImages:
    """Decoded RGB images by the SHA-256 of their file's bytes, least recently used out first,
    bounded by their pixels' bytes. Thread-safe: images are decoded in worker threads. The images
    are shared between requests, so nothing may change them in place."""

    def __init__(self, max_bytes: int = DECODED_CACHE_BYTES) -> None:
        self._images: SharedCache[Image.Image] = SharedCache(max_bytes, size_of=_pixel_bytes)

    @property
    def hits(self) -> int:
        return self._images.hits

    def get_or_decode(self, digest: bytes, decode: Callable[[], Image.Image]) -> Image.Image:
        """The image for ``digest``, decoded once however many requests bring it at the same time."""
        return self._images.get_or_make(digest, decode)


def _pixel_bytes(image: Image.Image) -> int:
    return image.width * image.height * len(image.getbands())


async def load_image(source: str, limits: ImageLimits, *, decoded: DecodedImages | None = None) -> Image.Image:
    """Fetch an http(s) URL or decode a ``data:image/...;base64,`` URI into an RGB image (from
    ``decoded`` when the same bytes were decoded before)."""
    if source[:5].lower() == "data:":
        return await asyncio.to_thread(_decode_data_uri, source, limits, decoded)
    data = await fetch(source, limits.download)
    return await asyncio.to_thread(_decode_once, data, limits, f"The image at {short(source)}", decoded)


async def decode_upload(
    data: bytes, limits: ImageLimits, *, filename: str | None = None, decoded: DecodedImages | None = None
) -> Image.Image:
    """Decode an uploaded file's bytes; ``filename`` only makes error messages clearer."""
    label = f"The uploaded file {short(filename)!r}" if filename else "The uploaded file"
    limits.download.check_byte_count(len(data), label)  # cheap, so refuse before starting a thread
    return await asyncio.to_thread(_decode_once, data, limits, label, decoded)


def decode_image_bytes(data: bytes, limits: ImageLimits) -> Image.Image:
    """The synchronous core: bytes -> RGB image with the byte and pixel caps applied."""
    return _decode(data, limits, "The image")


# --- decoding ----------------------------------------------------------------------------------


def _decode_data_uri(uri: str, limits: ImageLimits, decoded: DecodedImages | None = None) -> Image.Image:
    data = data_uri_bytes(uri, limits.download, "data:image/png;base64,iVBORw0...")
    return _decode_once(data, limits, "The data: URI image", decoded)


def _decode_once(data: bytes, limits: ImageLimits, label: str, decoded: DecodedImages | None) -> Image.Image:
    """``_decode``, or the image these very bytes decoded to before (they passed the same limits)."""
    if decoded is None:
        return _decode(data, limits, label)
    limits.download.check_byte_count(len(data), label)
    return decoded.get_or_decode(hashlib.sha256(data).digest(), lambda: _decode(data, limits, label))


def _decode(data: bytes, limits: ImageLimits, label: str) -> Image.Image:
    """Bytes -> RGB image: cap bytes, read the header, cap pixels, then decode frame 0."""
    limits.download.check_byte_count(len(data), label)
    not_an_image = f"{label} is not an image PIL can read ({_FORMAT_HINT}); send one of those formats."
    if not data:
        raise ImageError(f"{label} is empty; send the image file's bytes.")
    try:
        # Image.open reads only the header; PIL raises DecompressionBombError past 2x its own cap.
        available = set(Image.registered_extensions().values())  # Image.open raises KeyError on unknown ones
        image: Image.Image = Image.open(io.BytesIO(data), formats=[f for f in _FORMATS if f in available])
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
        raise ImageError(
            f"{label} is {width}x{height}; the model accepts aspect ratios up to "
            f"{_MAX_ASPECT_RATIO}:1. Crop or pad the image."
        )
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
        assert not isinstance(low, tuple) and not isinstance(high, tuple)  # one band: its (min, max)
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
        raise ImageError(
            f"{label} uses colour mode {image.mode}, which cannot be converted to RGB; save it as an RGB PNG or JPEG."
        ) from exc
