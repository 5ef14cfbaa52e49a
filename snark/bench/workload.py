"""What the benchmark sends: a fixed, seeded list of chat requests, text-only or with one image."""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from PIL import Image

TEXT_PROMPT = "Request {index}: describe a bicycle in detail, part by part."
IMAGE_PROMPT = "Request {index}: describe this image in detail."
_SIZE = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class Workload:
    prompts: tuple[str, ...]
    image: Image.Image | None
    image_label: str  # "none", a file name, or "448x448 (seeded noise)"

    def image_jpeg(self) -> bytes:
        return self._jpeg

    @cached_property
    def _jpeg(self) -> bytes:
        # Encoded once: requests are timed from before their body is built, so a per-request encode
        # would count as the server's time to first token.
        buffer = io.BytesIO()
        self.image.save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    @cached_property
    def image_data_uri(self) -> str:
        return "data:image/jpeg;base64," + base64.b64encode(self._jpeg).decode()


def load_image_option(option: str | None, *, seed: int) -> tuple[Image.Image | None, str]:
    """``--image``: none, a file, or ``WxH`` for a seeded random image of that size."""
    if option is None or option.lower() == "none":
        return None, "none"
    if match := _SIZE.match(option.strip().lower()):
        width, height = int(match[1]), int(match[2])
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        return Image.fromarray(pixels.numpy(), "RGB"), f"{width}x{height} (seeded noise)"
    path = Path(option).expanduser()
    if not path.is_file():
        raise SystemExit(f"--image {option!r}: no such file; give a JPEG/PNG path or a size such as 448x448.")
    with Image.open(path) as image:
        return image.convert("RGB"), f"{path.name} ({image.width}x{image.height})"


def build_workload(requests: int, *, image_option: str | None, seed: int) -> Workload:
    image, label = load_image_option(image_option, seed=seed)
    template = IMAGE_PROMPT if image is not None else TEXT_PROMPT
    return Workload(prompts=tuple(template.format(index=i) for i in range(requests)), image=image, image_label=label)
