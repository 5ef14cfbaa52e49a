"""Chat turns -> token ids and pixel values, with client text unable to forge control tokens.

The chat template is rendered with placeholders where client text goes: the published Qwen2.5-VL
template, or Snark's tools-aware one (``chat_template``) when a request has tools or tool history.
The rendered text is cut at the template's own added tokens (``<|im_start|>``, ``<|image_pad|>``,
``<tool_call>``, ...), which become their ids; each stretch between them, template text and client
text together, goes through a copy of the tokenizer that has no added tokens at all. So the ids are
those of tokenizing the whole prompt (BPE merges across a seam as it would), while a client's literal
``<|im_start|>``, ``<|image_pad|>`` or ``<tool_call>`` stays plain text: it cannot open a turn, claim
an image slot or fake a call. (``split_special_tokens=True`` is not enough: it still matches the
non-special added tokens such as ``<tool_call>``.) Each ``<|image_pad|>`` (``<|video_pad|>``) of the
template is expanded to its image's (video's) token count, exactly as the Qwen2.5-VL processor does.

Raw prompts (``/v1/completions``) skip the template: ``tokenize`` reads a client's text as the
tokenizer does, special tokens included (the client formats the prompt), and ``from_ids`` checks the
ids (known to the vocabulary, no media placeholders, within the prompt limit).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from tokenizers import Tokenizer

from snark.engine.chat_template import render_with_tools
from snark.engine.image_inputs import ImageInputs, VideoInputs
from snark.engine.request import PromptInputs
from snark.errors import InvalidRequest
from snark.values import ChatTurn, ToolCall, ToolSpec
from snark.video.clip import Video

ROLES = ("system", "user", "assistant", "tool")
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
_PLACEHOLDER = "\x00{}\x00"  # never produced by the template; client text is checked for \x00
_PLACEHOLDER_RE = re.compile("\x00(\\d+)\x00")


class PromptBuilder:
    def __init__(self, processor, *, max_prompt_tokens: int) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.merge_size = int(self.image_processor.merge_size)
        self.image_inputs = ImageInputs(self.image_processor)
        self.video_inputs = VideoInputs(
            getattr(processor, "video_processor", None), patch_size=int(self.image_processor.patch_size)
        )
        self.max_prompt_tokens = max_prompt_tokens
        backend = self.tokenizer.backend_tokenizer
        self._added_ids = {token.content: token_id for token_id, token in backend.get_added_tokens_decoder().items()}
        longest_first = sorted(self._added_ids, key=len, reverse=True)
        self._added_re = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
        self._plain = _without_added_tokens(backend)

    def build(
        self, turns: list[ChatTurn], *, min_pixels: int, max_pixels: int, tools: Sequence[ToolSpec] = ()
    ) -> PromptInputs:
        """Tokenize ``turns`` with the generation prompt appended. CPU work: call it off the loop."""
        texts: list[str] = []  # client text, in placeholder order

        def placeholder(text: str) -> str:
            texts.append(text.replace("\x00", ""))
            return _PLACEHOLDER.format(len(texts) - 1)

        messages = []
        images = []
        videos: list[Video] = []
        for turn in turns:
            _check_turn(turn)
            content = []
            for part in turn.parts:
                if isinstance(part, str):
                    content.append({"type": "text", "text": placeholder(part)})
                elif isinstance(part, Video):
                    content.append({"type": "video"})
                    videos.append(part)
                else:
                    content.append({"type": "image"})
                    images.append(part)
            messages.append({"role": turn.role, "content": content})
            if turn.tool_calls:
                # Qwen2.5 starts the calls right after the header when the turn has no text of its own.
                messages[-1]["content"] = [c for c, p in zip(content, turn.parts) if p != ""]
                messages[-1]["tool_calls"] = [
                    {"name": placeholder(call.name), "arguments": placeholder(_arguments_text(call))}
                    for call in turn.tool_calls
                ]
        if not messages or messages[-1]["role"] == "assistant":
            raise InvalidRequest("The conversation must end with a user, system or tool message.", param="messages")

        pixel_values = image_grid_thw = None
        image_token_counts: list[int] = []
        image_keys: tuple[bytes, ...] = ()
        if images:
            vision = self.image_inputs(images, min_pixels=min_pixels, max_pixels=max_pixels)
            pixel_values, image_grid_thw, image_keys = vision.pixel_values, vision.image_grid_thw, vision.keys
            image_token_counts = (image_grid_thw.prod(-1) // self.merge_size**2).tolist()
        video = self.video_inputs(videos) if videos else None
        video_token_counts = [] if video is None else (video.grid_thw.prod(-1) // self.merge_size**2).tolist()

        if tools or any(turn.role == "tool" or turn.tool_calls for turn in turns):
            rendered = render_with_tools(messages, [placeholder(_tool_json(tool)) for tool in tools])
        else:  # the published template, so prompts without tools are exactly what Qwen2.5-VL renders
            rendered = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        input_ids = self._tokenize(rendered, texts, image_token_counts, video_token_counts)
        hint = "send shorter videos or sample fewer frames (fps, max_frames)" if videos else "send smaller images"
        self._check_length(len(input_ids), " (images and videos included)", f"shorten the text or {hint}")
        prompt = PromptInputs(
            input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw, image_keys=image_keys
        )
        if video is not None:
            prompt.pixel_values_videos, prompt.video_grid_thw = video.pixel_values, video.grid_thw
            prompt.second_per_grid_ts, prompt.video_keys = video.second_per_grid_ts, video.keys
        return prompt

    # --- raw prompts: no chat template (/v1/completions, /tokenize) ---------------------------------
    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """``text`` as the tokenizer reads it: its special tokens (``<|im_start|>``) become their ids, so
        a client may send a prompt it formatted itself. Qwen2.5's tokenizer adds no BOS token."""
        return self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def detokenize(self, ids: Sequence[int], *, param: str = "tokens") -> str:
        """The text of ``ids``, special tokens included (``tokenize`` of it gives the ids back)."""
        self.check_ids(ids, param=param)
        return self.tokenizer.backend_tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Each id's token as the vocabulary spells it (byte-level: "Ġworld" for " world")."""
        return self.tokenizer.convert_ids_to_tokens(list(ids))

    def check_ids(self, ids: Sequence[int], *, param: str) -> None:
        """Raise ``InvalidRequest`` naming ``param`` for an id the tokenizer does not know."""
        vocab = len(self.tokenizer)
        for position, token_id in enumerate(ids):
            if not 0 <= token_id < vocab:
                raise InvalidRequest(
                    f"{param}[{position}] is {token_id}, not a token id of this model: ids run from 0 to {vocab - 1}.",
                    param=param,
                )

    def from_ids(self, ids: Sequence[int], *, param: str = "prompt") -> PromptInputs:
        """A prompt of ``ids`` as they are, without a chat template. Raises ``InvalidRequest`` naming
        ``param`` for an empty prompt, an id outside the vocabulary, an image or video placeholder (media
        come through chat only) or a prompt over the limit, with the error chat gives."""
        if not ids:
            raise InvalidRequest(f"{param} is empty: send at least one token of text.", param=param)
        self.check_ids(ids, param=param)
        pads = {self._added_ids[IMAGE_PAD], self._added_ids[VIDEO_PAD]}
        for position, token_id in enumerate(ids):
            if token_id in pads:
                raise InvalidRequest(
                    f"{param} holds the media placeholder {self.tokenizer.convert_ids_to_tokens(token_id)} (token "
                    f"{position}): a raw prompt is text only; send images and videos to /v1/chat/completions.",
                    param=param,
                )
        self._check_length(len(ids), "", "shorten the text", param=param)
        return PromptInputs(input_ids=list(ids))

    def _check_length(self, count: int, counted: str, hint: str, *, param: str | None = None) -> None:
        if count > self.max_prompt_tokens:
            raise InvalidRequest(
                f"The prompt is {count} tokens{counted}, over this server's limit of {self.max_prompt_tokens} "
                f"(SNARK_MAX_PROMPT_TOKENS): {hint}.",
                param=param,
                code="context_length_exceeded",
            )

    def _tokenize(
        self, rendered: str, texts: list[str], image_token_counts: list[int], video_token_counts: list[int]
    ) -> list[int]:
        counts = {IMAGE_PAD: iter(image_token_counts), VIDEO_PAD: iter(video_token_counts)}
        ids: list[int] = []
        stretch: list[str] = []  # plain text since the last added token: template and client text
        pieces = _PLACEHOLDER_RE.split(rendered)  # [template, index, template, index, ..., template]
        for position, piece in enumerate(pieces):
            if position % 2:  # client text: never searched for added tokens
                stretch.append(texts[int(piece)])
                continue
            for index, fragment in enumerate(self._added_re.split(piece)):  # [text, token, text, ...]
                if index % 2 == 0:
                    stretch.append(fragment)
                    continue
                ids += self._encode_plain(stretch)
                stretch = []
                ids += [self._added_ids[fragment]] * (next(counts[fragment]) if fragment in counts else 1)
        return ids + self._encode_plain(stretch)

    def _encode_plain(self, stretch: list[str]) -> list[int]:
        text = "".join(stretch)
        return self._plain.encode(text, add_special_tokens=False).ids if text else []


def _without_added_tokens(backend: Tokenizer) -> Tokenizer:
    """A private copy of ``backend`` that knows none of its added tokens: any text is plain BPE. Private
    too because the shared one carries per-call state (``split_special_tokens``, truncation)."""
    spec = json.loads(backend.to_str())
    spec["added_tokens"] = []
    spec["truncation"] = spec["padding"] = None
    return Tokenizer.from_str(json.dumps(spec))


def _check_turn(turn: ChatTurn) -> None:
    if turn.role not in ROLES:
        raise InvalidRequest(f"Unknown role {turn.role!r}: use one of {', '.join(ROLES)}.", param="role")
    if turn.tool_calls and turn.role != "assistant":
        raise InvalidRequest(f"Only assistant messages carry tool calls, not {turn.role!r} ones.", param="tool_calls")
    if turn.role == "tool" and (not turn.parts or not all(isinstance(part, str) for part in turn.parts)):
        raise InvalidRequest("A tool message carries the call's result as text: send it as content.", param="content")


def _arguments_text(call: ToolCall) -> str:
    """The arguments as Qwen2.5's template writes them (``json.dumps`` of the object); text that is not
    JSON stays as the client sent it."""
    try:
        return json.dumps(json.loads(call.arguments), ensure_ascii=False)
    except ValueError:
        return call.arguments


def _tool_json(tool: ToolSpec) -> str:
    """One tool's line inside <tools>, as Qwen2.5's template writes it (absent fields left out)."""
    function = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
    function = {key: value for key, value in function.items() if value is not None}
    return json.dumps({"type": "function", "function": function}, ensure_ascii=False)
