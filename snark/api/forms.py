"""The curl-friendly form endpoints: ``POST /infer/text``, ``POST /infer/image`` and ``POST /infer/video``.

curl -F prompt="Describe this picture" -F image_file=@sample.jpeg http://localhost:8123/infer/image
curl -F prompt="What happens here?" -F video_file=@clip.mp4 -F fps=1 http://localhost:8123/infer/video
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask

from snark.api.cancellation import until_disconnected
from snark.api.messages import VideoOptions, video_sampling
from snark.api.openapi import up_to
from snark.api.sampling import resolve_sampling
from snark.api.spoken import (
    MEDIA_TYPES,
    AudioTimer,
    audio_format_of,
    audio_stream,
    complete_audio,
    open_voice,
    speak_answer,
)
from snark.api.state import AppState, get_state
from snark.api.streaming import finish_reason_of, text_deltas
from snark.api.tools_and_formats import form_schema_output
from snark.config import Settings
from snark.engine.request import GenerationRequest, PromptInputs, StreamEvent
from snark.errors import InvalidRequest, PayloadTooLarge, SnarkError
from snark.media import decode_upload, load_image
from snark.speech import validate_speed
from snark.values import ChatTurn, SamplingParams
from snark.video.clip import Video

log = logging.getLogger(__name__)
router = APIRouter(tags=["form endpoints"])


class FormInferRequest(BaseModel):
    """The form fields shared by both endpoints; converts itself into engine parameters."""

    prompt: str = Field(min_length=1, description="The question or instruction.")
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="Default SNARK_DEFAULT_MAX_NEW_TOKENS; at most SNARK_MAX_NEW_TOKENS_LIMIT.",
        json_schema_extra=up_to("max_new_tokens_limit"),
    )
    response_format: Literal["json", "text", "wav", "pcm"] = Field(
        "json", description="json, text, wav (the answer spoken, streamed) or pcm (raw 24 kHz 16-bit mono, streamed)."
    )
    system: str | None = Field(None, description="Optional system prompt.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy; default: the model's.")
    stream: bool | None = Field(
        None,
        description="Text: send plain-text chunks while the answer is generated (default false). "
        "wav/pcm: audio streams sentence by sentence by default; false waits and sends one file with exact sizes.",
    )
    voice: str | None = Field(None, description="wav/pcm: a SNARK_TTS_VOICES name; default: the default voice.")
    speed: float = Field(
        1.0, description="wav/pcm: 0.25 to 4.0; 1.0 is normal.", json_schema_extra={"minimum": 0.25, "maximum": 4.0}
    )
    max_image_pixels: int | None = Field(
        None,
        ge=1,
        description="Lower this request's image resolution cap (never above SNARK_MAX_IMAGE_PIXELS).",
        json_schema_extra=up_to("max_image_pixels"),
    )
    json_schema: str | None = Field(
        None, description="A JSON Schema (as text): the answer is JSON that follows it, constrained token by token."
    )

    def to_sampling_params(self, settings: Settings, defaults: SamplingParams) -> SamplingParams:
        structure = form_schema_output(self.json_schema, settings) if self.json_schema else None
        return resolve_sampling(
            settings,
            defaults,
            max_new_tokens=self.max_new_tokens,
            param="max_new_tokens",
            temperature=self.temperature,
            structure=structure,
        )

    def image_pixel_cap(self, settings: Settings) -> int:
        if self.max_image_pixels is None:
            return settings.max_image_pixels
        if self.max_image_pixels > settings.max_image_pixels:
            raise InvalidRequest(
                f"max_image_pixels={self.max_image_pixels} is over this server's cap of {settings.max_image_pixels} "
                "(SNARK_MAX_IMAGE_PIXELS): a request can only lower it.",
                param="max_image_pixels",
            )
        return max(self.max_image_pixels, settings.min_image_pixels)

    @property
    def spoken(self) -> bool:
        return self.response_format in ("wav", "pcm")

    def check_supported(self) -> None:
        """Raise ``InvalidRequest`` for a speed out of range: checked here, where the request enters,
        so the spoken path behind the route trusts it. Other fields are bounded by their ``Field``."""
        validate_speed(self.speed)

    def turns(self, media=None) -> list[ChatTurn]:
        """The conversation: the system prompt if any, then the image or video (if any) and the prompt."""
        turns = [ChatTurn("system", [self.system])] if self.system else []
        return turns + [ChatTurn("user", ([media] if media is not None else []) + [self.prompt])]


class ImageFormInferRequest(FormInferRequest):
    """``/infer/image``'s fields: the shared ones and the image. One form model per route: FastAPI
    before 0.137 (vLLM's pin) reads a form model next to other form parameters as one field named
    after the parameter, which fails every upload with ``form: Field required``."""

    image_url: str | None = Field(None, description="http(s) URL or data: URI of the image")
    image_file: UploadFile | None = Field(None, description="The image, uploaded")


class VideoFormInferRequest(FormInferRequest, VideoOptions):
    """``/infer/video``'s fields: the shared ones, the video, and how to sample it (fps, frame counts,
    pixel bounds, a time range: the same names as in chat, held within the server's caps)."""

    video_url: str | None = Field(None, description="http(s) URL or data:video/...;base64, URI of the video")
    video_file: UploadFile | None = Field(None, description="The video, uploaded (MP4, WebM, MKV, MOV, AVI, ...)")


FormFields = Annotated[FormInferRequest, Form()]
ImageFormFields = Annotated[ImageFormInferRequest, Form()]
VideoFormFields = Annotated[VideoFormInferRequest, Form()]


@router.post("/infer/text", summary="Answer a text prompt")
async def infer_text(request: Request, form: FormFields, state: AppState = Depends(get_state)) -> Response:
    form.check_supported()
    params = form.to_sampling_params(state.settings, state.engine.default_sampling)  # before any image work
    prompt = await state.engine.build_prompt(
        form.turns(), min_pixels=state.settings.min_image_pixels, max_pixels=state.settings.max_image_pixels
    )
    return await _answer(request, state, form, prompt, await _prepared(request, state, params))


@router.post("/infer/image", summary="Answer a prompt about one image (image_url or image_file)")
async def infer_image(request: Request, form: ImageFormFields, state: AppState = Depends(get_state)) -> Response:
    image_url, image_file = form.image_url, form.image_file
    form.check_supported()
    params = form.to_sampling_params(state.settings, state.engine.default_sampling)  # before any image work
    if (image_url is None) == (image_file is None):
        raise InvalidRequest(
            "Send exactly one of image_url (a URL or data: URI) or image_file (an upload).", param="image_url"
        )
    image = await _load_form_image(image_url, image_file, state)
    max_pixels = form.image_pixel_cap(state.settings)
    min_pixels = min(state.settings.min_image_pixels, max_pixels)
    prompt = await state.engine.build_prompt(form.turns(image), min_pixels=min_pixels, max_pixels=max_pixels)
    return await _answer(request, state, form, prompt, await _prepared(request, state, params))


@router.post("/infer/video", summary="Answer a prompt about one video (video_url or video_file)")
async def infer_video(request: Request, form: VideoFormFields, state: AppState = Depends(get_state)) -> Response:
    form.check_supported()
    params = form.to_sampling_params(state.settings, state.engine.default_sampling)  # before any video work
    if (form.video_url is None) == (form.video_file is None):
        raise InvalidRequest(
            "Send exactly one of video_url (a URL or data: URI) or video_file (an upload).", param="video_url"
        )
    video = await _load_form_video(form, state)
    settings = state.settings
    prompt = await state.engine.build_prompt(
        form.turns(video), min_pixels=settings.min_image_pixels, max_pixels=settings.max_image_pixels
    )
    return await _answer(request, state, form, prompt, await _prepared(request, state, params))


async def _load_form_video(form: VideoFormInferRequest, state: AppState) -> Video:
    """The one video, sampled as the form asks; its errors name the form field it came from."""
    sampling = video_sampling(state.videos, form)
    field = "video_file" if form.video_file is not None else "video_url"
    try:
        if form.video_file is not None:
            max_bytes = state.videos.limits.max_bytes
            data = await _read_upload(form.video_file, max_bytes, "video_file", "SNARK_MAX_VIDEO_BYTES", "video")
            return await state.videos.upload(data, sampling, filename=form.video_file.filename)
        if form.video_url is None:
            raise InvalidRequest("Send video_url (a URL or data: URI) or video_file (an upload).", param="video_url")
        return await state.videos.url(form.video_url, sampling)
    except SnarkError as exc:
        exc.param = exc.param or field
        raise


async def _prepared(request: Request, state: AppState, params: SamplingParams) -> SamplingParams:
    """``params`` with their output grammar compiled (json_schema); a client that leaves stops waiting."""
    return await until_disconnected(request, state.engine.prepare(params), timeout_s=state.settings.request_timeout_s)


async def _load_form_image(image_url: str | None, image_file: UploadFile | None, state: AppState):
    """The one image, decoded; its errors name the form field it came from."""
    field = "image_file" if image_file is not None else "image_url"
    try:
        if image_file is not None:
            max_bytes = state.image_limits.max_image_bytes
            data = await _read_upload(image_file, max_bytes, "image_file", "SNARK_MAX_IMAGE_BYTES", "image")
            return await decode_upload(
                data, state.image_limits, filename=image_file.filename, decoded=state.decoded_images
            )
        if image_url is None:
            raise InvalidRequest("Send image_url (a URL or data: URI) or image_file (an upload).", param="image_url")
        return await load_image(image_url, state.image_limits, decoded=state.decoded_images)
    except SnarkError as exc:
        exc.param = exc.param or field
        raise


async def _read_upload(upload: UploadFile, max_bytes: int, field: str, setting: str, noun: str) -> bytes:
    data = await upload.read(max_bytes + 1)  # read one byte past the cap to know it is over
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            f"{field} is over the {max_bytes}-byte limit ({setting}): send a smaller {noun}.",
            param=field,
            code=f"{noun}_too_large",
        )
    return data


async def _answer(
    request: Request, state: AppState, form: FormInferRequest, prompt: PromptInputs, params: SamplingParams
) -> Response:
    engine, settings = state.engine, state.settings
    if form.spoken:
        return await _spoken_answer(request, state, form, prompt, params)
    if form.stream:
        generation = engine.submit(prompt, params)  # now: a full queue is a 503, not a broken 200
        return StreamingResponse(
            _text_chunks(engine.follow(generation), settings.request_timeout_s),
            media_type="text/plain; charset=utf-8",
            background=BackgroundTask(engine.cancel, generation),  # for a client gone before the first chunk
        )
    done: GenerationRequest = await until_disconnected(
        request, engine.run_to_completion(prompt, params), timeout_s=settings.request_timeout_s
    )
    finish_reason = finish_reason_of(done.finish_reason)  # a row stopped by shutdown is a 503, not a 200
    if form.response_format == "text":
        return PlainTextResponse(done.text)
    return JSONResponse(
        {
            "text": done.text,
            "model": engine.model_name,
            "finish_reason": finish_reason,
            "usage": {"prompt_tokens": prompt.num_tokens, "completion_tokens": done.completion_tokens},
            "timing": {"queue_s": round(done.queue_s, 6), "generate_s": round(done.generate_s, 6)},
        }
    )


async def _spoken_answer(
    request: Request, state: AppState, form: FormInferRequest, prompt: PromptInputs, params: SamplingParams
) -> Response:
    """The answer spoken while it is generated: each sentence is synthesized as soon as the model has
    written it. Streamed by default; ``stream=false`` sends one body with exact WAV sizes."""
    audio_format = audio_format_of(form.response_format)
    timer = AudioTimer(state)
    voice = await open_voice(state, form.voice, form.speed)  # a bad voice is a 400/501 before any work
    generation = state.engine.submit(prompt, params)  # now: a full queue is a 503, not a broken 200
    pieces = speak_answer(state, generation, voice)
    headers = voice.response_headers(audio_format)
    if form.stream is False:
        body = await until_disconnected(
            request, complete_audio(pieces, voice, audio_format, timer), timeout_s=state.settings.request_timeout_s
        )
        return Response(body, media_type=MEDIA_TYPES[audio_format], headers=headers)
    return StreamingResponse(
        audio_stream(pieces, voice, audio_format, timer),
        media_type=MEDIA_TYPES[audio_format],
        headers=headers,
        background=BackgroundTask(state.engine.cancel, generation),  # for a client gone before the first chunk
    )


async def _text_chunks(events: AsyncIterator[StreamEvent], timeout_s: float) -> AsyncIterator[str]:
    """Text chunks. Once the 200 is sent an error can only end the body: it ends with one line saying why
    (plain text has no error events), instead of an unexplained cut."""
    try:
        async for text in text_deltas(events, timeout_s):
            yield text
    except SnarkError as exc:
        log.warning("form stream ended early: %s", exc.message)
        yield f"\n[snark error: {exc.message}]\n"
