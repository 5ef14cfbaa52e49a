"""The OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/models``, ``/v1/audio/speech``.

Point any OpenAI client at ``http://HOST:PORT/v1``. Request models live in ``protocol``, response
bodies in ``replies``; each route parses, calls the engine (or the speaker) once and shapes the answer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from functools import partial

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from snark.api.cancellation import until_disconnected
from snark.api.chat_audio import audio_completion, chat_audio_events
from snark.api.choices import Choices
from snark.api.image_resolution import ImageResolution
from snark.api.protocol import ChatCompletionRequest, SpeechRequest
from snark.api.replies import ChatReply, chat_events, sse_stream
from snark.api.spoken import (
    MEDIA_TYPES,
    PCM_SAMPLE_RATE,
    AudioTimer,
    Voice,
    audio_format_of,
    audio_stream,
    complete_audio,
    open_voice,
    speak_answer,
    speak_text,
)
from snark.api.state import AppState, get_state
from snark.api.streaming import STREAM_HEADERS
from snark.engine.request import GenerationRequest
from snark.media import load_image
from snark.speech import SpokenPiece, speakable_sentences
from snark.speech.resample import resample_pcm16

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
_STARTED = int(time.time())  # the "created" time /v1/models reports


@router.post("/chat/completions", summary="Chat completion (JSON, or SSE with stream=true)", response_class=Response)
async def chat_completions(
    request: Request, body: ChatCompletionRequest, state: AppState = Depends(get_state)
) -> Response:
    engine, settings = state.engine, state.settings
    tools = body.tool_use(settings)
    params = body.to_sampling_params(settings, engine.default_sampling, tools)
    audio = body.audio_output(tools)
    voice = None if audio is None else await open_voice(state, audio.voice_name, audio.speed)  # 400/501 before any work
    turns = await body.to_turns(
        partial(load_image, limits=state.image_limits, decoded=state.decoded_images),
        max_images=settings.max_images_per_request,
        videos=state.videos,
        image_resolution=ImageResolution.from_settings(settings),
    )
    prompt = await engine.build_prompt(
        turns, min_pixels=settings.min_image_pixels, max_pixels=settings.max_image_pixels, tools=tools.prompt_tools
    )
    if body.cache_salt is not None:
        prompt = dataclasses.replace(prompt, cache_salt=body.cache_salt)
    # The output grammar, compiled off the event loop (cached by schema); a client that leaves stops waiting.
    params = await until_disconnected(request, engine.prepare(params), timeout_s=settings.request_timeout_s)
    reply = ChatReply(model=engine.model_name, prompt_tokens=prompt.num_tokens)
    tool_names = {spec.name for spec in tools.callable} if tools.active else None
    if audio is not None and voice is not None:
        return await _spoken_chat(request, state, body, reply, engine.submit(prompt, params), voice, audio.format)
    # Every choice (n) is submitted now: a full queue is a 503 before any answer starts.
    started = Choices.start(engine, [prompt], params, body.choices, stream=body.stream)
    choices = await until_disconnected(request, started, timeout_s=settings.request_timeout_s)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        lines = chat_events(
            reply, choices, include_usage=include_usage, timeout_s=settings.request_timeout_s, tool_names=tool_names
        )
        events = sse_stream(lines, f"streamed completion {reply.id}")
        # Starlette runs the background task after the stream ends, also when the client left. The
        # stream's own finally cancels the rows; this covers a client gone before the stream's first step.
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers=STREAM_HEADERS,
            background=BackgroundTask(choices.cancel),
        )
    dones = await until_disconnected(request, choices.finished(), timeout_s=settings.request_timeout_s)
    return JSONResponse(reply.completion(*dones, tool_names=tool_names))


async def _spoken_chat(
    request: Request,
    state: AppState,
    body: ChatCompletionRequest,
    reply: ChatReply,
    generation: GenerationRequest,
    voice: Voice,
    audio_format: str,
) -> Response:
    """The answer spoken sentence by sentence while it is generated: SSE with pcm16 chunks, or one
    JSON body with the whole file once the last sentence is spoken."""
    timer = AudioTimer(state)
    pieces = speak_answer(state, generation, voice)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        to_pcm16 = partial(resample_pcm16, from_rate=voice.sample_rate, to_rate=PCM_SAMPLE_RATE)
        lines = chat_audio_events(reply, generation, _timed(pieces, timer), to_pcm16, include_usage=include_usage)
        events = sse_stream(lines, f"streamed audio completion {reply.id}")
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers=STREAM_HEADERS,
            background=BackgroundTask(state.engine.cancel, generation),
        )

    async def spoken() -> tuple[str, bytes]:
        transcript, audio = [], []
        async for piece in pieces:
            transcript.append(piece.text)
            audio.append(piece.pcm)
        text = "".join(transcript)
        return text, await complete_audio(_replay(audio), voice, audio_format_of(audio_format), timer)

    transcript, data = await until_disconnected(request, spoken(), timeout_s=state.settings.request_timeout_s)
    return JSONResponse(audio_completion(reply, generation, transcript, data))


async def _timed(pieces: AsyncIterator[SpokenPiece], timer: AudioTimer) -> AsyncIterator[SpokenPiece]:
    async for piece in pieces:
        if piece.pcm:
            timer.audio_sent()
        yield piece
    timer.finished()


async def _replay(pcm: list[bytes]) -> AsyncIterator[SpokenPiece]:
    for chunk in pcm:
        yield SpokenPiece(pcm=chunk)


def _model_card(state: AppState) -> dict:
    facts = state.engine.facts
    return {
        "id": facts.name if facts else state.settings.model_id,
        "object": "model",
        "created": _STARTED,
        "owned_by": "snark",
    }


@router.get("/models", summary="The served model")
async def list_models(state: AppState = Depends(get_state)) -> dict:
    return {"object": "list", "data": [_model_card(state)]}


@router.get("/models/{model_id:path}", summary="The served model, under any name (as chat accepts any model name)")
async def retrieve_model(model_id: str, state: AppState = Depends(get_state)) -> dict:
    # One rule for every route: Snark serves one model and any name reaches it, so a client that
    # checks its configured name ("qwen", "gpt-4o") before chatting gets the model that will answer.
    return _model_card(state)


@router.post(
    "/audio/speech",
    summary="Speak a text (wav or pcm); long texts stream sentence by sentence",
    response_class=Response,
)
async def create_speech(body: SpeechRequest, state: AppState = Depends(get_state)) -> Response:
    body.check_supported()
    timer = AudioTimer(state)
    voice = await open_voice(state, body.voice_name, body.speed)  # a missing voice is a 501 now, not a cut stream
    audio_format = audio_format_of(body.response_format)
    sentences = speakable_sentences(body.input)  # split once: what is spoken also decides whether to stream
    pieces = speak_text(state, sentences, voice)
    if audio_format == "wav" and len(sentences) <= 1:
        # One sentence gains nothing from streaming: send a WAV whose header has the exact sizes.
        return Response(await complete_audio(pieces, voice, audio_format, timer), media_type=MEDIA_TYPES["wav"])
    return StreamingResponse(
        audio_stream(pieces, voice, audio_format, timer),
        media_type=MEDIA_TYPES[audio_format],
        headers=voice.response_headers(audio_format),
    )
