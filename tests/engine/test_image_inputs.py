"""The vision inputs cache: an image sent again under the same bounds skips the processor, and gives
exactly what the processor gives; a different image or other bounds never reuse an entry."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from snark.engine.image_inputs import ImageInputs


@pytest.fixture
def inputs(tiny_model_dir):
    from transformers import AutoProcessor

    return ImageInputs(AutoProcessor.from_pretrained(tiny_model_dir).image_processor)


def _image(seed: int, size=(120, 90)) -> Image.Image:
    pixels = torch.randint(
        0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )
    return Image.fromarray(pixels.numpy())


def test_an_image_seen_again_is_not_processed_again_and_gives_the_same_inputs(inputs):
    a, b = _image(1), _image(2)
    first = inputs([a, b], min_pixels=3136, max_pixels=100_000)
    again = inputs([b, a], min_pixels=3136, max_pixels=100_000)
    assert inputs.processed == 2
    fresh = inputs.image_processor(
        images=[b, a], size={"shortest_edge": 3136, "longest_edge": 100_000}, return_tensors="pt"
    )
    assert torch.equal(again.pixel_values, fresh["pixel_values"])
    assert torch.equal(again.image_grid_thw, fresh["image_grid_thw"])
    assert again.keys == (first.keys[1], first.keys[0])


def test_other_pixels_or_other_bounds_are_processed_and_keyed_apart(inputs):
    a = _image(3)
    small = inputs([a], min_pixels=3136, max_pixels=6000)
    large = inputs([a], min_pixels=3136, max_pixels=100_000)
    other = inputs([_image(4)], min_pixels=3136, max_pixels=100_000)
    assert inputs.processed == 3
    assert len({small.keys[0], large.keys[0], other.keys[0]}) == 3


def test_the_cache_stays_within_its_bytes(tiny_model_dir):
    from transformers import AutoProcessor

    inputs = ImageInputs(
        AutoProcessor.from_pretrained(tiny_model_dir).image_processor, cache_bytes=500_000
    )  # two of these images
    for seed in range(6):
        inputs([_image(seed)], min_pixels=3136, max_pixels=100_000)
    assert 0 < inputs.used_bytes <= 500_000
    inputs([_image(5)], min_pixels=3136, max_pixels=100_000)
    assert inputs.processed == 6  # the newest was kept
    inputs([_image(0)], min_pixels=3136, max_pixels=100_000)
    assert inputs.processed == 7  # the oldest was evicted
