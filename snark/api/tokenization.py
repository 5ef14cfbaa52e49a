"""``POST /tokenize`` and ``POST /detokenize``, named and shaped as vLLM serves them, for clients that
count tokens before they send a request.

    POST /tokenize    {"prompt": "Hello"}                    -> {"count", "max_model_len", "tokens"}
                      {"messages": [...], "tools": [...]}    (the chat template applied, images counted)
                      "return_token_strs": true              -> also "token_strs"
    POST /detokenize  {"tokens": [9707]}                     -> {"prompt": "Hello"}

A chat is counted exactly as ``/v1/chat/completions`` would send it to the model: the same template,
tools in the system turn, each image and video its tokens (so images are fetched and decoded).
"""

from __future__ import annotations

import asyncio
from functools import partial

from fastapi import APIRouter, Depends
from pydantic import Field

from snark.api.image_resolution import ImageResolution
from snark.api.lenient import Lenient
from snark.api.messages import ChatMessage, VideoOptions, messages_to_turns
from snark.api.state import AppState, get_state
from snark.api.tools_and_formats import ToolDefinition, ToolUse
from snark.errors import InvalidRequest
from snark.media import load_image

router = APIRouter(tags=["Tokenizer"])


class TokenizeRequest(Lenient):
    model: str | None = Field(None, description="Accepted for compatibility; Snark serves one model.")
    prompt: str | None = Field(None, description="A text, tokenized as /v1/completions reads it.")
    messages: list[ChatMessage] | None = Field(None, description="A chat, tokenized as /v1/chat/completions sends it.")
    add_special_tokens: bool = Field(True, description="Qwen2.5's tokenizer adds none either way.")
    return_token_strs: bool = Field(False, description="Also answer each token as the vocabulary spells it.")
    tools: list[ToolDefinition] | None = Field(None, description="With messages: the functions chat would offer.")
    mm_processor_kwargs: VideoOptions | None = Field(None, description="With messages: how videos are sampled.")
    add_generation_prompt: bool = Field(
        True, description="With messages: only true (the assistant's turn opened).", json_schema_extra={"const": True}
    )
    continue_final_message: bool = Field(
        False, description="With messages: only false.", json_schema_extra={"const": False}
    )

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest(
                "Send either prompt (a text) or messages (a chat) to tokenize, not both and not neither.",
                param="prompt" if self.prompt is not None else "messages",
            )
        if self.messages is not None and (not self.add_generation_prompt or self.continue_final_message):
            param = "continue_final_message" if self.continue_final_message else "add_generation_prompt"
            raise InvalidRequest(
                f"{param} is not supported: Snark counts a chat as chat completions send it, ending with the "
                "assistant's turn opened; leave add_generation_prompt true and continue_final_message false.",
                param=param,
                code="unsupported_parameter",
            )
        if self.messages is not None and not self.messages:
            raise InvalidRequest("messages is empty: send at least one message.", param="messages")


class DetokenizeRequest(Lenient):
    model: str | None = Field(None, description="Accepted for compatibility; Snark serves one model.")
    tokens: list[int] = Field(
        description="Token ids of this model's vocabulary.",
        json_schema_extra={"type": "array", "items": {"type": "integer", "minimum": 0}},
    )


@router.post("/tokenize", summary="Token ids of a text or a chat (vLLM's route)")
async def tokenize(body: TokenizeRequest, state: AppState = Depends(get_state)) -> dict:
    body.check()
    engine, settings = state.engine, state.settings
    if body.prompt is not None:
        tokens = await asyncio.to_thread(engine.tokenize, body.prompt, add_special_tokens=body.add_special_tokens)
    else:
        assert body.messages is not None  # check() allows one of the two
        tools = ToolUse(body.tools, None, None, settings)
        turns = await messages_to_turns(
            body.messages,
            partial(load_image, limits=state.image_limits, decoded=state.decoded_images),
            max_images=settings.max_images_per_request,
            videos=state.videos,
            video_options=body.mm_processor_kwargs,
            image_resolution=ImageResolution.from_settings(settings),
        )
        prompt = await engine.build_prompt(
            turns, min_pixels=settings.min_image_pixels, max_pixels=settings.max_image_pixels, tools=tools.prompt_tools
        )
        tokens = prompt.input_ids
    strings = engine.token_strings(tokens) if body.return_token_strs else None
    return {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens, "token_strs": strings}


@router.post("/detokenize", summary="The text of token ids (vLLM's route)")
async def detokenize(body: DetokenizeRequest, state: AppState = Depends(get_state)) -> dict:
    return {"prompt": await asyncio.to_thread(state.engine.detokenize, body.tokens, param="tokens")}
