"""Chat turns -> what vLLM takes: token ids with one placeholder per image or video, and the media.

The ids come from Snark's own ``PromptBuilder`` (the same chat template; client text cannot forge
control tokens or image slots), so a prompt has the same tokens on both engines. The differences:

- Images are resized here, each to the size Qwen2-VL's image processor would pick under its own
  pixel bounds (its ``smart_resize``; a chat image's ``detail`` or ``min_pixels``/``max_pixels``, else
  the request's), and handed to vLLM as those PIL images. vLLM's own resizer,
  bounded by one merged patch (28 x 28) and the server's max pixels (``args.engine_args``), then
  keeps their size: the resolution cap holds, and each image has the same token count as on
  Snark's own engine.
- Videos arrive sampled and resized already (``snark.video``). Each goes to vLLM as its frames and
  the metadata Qwen2.5-VL's processor reads (``video_item``): every frame a sampled one, so vLLM
  samples none (the engine's ``do_sample_frames=False`` holds too), and an fps of
  ``2 / second_per_grid_t``, from which the processor computes the M-RoPE time step back. The
  request's video size bounds (``mm_processor_kwargs``) hold every frame as it is, so vLLM resizes
  none. Each video's ``key`` names it to vLLM's caches (``multi_modal_uuids``), so its frames are not
  hashed again at every turn.
- vLLM expands each ``<|image_pad|>`` and ``<|video_pad|>`` to its item's tokens itself, so the
  expanded runs that Snark counts (``input_ids``, for usage and limits) are collapsed to one pad each
  (``engine_ids``). No pixel values are computed here: vLLM's processor does that work once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from snark.engine.image_inputs import ImageInputs, VideoInputs
from snark.engine.prompt import IMAGE_PAD, VIDEO_PAD, PromptBuilder
from snark.engine.request import PromptInputs
from snark.errors import InvalidRequest
from snark.values import ChatTurn, ImagePart, ToolSpec
from snark.video.clip import Video
from snark.video.sampling import PIXEL_FACTOR

# The smallest frame Snark samples (one merged patch): the lower video bound vLLM resizes under.
SMALLEST_FRAME_PIXELS = PIXEL_FACTOR**2


@dataclass
class VllmPrompt(PromptInputs):
    """``input_ids`` as Snark counts them (pads expanded); ``engine_ids`` as vLLM takes them."""

    engine_ids: list[int] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)  # resized, in prompt order
    videos: list[Video] = field(default_factory=list)  # sampled and resized, in prompt order

    def multi_modal_fields(self) -> dict[str, Any]:
        """The media fields of vLLM's ``TokensPrompt`` for this prompt (none for a text prompt)."""
        data: dict[str, list] = {}
        fields: dict[str, Any] = {}
        if self.images:
            data["image"] = self.images
        if self.videos:
            data["video"] = [video_item(video) for video in self.videos]
            fields["mm_processor_kwargs"] = {"videos_kwargs": {"size": video_size_bounds(self.videos)}}
            fields["multi_modal_uuids"] = {"video": [video.key.hex() for video in self.videos]}
        if data:
            fields["multi_modal_data"] = data
        return fields


def video_item(video: Video) -> tuple[Any, dict[str, Any]]:
    """One video as vLLM's Qwen2.5-VL processor takes it: ``([frames, height, width, 3] uint8, metadata)``.

    The metadata says every frame is a sampled one (nothing to sample) at ``video.sample_fps``; the
    processor turns it back into ``second_per_grid_t = 2 / fps`` for the M-RoPE time axis."""
    frames = video.num_frames
    fps = video.sample_fps
    metadata = {
        "fps": fps,
        "duration": frames / fps,
        "total_num_frames": frames,
        "frames_indices": list(range(frames)),
        "do_sample_frames": False,
    }
    return video.frames, metadata


def video_size_bounds(videos: Sequence[Video]) -> dict[str, int]:
    """Pixel bounds that hold every frame of ``videos`` as it is: the video processor's resizer
    (``smart_resize``, factor 28) then keeps each frame's size, and with it the token count."""
    largest = max(video.height * video.width for video in videos)
    return {"shortest_edge": SMALLEST_FRAME_PIXELS, "longest_edge": largest}


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
    """``max_item_tokens``: the most tokens vLLM takes for one image or video (its encoder cache);
    None when the running vLLM does not say."""

    def __init__(self, processor, *, max_prompt_tokens: int, max_item_tokens: int | None = None) -> None:
        self.sizer = ImageSizer(processor.image_processor)
        self.builder = PromptBuilder(processor, max_prompt_tokens=max_prompt_tokens)
        # Token counts only: vLLM computes the pixel values.
        self.builder.image_inputs = ImageInputs(self.sizer)
        self.builder.video_inputs = VideoInputs(None, patch_size=self.sizer.patch_size)
        self.image_pad_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.video_pad_id = processor.tokenizer.convert_tokens_to_ids(VIDEO_PAD)
        self.max_item_tokens = max_item_tokens

    def build(
        self, turns: list[ChatTurn], *, min_pixels: int, max_pixels: int, tools: Sequence[ToolSpec] = ()
    ) -> VllmPrompt:
        """CPU work (resizing): call it off the event loop."""
        # Counted on the images as decoded, as Snark's own engine does: smart_resize is not idempotent
        # where its result breaks the bounds (a small cap floors both sides), so never count a resized one.
        counted = self.builder.build(turns, min_pixels=min_pixels, max_pixels=max_pixels, tools=tools)
        parts = [part for turn in turns for part in turn.parts]
        images = [
            self._resized(p, min_pixels=min_pixels, max_pixels=max_pixels)
            for p in parts
            if isinstance(p, Image.Image | ImagePart)
        ]
        image_counts = self._token_counts(counted.image_grid_thw)
        video_counts = self._token_counts(counted.video_grid_thw)
        self._check_item_tokens(
            image_counts, "An image", "send a smaller image (chat: max_pixels or detail 'low'; forms: max_image_pixels)"
        )
        self._check_item_tokens(video_counts, "A video", "sample fewer or smaller frames (fps, max_frames, max_pixels)")
        return VllmPrompt(
            input_ids=counted.input_ids,
            image_grid_thw=counted.image_grid_thw,
            video_grid_thw=counted.video_grid_thw,
            second_per_grid_ts=counted.second_per_grid_ts,
            video_keys=counted.video_keys,
            engine_ids=collapse_pads(
                counted.input_ids, {self.image_pad_id: image_counts, self.video_pad_id: video_counts}
            ),
            images=images,
            videos=[part for part in parts if isinstance(part, Video)],
        )

    def from_ids(self, ids: Sequence[int], *, param: str = "prompt") -> VllmPrompt:
        """A raw prompt (no template, no media): vLLM takes the ids as they are. Checked as on Snark's engine."""
        checked = self.builder.from_ids(ids, param=param)
        return VllmPrompt(input_ids=checked.input_ids, engine_ids=list(checked.input_ids))

    def _token_counts(self, grid_thw: torch.Tensor | None) -> list[int]:
        return [] if grid_thw is None else (grid_thw.prod(-1) // self.sizer.merge_size**2).tolist()

    def _check_item_tokens(self, counts: list[int], noun: str, hint: str) -> None:
        """vLLM keeps one item's vision features whole in its encoder cache; a larger item it refuses,
        with advice about its own flags: refuse it here instead, naming Snark's settings."""
        largest = max(counts, default=0)
        if self.max_item_tokens is not None and largest > self.max_item_tokens:
            raise InvalidRequest(
                f"{noun} here is {largest} tokens; the vLLM engine takes at most {self.max_item_tokens} tokens of one "
                f"image or video (its encoder cache): {hint}. The server's operator can raise the cap with "
                "max_num_batched_tokens in VLLM_ENGINE_ARGS.",
                code="context_length_exceeded",
            )

    def _resized(self, part: Image.Image | ImagePart, *, min_pixels: int, max_pixels: int) -> Image.Image:
        """The image at its size under its own bounds (an ``ImagePart``'s) or the request's."""
        if isinstance(part, ImagePart):
            image, min_pixels, max_pixels = part.image, part.min_pixels, part.max_pixels
        else:
            image = part
        height, width = self.sizer.target_size(image, min_pixels=min_pixels, max_pixels=max_pixels)
        if (width, height) == image.size:
            return image
        return image.resize((width, height), Image.Resampling.BICUBIC)  # the image processor's resample mode


def collapse_pads(ids: list[int], runs: dict[int, list[int]]) -> list[int]:
    """``ids`` with each pad run reduced to one pad: ``runs[pad_id][i]`` is the length of that pad's
    i-th run. Only the template puts pads in a prompt (client text is tokenized with special tokens
    split), so runs are exact."""
    lengths = {pad: iter(counts) for pad, counts in runs.items()}
    out: list[int] = []
    position = 0
    while position < len(ids):
        token = ids[position]
        out.append(token)
        position += next(lengths[token]) if token in lengths else 1
    return out
