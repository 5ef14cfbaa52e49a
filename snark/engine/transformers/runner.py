"""Executes one ``StepPlan``: one flat batch of tokens through the model, logits for the rows that sample.

The runner changes no row's bookkeeping (the engine does, after the step); it reads each scheduled
row's next tokens and builds what the flat model needs:

* **embeddings**: token embeddings, with image and video placeholder positions filled from their
  vision features. Features come from the encoder cache, or from one batched vision-tower call for
  every image and video this step needs that is not there (both are patches of 2 frames x 14 x 14
  pixels to the tower); a row keeps their features until their tokens are all computed, so a chunk
  boundary inside an image costs nothing;
* **positions**: Qwen2.5-VL's 3-D rope (M-RoPE). A prompt's positions are computed once (``mrope.py``:
  image tokens get 2-D grid positions; a video's frame pairs also step in time, by their
  ``second_per_grid_ts``); generated token ``i`` sits at
  ``i + rope_delta`` on all three axes;
* **slots and attention**: each token's place in its row's blocks, and the ``AttentionPlan``: decode
  rows in groups of similar length (placed first and contiguously in the flat batch), then prefill
  chunks. A step of decode rows alone replays a captured CUDA graph where the engine made them
  (``graphs.py``).

Rows that score their prompt (``SamplingParams.prompt_logprobs``) also get, for the prompt positions
this step computed, each next prompt token's logprob (``logprobs.score_prompt``): one chunk at a
time, as the prompt is prefilled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from snark.engine.loader import LoadedModel
from snark.engine.request import PromptInputs
from snark.engine.transformers.blocks import ImageSpan, blocks_for, padded_table
from snark.engine.transformers.encoder_cache import EncoderCache
from snark.engine.transformers.graphs import DecodeGraphs
from snark.engine.transformers.kv_cache import KVCache
from snark.engine.transformers.logprobs import Scored, score_prompt
from snark.engine.transformers.model import (
    AttentionPlan,
    DecodeGroup,
    FlatLanguageModel,
    PrefillChunk,
    group_by_length,
    onednn_available,
    pack_linears,
)
from snark.engine.transformers.mrope import GridItem, mrope_positions
from snark.engine.transformers.rows import Row
from snark.engine.transformers.scheduler import Scheduled, StepPlan


@dataclass
class StepLogits:
    """What one step computed: the ``[rows, vocab]`` float32 logits of the rows that sample (None:
    none does) and those rows; and, per row that scores its prompt, the scores of its prompt tokens
    from ``first`` on, as ``(row, first, scores)``."""

    logits: torch.Tensor | None
    rows: list[Row]
    prompt_scores: list[tuple[Row, int, list[Scored]]] = field(default_factory=list)


class Runner:
    def __init__(
        self, loaded: LoadedModel, cache: KVCache, encoder_cache: EncoderCache, *, flash: bool = False
    ) -> None:
        self.hf = loaded.model
        self.device, self.dtype = loaded.device, loaded.dtype
        self.cache, self.encoder_cache = cache, encoder_cache
        self.block_size = cache.block_size
        self.packed = onednn_available(self.device, self.dtype)
        if self.packed:
            pack_linears(self.hf.model.visual)
        self.model = FlatLanguageModel(self.hf, packed=self.packed)
        self.flash = flash
        self.graphs: DecodeGraphs | None = None  # captured decode steps (CUDA with flash-attn), set by the engine
        self.merge = self.hf.model.visual.spatial_merge_size
        self.tokens_per_second = loaded.vision_config.tokens_per_second
        self.images_encoded = 0  # images through the vision tower (tests and logs)

    # --- per row, once --------------------------------------------------------------------------
    def prepare(self, row: Row) -> None:
        """The prompt's M-RoPE positions (once per row, kept across preemptions)."""
        if row.positions is not None:
            return
        if not row.images:
            row.positions = torch.arange(row.prompt_tokens, device=self.device).expand(3, -1)
            row.rope_delta = 0
            return
        prompt, items = row.request.prompt, []
        for span in row.images:
            grid = _grids(prompt, span)[span.ordinal].tolist()
            step = prompt.second_per_grid_ts[span.ordinal] * self.tokens_per_second if span.video else 0.0
            items.append(GridItem(start=span.start, grid=tuple(grid), time_step=step))
        positions, row.rope_delta = mrope_positions(row.prompt_tokens, items, merge=self.merge)
        row.positions = positions.to(self.device)

    # --- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepLogits:
        """Run ``plan``: the logits of the rows that sample, and the prompt scores that were asked for."""
        decodes = [s for s in plan.rows if s.tokens == 1]
        prefills = [s for s in plan.rows if s.tokens > 1]
        for s in plan.rows:
            self.prepare(s.row)
        self._encode_images(plan.rows)
        groups = [[decodes[i] for i in group] for group in group_by_length([s.row.computed + 1 for s in decodes])]
        ordered = [s for group in groups for s in group] + prefills
        ids, slots, embeds_from = [], [], []
        offset = 0
        for s in ordered:
            row, start, end = s.row, s.row.computed, s.row.computed + s.tokens
            ids.extend(row.tokens[start:end])
            slots.extend(self._slots(row, start, end))
            if row.images and start < row.prompt_tokens:
                embeds_from.append((offset, row, start, end))
            offset += s.tokens
        input_ids = torch.tensor(ids, device=self.device)
        positions = self._positions(ordered)
        graphs = self._replaying(ordered, embeds_from)
        if graphs is not None:
            lengths, tables = [s.row.computed + 1 for s in ordered], [s.row.blocks for s in ordered]
            # Only decode rows replay: each computes its last token, so none has a prompt token to score.
            logits = graphs.run(input_ids, positions, torch.tensor(slots, device=self.device), lengths, tables)
            return StepLogits(logits, [s.row for s in ordered])
        embeds = self.model.embed_tokens(input_ids)  # [tokens, hidden]
        for at, row, start, end in embeds_from:
            self._fill_images(embeds, at, row, start, end)
        attention = AttentionPlan(slots=torch.tensor(slots, device=self.device))
        if self.flash:
            attention.flash = self._flash_arguments(ordered)
        else:
            self._plan_attention(attention, groups, prefills)
        hidden = self.model.forward(embeds, positions, attention, self.cache)
        last, sampling, offset = [], [], 0
        for s in ordered:
            offset += s.tokens
            if s.samples:
                last.append(offset - 1)
                sampling.append(s.row)
        self._drop_used_features(ordered)
        prompt_scores = self._score_prompts(hidden, ordered)
        if not last:
            return StepLogits(None, [], prompt_scores)
        return StepLogits(self.model.logits(hidden[torch.tensor(last, device=self.device)]), sampling, prompt_scores)

    def _score_prompts(self, hidden: torch.Tensor, ordered: Sequence[Scheduled]) -> list[tuple[Row, int, list[Scored]]]:
        """For each row that scores its prompt: the prompt tokens this step's positions predict (the
        position before each), from the first one it has no score for yet."""
        found: list[tuple[Row, int, list[Scored]]] = []
        at = 0
        for s in ordered:
            row, start = s.row, s.row.computed
            if row.scores_prompt:
                # Position p predicts token p + 1; targets run up to the prompt's last token.
                first = max(start + 1, len(row.prompt_scores) + 1)
                end = min(start + s.tokens, row.prompt_tokens - 1) + 1
                if first < end:
                    states = hidden[at + first - 1 - start : at + end - 1 - start]  # [targets, hidden]
                    top = row.request.params.prompt_logprobs or 0
                    found.append((row, first, score_prompt(self.model.logits, states, row.tokens[first:end], top)))
            at += s.tokens
        return found

    def _replaying(self, ordered: Sequence[Scheduled], embeds_from: list) -> DecodeGraphs | None:
        """The captured decode steps, if this step is one: every row feeds one generated token, and its
        blocks fit the captured block tables."""
        graphs = self.graphs
        if (
            graphs is not None
            and not embeds_from
            and len(ordered) <= graphs.max_rows
            and all(s.tokens == 1 and s.samples and len(s.row.blocks) <= graphs.max_blocks for s in ordered)
        ):
            return graphs
        return None

    def _positions(self, ordered: Sequence[Scheduled]) -> torch.Tensor:
        """``[3, tokens]`` rope positions of the step's tokens: a prompt's from its row, a generated
        token ``i``'s ``i + rope_delta`` on all three axes (built on the host: one copy for all of them)."""
        parts: list[torch.Tensor | list[int]] = []
        for s in ordered:
            row, start, end = s.row, s.row.computed, s.row.computed + s.tokens
            if start < row.prompt_tokens:
                assert row.positions is not None  # execute() prepared every scheduled row
                parts.append(row.positions[:, start : min(end, row.prompt_tokens)])
            if end > row.prompt_tokens:
                generated = [i + row.rope_delta for i in range(max(start, row.prompt_tokens), end)]
                if parts and isinstance(parts[-1], list):
                    parts[-1].extend(generated)
                else:
                    parts.append(generated)
        tensors = [
            p if isinstance(p, torch.Tensor) else torch.tensor(p, device=self.device).expand(3, -1) for p in parts
        ]
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)

    def _slots(self, row: Row, start: int, end: int) -> list[int]:
        """Flat cache slots (``block * block_size + offset``) of the row's tokens ``[start, end)``."""
        size, blocks = self.block_size, row.blocks
        return [blocks[i // size] * size + i % size for i in range(start, end)]

    def _plan_attention(self, plan: AttentionPlan, groups: list[list[Scheduled]], prefills: list[Scheduled]) -> None:
        size, at = self.block_size, 0
        for group in groups:
            lengths = [s.row.computed + 1 for s in group]
            width = blocks_for(max(lengths), size)
            tables = torch.tensor([padded_table(s.row.blocks, width) for s in group], device=self.device)
            columns = torch.arange(width * size, device=self.device)
            mask = (columns[None, :] < torch.tensor(lengths, device=self.device)[:, None])[:, None, None, :]
            plan.decode.append(DecodeGroup(start=at, end=at + len(group), tables=tables, mask=mask))
            at += len(group)
        for s in prefills:
            context, chunk = s.row.computed, s.tokens
            context_tables = None
            if context:
                context_tables = torch.tensor([s.row.blocks[: blocks_for(context + chunk, size)]], device=self.device)
            plan.prefill.append(PrefillChunk(start=at, end=at + chunk, context=context, tables=context_tables))
            at += chunk

    def _flash_arguments(self, ordered: Sequence[Scheduled]) -> dict:
        """flash-attn's varlen call over block tables: every row's queries and its whole context."""
        lengths_q = [s.tokens for s in ordered]
        lengths_k = [s.row.computed + s.tokens for s in ordered]
        width = blocks_for(max(lengths_k), self.block_size)
        tables = torch.tensor(
            [padded_table(s.row.blocks, width) for s in ordered], dtype=torch.int32, device=self.device
        )

        def cumulative(lengths: list[int]) -> torch.Tensor:
            return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=self.device)

        return {
            "tables": tables,
            "cu_q": cumulative(lengths_q),
            "cu_k": cumulative(lengths_k),
            "max_q": max(lengths_q),
            "max_k": max(lengths_k),
        }

    # --- images ---------------------------------------------------------------------------------
    def _encode_images(self, scheduled: Sequence[Scheduled]) -> None:
        """Make sure every image overlapping this step's tokens has its features on its row: from the
        encoder cache, or encoded now, all missing images in one vision-tower call."""
        missing: list[tuple[Row, int]] = []
        for s in scheduled:
            row, start, end = s.row, s.row.computed, s.row.computed + s.tokens
            for index, span in enumerate(row.images):
                if index in row.features or span.start >= end or span.start + span.length <= start:
                    continue
                features = self.encoder_cache.get(span.key)
                if features is not None:
                    row.features[index] = features
                else:
                    missing.append((row, index))
        if not missing:
            return
        unique: dict[bytes, tuple[Row, int]] = {}
        for row, index in missing:
            unique.setdefault(row.images[index].key, (row, index))
        pixels, grids = [], []
        for row, index in unique.values():
            patches, grid = self._image_inputs(row, index)
            pixels.append(patches)
            grids.append(grid)
        out = self.hf.model.get_image_features(
            torch.cat(pixels).to(self.device, self.dtype), torch.stack(grids).to(self.device), return_dict=True
        )
        self.images_encoded += len(unique)
        by_key = dict(zip(unique, out.pooler_output))
        for key, features in by_key.items():
            self.encoder_cache.put(key, features)
        for row, index in missing:
            row.features[index] = by_key[row.images[index].key]

    @staticmethod
    def _image_inputs(row: Row, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Span ``index``'s patches ``[patches, dim]`` and grid ``[3]`` from the row's prompt (an
        image's, or a video's: the tower reads both alike)."""
        prompt, span = row.request.prompt, row.images[index]
        grids = _grids(prompt, span)
        pixels = prompt.pixel_values_videos if span.video else prompt.pixel_values
        assert pixels is not None  # this engine's prompts carry their pixels (vLLM's alone leave them out)
        sizes = grids.prod(-1).tolist()
        first = sum(sizes[: span.ordinal])
        return pixels[first : first + sizes[span.ordinal]], grids[span.ordinal]

    def _fill_images(self, embeds: torch.Tensor, at: int, row: Row, start: int, end: int) -> None:
        """Put image features at the placeholder positions among the row's tokens ``[start, end)``,
        which sit at ``embeds[at:]``."""
        for index, span in enumerate(row.images):
            lo, hi = max(start, span.start), min(end, span.start + span.length)
            if lo < hi:
                features = row.features[index]
                embeds[at + lo - start : at + hi - start] = features[lo - span.start : hi - span.start].to(embeds.dtype)

    @staticmethod
    def _drop_used_features(ordered: Sequence[Scheduled]) -> None:
        for s in ordered:
            end = s.row.computed + s.tokens
            for index in [i for i in s.row.features if s.row.images[i].start + s.row.images[i].length <= end]:
                del s.row.features[index]


def _grids(prompt: PromptInputs, span: ImageSpan) -> torch.Tensor:
    """The ``[items, 3]`` grids of the prompt's videos or images, whichever ``span`` is one of."""
    grids = prompt.video_grid_thw if span.video else prompt.image_grid_thw
    assert grids is not None  # spans are found from these grids (rows.media_spans)
    return grids
