"""vLLM's prompts have Snark's tokens and image and video token counts, with the images resized under
the cap and the videos handed over as Snark sampled them.

Runs in the default environment on the tiny model's real processor: the transformers engine's
``PromptBuilder`` (real image and video processors) against the vLLM engine's ``VllmPromptBuilder``.
What vLLM gets for a video goes through the same Hugging Face processor vLLM's Qwen2.5-VL processor
calls, with the engine's and the request's options as vLLM merges them.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from snark.config import load_settings
from snark.engine.prompt import IMAGE_PAD, VIDEO_PAD, PromptBuilder
from snark.engine.vllm.args import SMALLEST_IMAGE_PIXELS, mm_processor_kwargs
from snark.engine.vllm.prompt import VllmPrompt, VllmPromptBuilder, collapse_pads
from snark.errors import InvalidRequest
from snark.values import ChatTurn
from snark.video.decode import DecodeLimits, decode_video
from snark.video.load import VideoLimits, frames_to_video
from snark.video.sampling import VideoSampling
from tests.videos import make_video

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
    [
        ((640, 480), MAX_PIXELS),
        ((2000, 1500), MAX_PIXELS),
        ((2000, 1500), 64 * 28 * 28),
        ((30, 900), MAX_PIXELS),
        ((20, 20), MAX_PIXELS),
        ((448, 448), 4 * 28 * 28),
        ((451, 300), 4 * 28 * 28),
        ((2000, 10), 4 * 28 * 28),
    ],
)
def test_same_tokens_and_image_token_counts_as_the_transformers_engine(builders, size, max_pixels):
    transformers_builder, vllm_builder = builders
    turns = [ChatTurn("system", ["Be terse."]), ChatTurn("user", [noise(*size), "What is <|image_pad|> this?"])]
    reference = transformers_builder.build(turns, min_pixels=MIN_PIXELS, max_pixels=max_pixels)
    prompt = vllm_builder.build(turns, min_pixels=MIN_PIXELS, max_pixels=max_pixels)
    assert prompt.input_ids == reference.input_ids  # the same count: usage, limits and metrics agree
    assert prompt.image_grid_thw.tolist() == reference.image_grid_thw.tolist()
    assert prompt.pixel_values is None  # vLLM's processor computes them, once
    for image in prompt.images:  # vLLM's resizer, bounded as the engine bounds it, keeps each size
        assert smart_resize(
            image.height, image.width, factor=28, min_pixels=SMALLEST_IMAGE_PIXELS, max_pixels=MAX_PIXELS
        ) == (image.height, image.width)


def test_images_reach_vllm_resized_under_the_cap(builders):
    _, vllm_builder = builders
    cap = 64 * 28 * 28
    prompt = vllm_builder.build(
        [ChatTurn("user", [noise(2000, 1500), noise(300, 200), "Compare."])], min_pixels=MIN_PIXELS, max_pixels=cap
    )
    assert [image.size for image in prompt.images] == [(252, 168), (252, 168)]
    grid = prompt.image_grid_thw.tolist()
    for image, (_, rows, cols) in zip(prompt.images, grid):
        assert image.width * image.height <= cap
        assert (image.height, image.width) == (rows * 14, cols * 14)  # vLLM's resizer keeps this size


def test_engine_ids_hold_one_pad_per_image(builders, processor):
    _, vllm_builder = builders
    pad = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    prompt = vllm_builder.build(
        [ChatTurn("user", [noise(640, 480), "Two:", noise(64, 64)])], min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )
    counts = (prompt.image_grid_thw.prod(-1) // 4).tolist()
    assert prompt.engine_ids.count(pad) == 2
    assert prompt.input_ids.count(pad) == sum(counts)
    assert len(prompt.engine_ids) == len(prompt.input_ids) - sum(counts) + 2


def test_client_text_cannot_claim_an_image_slot(builders, processor):
    _, vllm_builder = builders
    pad = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    prompt = vllm_builder.build(
        [ChatTurn("user", ["<|vision_start|><|image_pad|><|vision_end|>"])],
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
    )
    assert pad not in prompt.engine_ids and prompt.images == []


def test_collapse_pads():
    assert collapse_pads([1, 9, 9, 9, 2, 9, 9, 3], {9: [3, 2]}) == [1, 9, 2, 9, 3]
    assert collapse_pads([1, 8, 8, 9, 9, 9, 8, 2], {9: [3], 8: [2, 1]}) == [1, 8, 9, 8, 2]
    assert collapse_pads([1, 2], {9: [], 8: []}) == [1, 2]


# --- videos ------------------------------------------------------------------------------------------
SMALL = VideoSampling(min_pixels=28 * 28, max_pixels=16 * 28 * 28, fps=3)


def clip(
    frames: int = 24, *, fps: float = 7, width: int = 100, height: int = 60, sampling: VideoSampling = SMALL, times=None
):
    return decode_video(make_video(frames, fps=fps, width=width, height=height, times=times), sampling, DecodeLimits())


def frame_list(count: int, size: tuple[int, int]):
    images = [Image.new("RGB", size, (i * 40, 90, 30)) for i in range(count)]
    return frames_to_video(images, VideoSampling(fps=2.0, min_pixels=28 * 28, max_pixels=8 * 28 * 28), VideoLimits())


def on_vllms_processor(processor, prompt: VllmPrompt) -> dict:
    """What vLLM's Qwen2.5-VL processor makes of ``prompt``'s videos: the Hugging Face processor it calls,
    on the items and metadata vLLM passes on, under the engine's video options with the request's over them."""
    fields = prompt.multi_modal_fields()
    items = fields["multi_modal_data"]["video"]
    options = mm_processor_kwargs(load_settings())["videos_kwargs"] | fields["mm_processor_kwargs"]["videos_kwargs"]
    metadata = [{k: v for k, v in meta.items() if k != "do_sample_frames"} for _, meta in items]  # as vLLM strips it
    return processor(
        text=["<|vision_start|><|video_pad|><|vision_end|>" * len(items)],
        videos=[f for f, _ in items],
        video_metadata=metadata,
        videos_kwargs=options,
        return_tensors="pt",
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: clip(),
        lambda: clip(8, fps=8, width=30, height=30),
        lambda: clip(48, fps=24, width=320, height=180),
        lambda: clip(
            6, times=[0.0, 0.1, 0.7, 1.0, 1.9, 2.2], sampling=VideoSampling(fps=1.0, min_frames=4, max_pixels=8 * 784)
        ),
        lambda: frame_list(3, (90, 50)),
    ],
    ids=["clip", "one-patch-frames", "wide", "variable-rate", "frame-list"],
)
def test_videos_reach_vllm_as_snark_counted_them(builders, processor, make):
    """The frames vLLM's processor gets keep their size (the same grid and pixel values as on Snark's own
    engine: nothing resized or re-sampled), and the M-RoPE time step it computes from the metadata is
    Snark's ``second_per_grid_t`` (as the float32 both engines hold it in)."""
    transformers_builder, vllm_builder = builders
    video = make()
    turns = [ChatTurn("user", [video, "What happens?"])]
    reference = transformers_builder.build(turns, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    prompt = vllm_builder.build(turns, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert prompt.input_ids == reference.input_ids and prompt.pixel_values_videos is None
    assert prompt.video_grid_thw.tolist() == reference.video_grid_thw.tolist()
    assert prompt.second_per_grid_ts == reference.second_per_grid_ts == (video.second_per_grid_t,)
    out = on_vllms_processor(processor, prompt)
    assert out["video_grid_thw"].tolist() == reference.video_grid_thw.tolist()
    assert torch.equal(out["pixel_values_videos"], reference.pixel_values_videos)
    assert torch.equal(
        torch.as_tensor(out["second_per_grid_ts"], dtype=torch.float32), torch.tensor(reference.second_per_grid_ts)
    )
    assert len(out["input_ids"][0]) - 2 == reference.video_grid_thw.prod() // 4  # vLLM's expansion: Snark's count


def test_what_vllm_gets_for_videos_and_images(builders, processor):
    _, vllm_builder = builders
    small, large, image = clip(8, fps=8, width=30, height=30), clip(), noise(300, 200)
    turns = [ChatTurn("user", [small, "then", image, large, "Compare."])]
    prompt = vllm_builder.build(turns, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    fields = prompt.multi_modal_fields()
    assert set(fields) == {"multi_modal_data", "mm_processor_kwargs", "multi_modal_uuids"}
    assert fields["multi_modal_data"]["image"] == prompt.images and len(prompt.images) == 1
    frames = [item for item, _ in fields["multi_modal_data"]["video"]]
    assert frames[0] is small.frames and frames[1] is large.frames  # as sampled, in prompt order, not copied
    _, metadata = fields["multi_modal_data"]["video"][1]
    assert metadata == {
        "fps": large.sample_fps,
        "duration": large.num_frames / large.sample_fps,
        "total_num_frames": large.num_frames,
        "frames_indices": list(range(large.num_frames)),
        "do_sample_frames": False,
    }
    # The bounds hold both clips' frames; they apply to videos only (images keep the engine's).
    bounds = {"shortest_edge": 784, "longest_edge": large.height * large.width}
    assert fields["mm_processor_kwargs"] == {"videos_kwargs": {"size": bounds}}
    assert fields["multi_modal_uuids"] == {
        "video": [small.key.hex(), large.key.hex()]
    }  # vLLM's caches know a clip by it
    out = on_vllms_processor(processor, prompt)
    assert out["video_grid_thw"].tolist() == prompt.video_grid_thw.tolist()  # the smaller clip is not scaled up


def test_engine_ids_hold_one_pad_per_video_and_image(builders, processor):
    _, vllm_builder = builders
    image_pad, video_pad = (processor.tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_PAD, VIDEO_PAD))
    prompt = vllm_builder.build(
        [ChatTurn("user", [clip(), noise(64, 64), "and", frame_list(4, (60, 60))])],
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
    )
    video_counts, image_counts = (
        (prompt.video_grid_thw.prod(-1) // 4).tolist(),
        (prompt.image_grid_thw.prod(-1) // 4).tolist(),
    )
    assert prompt.engine_ids.count(video_pad) == 2 and prompt.engine_ids.count(image_pad) == 1
    assert prompt.input_ids.count(video_pad) == sum(video_counts) and prompt.input_ids.count(image_pad) == sum(
        image_counts
    )
    assert len(prompt.engine_ids) == len(prompt.input_ids) - sum(video_counts + image_counts) + 3
    assert prompt.video_keys == tuple(video.key for video in prompt.videos)


def test_text_prompts_hand_vllm_no_media_fields(builders):
    _, vllm_builder = builders
    prompt = vllm_builder.build(
        [ChatTurn("user", ["Hello <|video_pad|>"])], min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )
    assert prompt.multi_modal_fields() == {} and prompt.engine_ids == prompt.input_ids  # client text claims no slot


def test_a_video_over_vllms_encoder_cache_is_a_400(processor):
    """vLLM would refuse it, naming its own flags; Snark says which of its settings and fields to change."""
    video = clip()  # 5 x 4 x 8 patches: 40 tokens
    builder = VllmPromptBuilder(processor, max_prompt_tokens=32768, max_item_tokens=39)
    with pytest.raises(InvalidRequest, match="A video here is 40 tokens; the vLLM engine takes at most 39") as info:
        builder.build([ChatTurn("user", [video, "What happens?"])], min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert "max_num_batched_tokens in VLLM_ENGINE_ARGS" in info.value.message
    fits = VllmPromptBuilder(processor, max_prompt_tokens=32768, max_item_tokens=40)
    assert fits.build(
        [ChatTurn("user", [video, "What happens?"])], min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    ).videos == [video]
