"""How large each image of a chat request is seen: OpenAI's ``detail`` and Qwen's (and LMDeploy's)
``min_pixels`` / ``max_pixels``, held within the server's caps.

An image is resized, keeping its aspect ratio, to sides that are multiples of 28 and an area within its
bounds; every 28 x 28 pixels is one prompt token. ``detail`` picks the bounds: "low" caps the area at
SNARK_LOW_DETAIL_IMAGE_PIXELS (a cheap look: fewer tokens), "high" and "auto" take the server's
SNARK_MIN/MAX_IMAGE_PIXELS. ``min_pixels`` / ``max_pixels`` given with the image win over its detail.
Whatever a request asks, the bounds stay within [SNARK_MIN_IMAGE_PIXELS, SNARK_MAX_IMAGE_PIXELS]: a
request may ask for less than the server's cap, never more, and never less than its minimum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from snark.config import Settings


class PixelBounds(Protocol):
    """Where a request may set an image's bounds: inside ``image_url``, on its part, request-wide."""

    @property
    def min_pixels(self) -> int | None: ...

    @property
    def max_pixels(self) -> int | None: ...


@dataclass(frozen=True)
class ImageResolution:
    """The server's caps on an image's size; ``bounds`` of one image within them."""

    min_pixels: int = 4 * 28 * 28  # SNARK_MIN_IMAGE_PIXELS
    max_pixels: int = 1280 * 28 * 28  # SNARK_MAX_IMAGE_PIXELS
    low_detail_pixels: int = 512 * 512  # SNARK_LOW_DETAIL_IMAGE_PIXELS

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageResolution:
        return cls(
            min_pixels=settings.min_image_pixels,
            max_pixels=settings.max_image_pixels,
            low_detail_pixels=settings.low_detail_image_pixels,
        )

    def bounds(self, detail: str | None = None, *layers: PixelBounds | None) -> tuple[int, int]:
        """``(min_pixels, max_pixels)`` of one image: what its fields ask for (``layers`` nearest first:
        the first that sets a bound gives it), clamped to the server's caps."""
        given = [layer for layer in layers if layer is not None]
        least = next((layer.min_pixels for layer in given if layer.min_pixels is not None), None)
        most = next((layer.max_pixels for layer in given if layer.max_pixels is not None), None)
        top = self._clamp(most if most is not None else self.low_detail_pixels if detail == "low" else self.max_pixels)
        return min(self.min_pixels if least is None else self._clamp(least), top), top

    def _clamp(self, pixels: int) -> int:
        return min(max(pixels, self.min_pixels), self.max_pixels)
