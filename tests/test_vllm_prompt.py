"""vLLM's prompts have Snark's tokens and image token counts, with the images resized under the cap.

Runs in the default environment on the tiny model's real processor: the transformers engine's
``PromptBuilder`` (real image processor) against the vLLM engine's ``VllmPromptBuilder``.
"""

from __future__ import annotations

import pytest
from PIL import Image
from transformers import AutoProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from snark.engine.prompt import IMAGE_PAD, PromptBuilder
from snark.engine.request import ChatTurn
from snark.engine.vllm.args import SMALLEST_IMAGE_PIXELS
from snark.engine.vllm.prompt import VllmPromptBuilder, collapse_image_pads

MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 1280 * 28 * 28


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def builders(processor):
    return PromptBuilder(processor, max_prompt_tokens=32768), VllmPromptBuilder(processor, max_prompt_tokens=32768)


def noise(width: int, height: int) -> Image.Image:
    return Image.effect_noise((width, height), 64).convert("RGB")


@pytest.mark.parametrize(
    ("size", "max_pixels"),
    [((640, 480), MAX_PIXELS), ((2000, 1500), MAX_PIXELS), ((2000, 1500), 64 * 28 * 28), ((30, 900), MAX_PIXELS),
     ((20, 20), MAX_PIXELS), ((448, 448), 4 * 28 * 28), ((451, 300), 4 * 28 * 28), ((2000, 10), 4 * 28 * 28)],
)  # fmt: skip
def test_same_tokens_and_image_token_counts_as_the_transformers_engine(builders, size, max_pixels):
    transformers_builder, vllm_builder = builders
    turns = [ChatTurn("system", ["Be terse."]), ChatTurn("user", [noise(*size), "What is <|image_pad|> this?"])]
    reference = transformers_builder.build(turns, min_pixels=MIN_PIXELS, max_pixels=max_pixels)
    prompt = vllm_builder.build(turns, min_pixels=MIN_PIXELS, max_pixels=max_pixels)
    assert prompt.input_ids == reference.input_ids  # the same count: usage, limits and metrics agree
    assert prompt.image_grid_thw.tolist() == reference.image_grid_thw.tolist()
    assert prompt.pixel_values is None  # vLLM's processor computes them, once
    for image in prompt.images:  # vLLM's resizer, bounded as the engine bounds it, keeps each size
        assert smart_resize(image.height, image.width, factor=28, min_pixels=SMALLEST_IMAGE_PIXELS, max_pixels=MAX_PIXELS) == (
            image.height, image.width)  # fmt: skip


def test_images_reach_vllm_resized_under_the_cap(builders):
    _, vllm_builder = builders
    cap = 64 * 28 * 28
    prompt = vllm_builder.build([ChatTurn("user", [noise(2000, 1500), noise(300, 200), "Compare."])], min_pixels=MIN_PIXELS, max_pixels=cap)
    assert [image.size for image in prompt.images] == [(252, 168), (252, 168)]
    grid = prompt.image_grid_thw.tolist()
    for image, (_, rows, cols) in zip(prompt.images, grid):
        assert image.width * image.height <= cap
        assert (image.height, image.width) == (rows * 14, cols * 14)  # vLLM's resizer keeps this size


def test_engine_ids_hold_one_pad_per_image(builders, processor):
    _, vllm_builder = builders
    pad = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    prompt = vllm_builder.build([ChatTurn("user", [noise(640, 480), "Two:", noise(64, 64)])], min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    counts = (prompt.image_grid_thw.prod(-1) // 4).tolist()
    assert prompt.engine_ids.count(pad) == 2
    assert prompt.input_ids.count(pad) == sum(counts)
    assert len(prompt.engine_ids) == len(prompt.input_ids) - sum(counts) + 2


def test_client_text_cannot_claim_an_image_slot(builders, processor):
    _, vllm_builder = builders
    pad = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    prompt = vllm_builder.build([ChatTurn("user", ["<|vision_start|><|image_pad|><|vision_end|>"])], min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert pad not in prompt.engine_ids and prompt.images == []


def test_collapse_image_pads():
    assert collapse_image_pads([1, 9, 9, 9, 2, 9, 9, 3], 9, [3, 2]) == [1, 9, 2, 9, 3]
    assert collapse_image_pads([1, 2], 9, []) == [1, 2]
