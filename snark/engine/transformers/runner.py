"""Prefill and decode steps on the Hugging Face Qwen2.5-VL model, outside ``generate``.

The model code is transformers' own; Snark only prepares what ``generate`` would have prepared,
row by row:

* **positions**: Qwen2.5-VL's rope is 3-D (M-RoPE: time, height, width). A prompt's positions come
  from the model's own ``get_rope_index`` (image tokens get 2-D grid positions, text runs on); after
  the prompt, text advances one position per token on all three axes from the row's last position
  plus one, which differs from the row's token count when it holds images. Each row keeps its own.
* **masks**: passed ready-made (``{"full_attention": mask}``), which transformers then uses as is.
  The prefill mask is causal over the left-padded prompts; the decode mask lets each row see only
  its own columns of the shared cache (``RowCache.decode_mask``). flash-attention takes the 2-D
  padding form of the same masks.
* **cache**: a prefill runs into a ``PrefillCapture`` (the prompts' keys and values, then copied into
  the ``RowCache``); a decode step runs on the ``RowCache`` itself, which writes each row's new key
  and value at the shared column and hands the attention every live column.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from snark.engine.loader import LoadedModel
from snark.engine.request import PromptInputs
from snark.engine.transformers.batching import collate
from snark.engine.transformers.cache import RowCache, row_capacity
from snark.engine.transformers.rows import Row


class ChunkCapture:
    """The cache of a prompt prefilled chunk by chunk: each chunk's keys and values are appended,
    and each chunk attends to everything before it."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []  # per layer: [1, kv_heads, done, head_dim]
        self.values: list[torch.Tensor] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == len(self.keys):
            self.keys.append(key_states)
            self.values.append(value_states)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]


class ChunkedPrefill:
    """One long prompt prefilled ``chunk_tokens`` at a time, one chunk per engine step, so the rows
    already running keep decoding in between instead of stalling for the whole prompt.

    The prompt's embeddings (image features scattered into their ``<|image_pad|>`` slots, as the model
    does) and rope positions are computed once; each chunk then runs the language model on its slice.
    """

    def __init__(self, runner: "Runner", row: Row, *, chunk_tokens: int) -> None:
        self.runner, self.row, self.chunk_tokens = runner, row, chunk_tokens
        model, device = runner.model, runner.device
        prompt = row.request.prompt
        inputs = {k: v.to(device) for k, v in collate([prompt], pad_token_id=runner.pad_token_id, image_token_id=runner.image_token_id).items()}
        self.positions, deltas = model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], inputs.get("image_grid_thw")
        )  # [3, 1, prompt], [1, 1]
        embeds = model.model.get_input_embeddings()(inputs["input_ids"])  # [1, prompt, hidden]
        if "pixel_values" in inputs:
            features = model.model.get_image_features(inputs["pixel_values"].to(runner.dtype), inputs["image_grid_thw"], return_dict=True)
            images = torch.cat(features.pooler_output, dim=0).to(embeds.dtype)
            slots = (inputs["input_ids"] == runner.image_token_id)[..., None].expand_as(embeds)
            embeds = embeds.masked_scatter(slots, images)
        self.embeds = embeds
        self.next_position = int(deltas[0, 0]) + prompt.num_tokens
        self.capture = ChunkCapture()
        self.logits: torch.Tensor | None = None  # the first token's, once the last chunk has run
        self.done_tokens = 0
        self.chunks_run = 0

    @property
    def finished(self) -> bool:
        return self.done_tokens >= self.embeds.shape[1]

    @torch.inference_mode()
    def run_chunk(self) -> torch.Tensor | None:
        """Prefill the next chunk; after the last one, return the logits of the row's first token
        (``[1, vocab]`` float32), else None."""
        start, end = self.done_tokens, min(self.done_tokens + self.chunk_tokens, self.embeds.shape[1])
        device = self.runner.device
        if self.runner.flash:
            mask = torch.ones(1, end, dtype=torch.long, device=device)  # causal, aligned bottom-right
        else:
            queries = torch.arange(start, end, device=device)[:, None]
            mask = (torch.arange(end, device=device)[None, :] <= queries)[None, None]  # [1, 1, chunk, end]
        out = self.runner.model(
            inputs_embeds=self.embeds[:, start:end],
            attention_mask=_mask_mapping(mask),
            position_ids=self.positions[:, :, start:end],
            past_key_values=self.capture,
            use_cache=True,
            logits_to_keep=1,
        )
        self.done_tokens, self.chunks_run = end, self.chunks_run + 1
        if not self.finished:
            return None
        self.row.next_position = self.next_position
        return out.logits[:, -1].float()


class PrefillCapture:
    """A stand-in cache for one prefill: keeps each layer's keys and values, changes nothing."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.keys.append(key_states)  # [rows, kv_heads, width, head_dim]
        self.values.append(value_states)
        return key_states, value_states


def _mask_mapping(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    # Qwen2.5-VL's text layers are all "full_attention" unless a sliding window is configured.
    return {"full_attention": mask, "sliding_attention": mask}


class Runner:
    def __init__(self, loaded: LoadedModel, *, pad_token_id: int) -> None:
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.flash = loaded.attn_implementation == "flash_attention_2"
        self.pad_token_id = pad_token_id
        self.image_token_id = self.model.config.image_token_id
        self.compiled_step = None  # SNARK_COMPILE=1: set by the engine (see compiled.py)

    @torch.inference_mode()
    def prefill(self, rows: Sequence[Row], cache: RowCache) -> torch.Tensor:
        """Run the rows' prompts as one left-padded batch, put their keys and values in ``cache`` and
        set each row's next rope position. Returns the logits for each row's first token,
        ``[rows, vocab]`` float32."""
        prompts: list[PromptInputs] = [row.request.prompt for row in rows]
        inputs = {k: v.to(self.device) for k, v in collate(prompts, pad_token_id=self.pad_token_id, image_token_id=self.image_token_id).items()}
        padding = inputs["attention_mask"]  # [rows, width], 1 on real tokens
        positions, deltas = self.model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], inputs.get("image_grid_thw"), attention_mask=padding
        )  # [3, rows, width], [rows, 1]
        if self.flash:
            mask = padding
        else:
            width = padding.shape[1]
            causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
            own = torch.eye(width, dtype=torch.bool, device=self.device)
            # A padding query sees only itself: never a fully masked row, whose NaNs would reach real
            # rows through 0 * NaN in the attention's weighted sum.
            mask = (causal & (padding.bool()[:, None, :] | own))[:, None]  # [rows, 1, width, width]
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        capture = PrefillCapture()
        out = self.model(
            input_ids=inputs["input_ids"],
            attention_mask=_mask_mapping(mask),
            position_ids=positions,
            past_key_values=capture,
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            mm_token_type_ids=inputs["mm_token_type_ids"],
            use_cache=True,
            logits_to_keep=1,
        )
        cache.insert(capture.keys, capture.values, [row.joining for row in rows])
        next_positions = (deltas[:, 0] + padding.sum(-1)).tolist()  # last prompt position + 1
        for row, position in zip(rows, next_positions):
            row.next_position = int(position)
        return out.logits[:, -1].float()

    def start_chunked(self, row: Row, *, chunk_tokens: int) -> ChunkedPrefill:
        return ChunkedPrefill(self, row, chunk_tokens=chunk_tokens)

    @torch.inference_mode()
    def decode(self, rows: Sequence[Row], cache: RowCache) -> torch.Tensor:
        """One step for every running row (in cache slot order): feed each row's last token.
        Returns ``[rows, vocab]`` float32 logits."""
        cache.make_room_for_step()
        if self.compiled_step is not None:
            return self._compiled_decode(rows, cache)
        input_ids = torch.tensor([[row.last_token] for row in rows], device=self.device)  # [rows, 1]
        positions = torch.tensor([row.next_position for row in rows], device=self.device)
        mask = cache.padding_mask() if self.flash else cache.decode_mask()
        out = self.model(
            input_ids=input_ids,
            attention_mask=_mask_mapping(mask),
            position_ids=positions.view(1, -1, 1).expand(3, -1, -1),  # [3, rows, 1]
            past_key_values=cache,
            use_cache=True,
        )
        cache.advance()
        for row in rows:
            row.next_position += 1
        return out.logits[:, -1].float()

    def _compiled_decode(self, rows: Sequence[Row], cache: RowCache) -> torch.Tensor:
        """The same step at fixed shapes: rows padded to their bucket, every allocated column."""
        n = len(rows)
        bucket = row_capacity(n, cache.max_rows)
        tokens = [row.last_token for row in rows] + [self.pad_token_id] * (bucket - n)
        positions = torch.tensor([row.next_position for row in rows] + [0] * (bucket - n), device=self.device)
        mask = cache.static_decode_mask(bucket)
        cache.write_column.fill_(cache.end)
        cache.step_rows = bucket
        try:
            out = self.compiled_step(
                input_ids=torch.tensor(tokens, device=self.device)[:, None],
                attention_mask=_mask_mapping(mask[:, 0, 0, :].long() if self.flash else mask),
                position_ids=positions.view(1, -1, 1).expand(3, -1, -1),
                past_key_values=cache,
                use_cache=True,
            )
        finally:
            cache.step_rows = None
        cache.advance()
        for row in rows:
            row.next_position += 1
        return out.logits[:n, -1].float().clone()  # a CUDA graph's output is overwritten by its next replay
