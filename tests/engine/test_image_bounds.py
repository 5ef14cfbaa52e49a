"""Images with bounds of their own (a chat part's detail or min/max_pixels): each prompt is what Qwen's
processor makes of the same images under the same bounds, on both engines' prompt builders, and the
engine's caches keep two resolutions of one image apart."""

from __future__ import annotations

import asyncio

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, BatchFeature

from snark.engine.image_inputs import ImageInputs
from snark.engine.prompt import PromptBuilder
from snark.engine.vllm.prompt import VllmPromptBuilder
from snark.values import ChatTurn, ImagePart, SamplingParams

REQUEST_BOUNDS = {"min_pixels": 3136, "max_pixels": 60_000}
IMAGE_PAD = 151655


def noise(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.to(torch.uint8).numpy())


class EachWithItsBounds:
    """Qwen's image processor, each image under bounds of its own (the processor takes one size a call)."""

    def __init__(self, image_processor, bounds: list[tuple[int, int]]) -> None:
        self.image_processor, self.bounds = image_processor, bounds

    def __getattr__(self, name: str):
        return getattr(self.image_processor, name)

    def __call__(self, images, **kwargs) -> BatchFeature:
        outs = [
            self.image_processor(images=[image], size={"shortest_edge": low, "longest_edge": high}, return_tensors="pt")
            for image, (low, high) in zip(images, self.bounds, strict=True)
        ]
        return BatchFeature({key: torch.cat([out[key] for out in outs]) for key in ("pixel_values", "image_grid_thw")})


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir)


def mixed_turn() -> tuple[ChatTurn, list[Image.Image], list[tuple[int, int]]]:
    """One image at two resolutions and a bare one (the request's bounds), with their bounds in order."""
    a, b = noise(1, (400, 300)), noise(2, (200, 500))
    turn = ChatTurn("user", [ImagePart(a, 3136, 20_000), "and", ImagePart(a, 3136, 200_000), b, "compare"])
    return (
        turn,
        [a, a, b],
        [(3136, 20_000), (3136, 200_000), (REQUEST_BOUNDS["min_pixels"], REQUEST_BOUNDS["max_pixels"])],
    )


def test_each_image_takes_its_own_bounds_as_qwens_processor_does(tiny_model_dir, processor):
    turn, images, bounds = mixed_turn()
    prompt = PromptBuilder(processor, max_prompt_tokens=8192).build([turn], **REQUEST_BOUNDS)
    reference = AutoProcessor.from_pretrained(tiny_model_dir)
    reference.image_processor = EachWithItsBounds(reference.image_processor, bounds)
    content = [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}, {"type": "image"}]
    text = reference.apply_chat_template(
        [{"role": "user", "content": [*content, {"type": "text", "text": "compare"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    expected = reference(text=[text], images=images, return_tensors="pt")
    assert prompt.input_ids == expected["input_ids"][0].tolist()
    assert prompt.image_grid_thw.tolist() == expected["image_grid_thw"].tolist()
    assert torch.equal(prompt.pixel_values, expected["pixel_values"])
    low, high, _ = prompt.image_grid_thw.prod(-1).tolist()
    assert low < high  # the same image, two resolutions
    assert len(set(prompt.image_keys)) == 3


def test_vllm_gets_each_image_resized_under_its_own_bounds_with_snarks_token_counts(processor):
    turn, images, bounds = mixed_turn()
    snarks = PromptBuilder(processor, max_prompt_tokens=8192).build([turn], **REQUEST_BOUNDS)
    vllms = VllmPromptBuilder(processor, max_prompt_tokens=8192).build([turn], **REQUEST_BOUNDS)
    assert vllms.input_ids == snarks.input_ids
    assert vllms.image_grid_thw.tolist() == snarks.image_grid_thw.tolist()
    # vLLM's own resizer keeps these sizes (they are within its bounds and multiples of 28), so the
    # image tokens vLLM expands are the ones Snark counted.
    sizes = [(image.height, image.width) for image in vllms.images]
    assert sizes == [(h * 14, w * 14) for _, h, w in snarks.image_grid_thw.tolist()]
    assert vllms.engine_ids.count(IMAGE_PAD) == 3


def test_bounds_that_give_one_size_share_a_key_and_other_sizes_do_not(processor):
    inputs = ImageInputs(processor.image_processor)
    image = noise(3, (300, 200))
    first = inputs([ImagePart(image, 3136, 20_000)], **REQUEST_BOUNDS)
    same_size = inputs([ImagePart(image, 3136, 20_001)], **REQUEST_BOUNDS)
    larger = inputs([ImagePart(image, 3136, 80_000)], **REQUEST_BOUNDS)
    assert first.image_grid_thw.tolist() == same_size.image_grid_thw.tolist() != larger.image_grid_thw.tolist()
    assert first.keys == same_size.keys != larger.keys  # the key is the content and the processed size


def test_two_resolutions_of_one_image_are_cached_apart(tiny_engine):
    """The encoder cache and the prefix cache key an image by its content and processed size: a second
    resolution of an image is encoded on its own and reuses no block past the text before it, and a
    resolution asked again comes from the caches with the same greedy answer."""
    engine = tiny_engine
    image = noise(4, (280, 196))
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)

    def ask(max_pixels: int):
        turn = ChatTurn("user", [ImagePart(image, 3136, max_pixels), "What is in this picture?"])
        prompt = engine.prompts.build([turn], **REQUEST_BOUNDS)
        encoded, hits = engine.runner.images_encoded, engine.prefix_cache_counts[1]
        done = asyncio.run(engine.run_to_completion(prompt, params))
        return prompt, done.text, engine.runner.images_encoded - encoded, engine.prefix_cache_counts[1] - hits

    low, low_text, low_encoded, _ = ask(6_000)
    high, _, high_encoded, high_hits = ask(50_000)
    assert low.input_ids.count(IMAGE_PAD) < high.input_ids.count(IMAGE_PAD)
    assert (low_encoded, high_encoded) == (1, 1)
    assert high_hits <= high.input_ids.index(IMAGE_PAD)  # at most the text before the image
    again, again_text, again_encoded, again_hits = ask(6_000)
    assert again.input_ids == low.input_ids and again_text == low_text
    assert again_encoded == 0 and again_hits >= again.num_tokens - 2 * engine.cache.block_size
