"""Chat turns -> what vLLM takes: token ids with one image placeholder per image, and the images.

The ids come from Snark's own ``PromptBuilder`` (the same chat template; client text cannot forge
control tokens or image slots), so a prompt has the same tokens on both engines. Two differences:

- Images are resized here, to the size Qwen2-VL's image processor would pick under this request's
  pixel bounds (its ``smart_resize``), and handed to vLLM as those PIL images. vLLM's own resizer,
  bounded by one merged patch (28 x 28) and the server's max pixels (``args.engine_args``), then
  keeps their size: the resolution cap holds, and each image has the same token count as on
  Snark's own engine.
- vLLM expands each ``<|image_pad|>`` to its image's tokens itself, so the expanded runs that Snark
  counts (``input_ids``, for usage and limits) are collapsed to one pad each (``engine_ids``). No
  pixel values are computed here: vLLM's processor does that work once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from snark.engine.image_inputs import ImageInputs
from snark.engine.prompt import IMAGE_PAD, PromptBuilder
from snark.engine.request import ChatTurn, PromptInputs, ToolSpec


@dataclass
class VllmPrompt(PromptInputs):
    """``input_ids`` as Snark counts them (image pads expanded); ``engine_ids`` as vLLM takes them."""

    engine_ids: list[int] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)  # resized, in prompt order


class ImageSizer:
    """Qwen2-VL's image geometry without its pixel work: each image's resize target and grid.

    Stands in for the image processor inside ``PromptBuilder``, which only reads the grid from it."""

    def __init__(self, image_processor) -> None:
        self.patch_size = int(image_processor.patch_size)
        self.merge_size = int(image_processor.merge_size)

    def target_size(self, image: Image.Image, *, min_pixels: int, max_pixels: int) -> tuple[int, int]:
        """(height, width) the image processor resizes ``image`` to under these bounds."""
        factor = self.patch_size * self.merge_size
        return smart_resize(image.height, image.width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)

    def __call__(self, *, images: list[Image.Image], size: dict[str, int], return_tensors: str = "pt") -> dict:
        grid = []
        for image in images:
            height, width = self.target_size(image, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
            grid.append([1, height // self.patch_size, width // self.patch_size])  # one temporal patch per image
        return {"pixel_values": None, "image_grid_thw": torch.tensor(grid, dtype=torch.long)}


class VllmPromptBuilder:
    def __init__(self, processor, *, max_prompt_tokens: int) -> None:
        self.sizer = ImageSizer(processor.image_processor)
        self.builder = PromptBuilder(processor, max_prompt_tokens=max_prompt_tokens)
        self.builder.image_inputs = ImageInputs(self.sizer)  # token counts only: vLLM computes the pixel values
        self.image_pad_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    def build(self, turns: list[ChatTurn], *, min_pixels: int, max_pixels: int, tools: Sequence[ToolSpec] = ()) -> VllmPrompt:
        """CPU work (resizing): call it off the event loop."""
        # Counted on the images as decoded, as Snark's own engine does: smart_resize is not idempotent
        # where its result breaks the bounds (a small cap floors both sides), so never count a resized one.
        counted = self.builder.build(turns, min_pixels=min_pixels, max_pixels=max_pixels, tools=tools)
        images = [
            self._resized(part, min_pixels=min_pixels, max_pixels=max_pixels)
            for turn in turns
            for part in turn.parts
            if isinstance(part, Image.Image)
        ]
        counts = [] if counted.image_grid_thw is None else (counted.image_grid_thw.prod(-1) // self.sizer.merge_size**2).tolist()
        return VllmPrompt(
            input_ids=counted.input_ids,
            image_grid_thw=counted.image_grid_thw,
            engine_ids=collapse_image_pads(counted.input_ids, self.image_pad_id, counts),
            images=images,
        )

    def _resized(self, image: Image.Image, *, min_pixels: int, max_pixels: int) -> Image.Image:
        height, width = self.sizer.target_size(image, min_pixels=min_pixels, max_pixels=max_pixels)
        if (width, height) == image.size:
            return image
        return image.resize((width, height), Image.Resampling.BICUBIC)  # the image processor's resample mode


def collapse_image_pads(ids: list[int], pad_id: int, counts: list[int]) -> list[int]:
    """``ids`` with each image's run of ``counts[i]`` pad tokens reduced to one pad. Only the template
    puts pads in a prompt (client text is tokenized with special tokens split), so runs are exact."""
    out: list[int] = []
    runs = iter(counts)
    position = 0
    while position < len(ids):
        token = ids[position]
        out.append(token)
        position += next(runs) if token == pad_id else 1
    return out
