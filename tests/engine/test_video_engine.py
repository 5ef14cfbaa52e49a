"""Videos through the prompt builder and Snark's engine on the tiny model: the prompt is what
Qwen2.5-VL's own processor makes of the same frames, video rows batch with text and image rows
(greedy output the same alone or together, chunked or not), and a video asked about again is
encoded once and found in the prefix cache."""

from __future__ import annotations

import asyncio

import pytest
from PIL import Image
from transformers import AutoProcessor

from snark.engine.request import PromptInputs
from snark.values import ChatTurn, SamplingParams
from snark.video.decode import DecodeLimits, decode_video
from snark.video.sampling import VideoSampling
from tests.conftest import start_engine
from tests.videos import make_video

PARAMS = SamplingParams(max_new_tokens=8, ignore_eos=True)
SAMPLING = VideoSampling(min_pixels=16 * 784, max_pixels=96 * 784, total_pixels=2048 * 784)


def clip(frames: int = 24, **options):
    return decode_video(make_video(frames, **options), SAMPLING, DecodeLimits())


def build(engine, parts: list) -> PromptInputs:
    return engine.prompts.build([ChatTurn("user", parts)], min_pixels=3136, max_pixels=100_000)


def generate(engine, *prompts: PromptInputs) -> list[str]:
    async def run():
        done = await asyncio.gather(*(engine.run_to_completion(prompt, PARAMS) for prompt in prompts))
        return [request.text for request in done]

    return asyncio.run(run())


@pytest.fixture(scope="module")
def chunked(tiny_model_dir):
    """Prompts prefilled 24 tokens a step: a video's tokens span many steps."""
    engine = start_engine(tiny_model_dir, max_batch_size=4, max_prefill_tokens=24)
    yield engine
    engine.stop()


def test_the_prompt_is_what_qwens_processor_makes_of_the_frames(tiny_engine, tiny_model_dir):
    video, image = clip(30, fps=10, width=160, height=90), Image.new("RGB", (100, 80), (200, 30, 30))
    prompt = build(tiny_engine, [image, "First this,", video, "then what happens?"])
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    content = [
        {"type": "image"},
        {"type": "text", "text": "First this,"},
        {"type": "video"},
        {"type": "text", "text": "then what happens?"},
    ]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    expected = processor(
        text=[text],
        images=[image],
        videos=[video.frames],
        return_tensors="pt",
        images_kwargs={"size": {"shortest_edge": 3136, "longest_edge": 100_000}},
        videos_kwargs={"do_sample_frames": False, "cap_pixels_per_frame": False},
    )
    assert prompt.input_ids == expected["input_ids"][0].tolist()
    assert prompt.video_grid_thw.tolist() == expected["video_grid_thw"].tolist()
    assert prompt.pixel_values_videos.equal(expected["pixel_values_videos"])
    assert prompt.second_per_grid_ts == (video.second_per_grid_t,)  # from the frames' timestamps


def test_video_rows_answer_the_same_alone_and_batched(tiny_engine, chunked):
    video, other = clip(24), clip(40, fps=10, width=96)
    image = Image.new("RGB", (100, 80), (10, 200, 30))
    prompts = [
        build(tiny_engine, parts)
        for parts in ([video, "What happens?"], [image, "and", other, "compare"], ["Just text."])
    ]
    alone = [generate(tiny_engine, prompt)[0] for prompt in prompts]
    assert generate(tiny_engine, *prompts) == alone
    assert generate(chunked, *prompts) == alone  # video tokens split over many prefill steps


def test_two_videos_in_one_prompt_keep_their_own_times(tiny_engine):
    slow, fast = clip(32, fps=4), clip(32, fps=16)  # same frames, 8 s and 2 s long
    prompt = build(tiny_engine, [slow, fast, "Which is faster?"])
    spans = [grid[0] * seconds for grid, seconds in zip(prompt.video_grid_thw.tolist(), prompt.second_per_grid_ts)]
    assert prompt.num_videos == 2 and spans[0] == pytest.approx(8, rel=0.1) and spans[1] == pytest.approx(2, rel=0.4)
    assert len(generate(tiny_engine, prompt)[0]) > 0


def test_a_video_asked_about_again_is_encoded_once_and_its_prefix_cached(chunked):
    video = clip(26)  # not seen by the tests before
    first = build(chunked, [video, "What happens? " * 3])
    before_encoded, before_hits = chunked.runner.images_encoded, chunked.prefix_cache_counts[1]
    answer = generate(chunked, first)[0]
    again = build(chunked, [video, "What happens? " * 3])
    assert generate(chunked, again)[0] == answer
    assert chunked.runner.images_encoded - before_encoded == 1
    assert chunked.prefix_cache_counts[1] - before_hits >= again.num_tokens - 24 - chunked.cache.block_size
    other = build(chunked, [clip(26, fps=4), "What happens? " * 3])  # same size and count, other content
    generate(chunked, other)
    assert chunked.runner.images_encoded - before_encoded == 2
