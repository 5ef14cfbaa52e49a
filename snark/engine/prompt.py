"""Chat turns -> token ids and pixel values, with user text unable to forge control tokens.

The chat template is rendered with placeholders where client text goes. Template pieces are
tokenized normally (so ``<|im_start|>`` is one control token), client text with
``split_special_tokens=True`` (so a client's literal ``<|im_start|>`` or ``<|image_pad|>`` becomes
plain text tokens and cannot open a turn or claim an image slot). Each ``<|image_pad|>`` of the
template is expanded to its image's token count, exactly as the Qwen2.5-VL processor does.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence

from snark.engine.request import ChatTurn, PromptInputs, ToolSpec
from snark.errors import InvalidRequest

ROLES = ("system", "user", "assistant")
IMAGE_PAD = "<|image_pad|>"
_PLACEHOLDER = "\x00{}\x00"  # never produced by the template; client text is checked for \x00
_PLACEHOLDER_RE = re.compile("\x00(\\d+)\x00")


class PromptBuilder:
    def __init__(self, processor, *, max_prompt_tokens: int) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.merge_size = int(self.image_processor.merge_size)
        self.max_prompt_tokens = max_prompt_tokens
        # The fast tokenizer keeps split_special_tokens as state on its shared backend, set by every call:
        # prompts built in parallel threads would otherwise split the template's control tokens (an
        # image loses its <|image_pad|> tokens) or let client text through unsplit (a forged <|im_start|>).
        self._tokenizer_lock = threading.Lock()

    def build(self, turns: list[ChatTurn], *, min_pixels: int, max_pixels: int, tools: Sequence[ToolSpec] = ()) -> PromptInputs:
        """Tokenize ``turns`` with the generation prompt appended. CPU work: call it off the loop."""
        texts: list[str] = []
        messages = []
        images = []
        for turn in turns:
            if turn.role not in ROLES:
                raise InvalidRequest(f"Unknown role {turn.role!r}: use one of {', '.join(ROLES)}.", param="role")
            content = []
            for part in turn.parts:
                if isinstance(part, str):
                    content.append({"type": "text", "text": _PLACEHOLDER.format(len(texts))})
                    texts.append(part.replace("\x00", ""))
                else:
                    content.append({"type": "image"})
                    images.append(part)
            messages.append({"role": turn.role, "content": content})
        if not messages or messages[-1]["role"] == "assistant":
            raise InvalidRequest("The conversation must end with a user (or system) message.", param="messages")

        pixel_values = image_grid_thw = None
        image_token_counts: list[int] = []
        if images:
            vision = self.image_processor(
                images=images,
                size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                return_tensors="pt",
            )
            pixel_values, image_grid_thw = vision["pixel_values"], vision["image_grid_thw"]
            image_token_counts = (image_grid_thw.prod(-1) // self.merge_size**2).tolist()

        rendered = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        with self._tokenizer_lock:
            input_ids = self._tokenize(rendered, texts, image_token_counts)
        if len(input_ids) > self.max_prompt_tokens:
            raise InvalidRequest(
                f"The prompt is {len(input_ids)} tokens (images included), over this server's limit of "
                f"{self.max_prompt_tokens} (SNARK_MAX_PROMPT_TOKENS): shorten the text or send smaller images.",
                code="context_length_exceeded",
            )
        return PromptInputs(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw)

    def _tokenize(self, rendered: str, texts: list[str], image_token_counts: list[int]) -> list[int]:
        pieces = _PLACEHOLDER_RE.split(rendered)  # [template, index, template, index, ..., template]
        counts = iter(image_token_counts)
        ids: list[int] = []
        for position, piece in enumerate(pieces):
            if position % 2:  # client text
                ids += self.tokenizer(texts[int(piece)], add_special_tokens=False, split_special_tokens=True)[
                    "input_ids"
                ]
            elif piece:
                if IMAGE_PAD in piece:
                    segments = piece.split(IMAGE_PAD)
                    piece = segments[0] + "".join(IMAGE_PAD * next(counts) + s for s in segments[1:])
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids
