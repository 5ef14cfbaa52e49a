"""Qwen2.5-VL's 3-D rope positions (M-RoPE) for a prompt with images and videos.

Every token has a (time, height, width) position. Text counts up on all three axes alike. An image
or video lays its merged patches out on a grid starting where the text got to: height and width
step by one per merged patch (each image token covers 2 x 2 patches), and a video's frame pairs step
in time by ``second_per_grid_t * tokens_per_second``, truncated to an integer: position ``p`` for
pair ``p``, so time on the axis is real time (a slow clip and a fast one read differently). An
image is one frame pair at time 0. The text after an item goes on from the largest position the
item used, plus one, as Qwen2.5-VL was trained (its reference code, and vLLM); after the prompt,
generated token ``i`` sits at ``i + delta`` on all three axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GridItem:
    """One image or video in a prompt: its placeholder tokens start at ``start``; ``grid`` is its
    (frame pairs, height, width) in patches; ``time_step`` is how far its time position moves per
    frame pair (``second_per_grid_t * tokens_per_second`` for a video, 0 for an image)."""

    start: int
    grid: tuple[int, int, int]
    time_step: float = 0.0


def mrope_positions(length: int, items: Sequence[GridItem], *, merge: int) -> tuple[torch.Tensor, int]:
    """``[3, length]`` positions of a prompt of ``length`` tokens with ``items`` in order, and the
    ``delta`` that places generated tokens after it (token ``i`` at ``i + delta``)."""
    parts: list[torch.Tensor] = []
    cursor = position = 0  # the next token, and the position the next text token takes
    for item in items:
        if item.start > cursor:
            parts.append(torch.arange(position, position + item.start - cursor).expand(3, -1))
            position += item.start - cursor
        pairs, height, width = item.grid[0], item.grid[1] // merge, item.grid[2] // merge
        # float64, as Python floats: the time step's product is truncated the way vLLM truncates it
        times = (torch.arange(pairs, dtype=torch.float64) * item.time_step).long()
        t, h, w = torch.meshgrid(times, torch.arange(height), torch.arange(width), indexing="ij")
        grid = torch.stack([t.flatten(), h.flatten(), w.flatten()]) + position  # [3, pairs * height * width]
        parts.append(grid)
        position = int(grid.max()) + 1
        cursor = item.start + grid.shape[1]
    if length > cursor:
        parts.append(torch.arange(position, position + length - cursor).expand(3, -1))
        position += length - cursor
    positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
    return positions, position - length
