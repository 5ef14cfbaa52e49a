"""M-RoPE positions: images as transformers computes them, videos as Qwen2.5-VL was trained (text after
a video goes on after its last time position, as in Qwen's reference code and vLLM)."""

from __future__ import annotations

import torch
from PIL import Image

from snark.engine.transformers.mrope import GridItem, mrope_positions
from snark.values import ChatTurn


def test_text_then_video_then_text():
    # 3 text tokens, a video of 3 frame pairs of 4 x 4 patches (2 x 2 tokens each), 2 text tokens
    positions, delta = mrope_positions(17, [GridItem(start=3, grid=(3, 4, 4), time_step=2.5)], merge=2)
    assert positions[:, :3].tolist() == [[0, 1, 2]] * 3
    video = positions[:, 3:15]
    assert video[0].tolist() == [3] * 4 + [5] * 4 + [8] * 4  # int(p * 2.5): 0, 2, 5
    assert video[1].tolist() == [3, 3, 4, 4] * 3 and video[2].tolist() == [3, 4, 3, 4] * 3
    assert positions[:, 15:].tolist() == [[9, 10]] * 3  # after the largest position the video used
    assert delta == 11 - 17  # the first generated token (index 17) sits at 11


def test_text_only():
    positions, delta = mrope_positions(5, [], merge=2)
    assert positions.tolist() == [list(range(5))] * 3 and delta == 0


def test_images_are_placed_as_transformers_places_them(tiny_engine):
    images = [Image.new("RGB", (112, 56), (200, 0, 0)), Image.new("RGB", (56, 168), (0, 200, 0))]
    turns = [ChatTurn("user", [images[0], "one", images[1], "two"])]
    prompt = tiny_engine.prompts.build(turns, min_pixels=3136, max_pixels=100_000)
    model = tiny_engine.loaded.model
    ids = torch.tensor([prompt.input_ids])
    kinds = (ids == model.config.image_token_id).long()
    expected, expected_delta = model.model.get_rope_index(ids, kinds, prompt.image_grid_thw)
    starts = [i for i, t in enumerate(prompt.input_ids) if t == model.config.image_token_id]
    first = [starts[0]] + [b for a, b in zip(starts, starts[1:]) if b != a + 1]
    items = [GridItem(start=s, grid=tuple(g.tolist())) for s, g in zip(first, prompt.image_grid_thw)]
    positions, delta = mrope_positions(prompt.num_tokens, items, merge=2)
    assert positions.tolist() == expected[:, 0].tolist() and delta == int(expected_delta)
