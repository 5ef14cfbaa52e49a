"""What the benchmark sends: a fixed, seeded list of chat requests, text-only or with one image."""

from __future__ import annotations

import base64
import hashlib
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


def run_image(option: str, *, seed: int, tag: str) -> Image.Image:
    """``--image`` for a workload that must not be served from a cache an earlier run filled: ``WxH``
    noise seeded by ``seed`` and ``tag``, or the file with its top-left 16x16 pixels noise seeded
    likewise (a new content hash, the same picture). ``tag`` "" gives the plain ``--image``."""
    if not tag:
        return load_image_option(option, seed=seed)[0]
    mixed = int.from_bytes(hashlib.sha256(f"{seed}:{tag}".encode()).digest()[:8], "little")
    if _SIZE.match(option.strip().lower()):
        return load_image_option(option, seed=mixed)[0]
    image = load_image_option(option, seed=seed)[0]
    corner = load_image_option(f"{min(16, image.width)}x{min(16, image.height)}", seed=mixed)[0]
    image.paste(corner, (0, 0))
    return image


def build_workload(requests: int, *, image_option: str | None, seed: int) -> Workload:
    image, label = load_image_option(image_option, seed=seed)
    template = IMAGE_PROMPT if image is not None else TEXT_PROMPT
    return Workload(prompts=tuple(template.format(index=i) for i in range(requests)), image=image, image_label=label)


# --- structured outputs (``--workload structured``) ----------------------------------------------
RECEIPT_PROMPT = (
    "Request {index}: extract this receipt as JSON.\n"
    "CORNER BAKERY  2024-05-17\n2 x croissant 3.40\n1 x rye loaf 5.90\n1 x coffee 2.80\n"
    "TOTAL EUR 15.50  paid by card"
)
CURRENCIES = ("EUR", "USD", "GBP", "CHF", "JPY", "SEK", "NOK", "DKK", "PLN", "CZK", "CAD", "AUD")


def receipt_schema(index: int = 0, *, run_tag: str = "") -> dict:
    """A receipt-extraction schema. Index 0 is the plain receipt; index i > 0 renames every property
    (``store_i``, ...) and rotates the currency enum, so each index compiles to a grammar of its own.
    ``run_tag`` goes into the note's property name, so a server that compiled these schemas in an
    earlier run compiles them again (xgrammar may still reuse the masks of parts it has seen)."""
    suffix = f"_{index}" if index else ""
    tag = f"_{run_tag}" if run_tag else ""
    currencies = [CURRENCIES[(index + k) % len(CURRENCIES)] for k in range(4)]
    item = {
        "type": "object",
        "properties": {
            f"name{suffix}": {"type": "string", "maxLength": 20},
            f"quantity{suffix}": {"type": "integer", "minimum": 1, "maximum": 99},
            f"price_cents{suffix}": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
        },
        "required": [f"name{suffix}", f"quantity{suffix}", f"price_cents{suffix}"],
        "additionalProperties": False,
    }
    properties = {
        f"store{suffix}": {"type": "string", "maxLength": 24},
        f"date{suffix}": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
        f"currency{suffix}": {"type": "string", "enum": currencies},
        f"items{suffix}": {"type": "array", "items": item, "maxItems": 8},
        f"total_cents{suffix}": {"type": "integer", "minimum": 0},
        f"paid{suffix}": {"type": "boolean"},
        f"note{suffix}{tag}": {"type": "string", "maxLength": 60},
    }
    return {
        "title": f"receipt {index}",
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def receipt_schemas(count: int, *, run_tag: str = "") -> list[dict]:
    return [receipt_schema(i, run_tag=run_tag) for i in range(count)]


def build_receipt_workload(requests: int) -> Workload:
    """Text prompts asking for a receipt as JSON, the same for constrained and free requests."""
    prompts = tuple(RECEIPT_PROMPT.format(index=i) for i in range(requests))
    return Workload(prompts=prompts, image=None, image_label="none")
