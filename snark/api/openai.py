"""The OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/models``, ``/v1/audio/speech``.

Point any OpenAI client at ``http://HOST:PORT/v1``. Request models live in ``protocol``, response
bodies in ``replies``; each route parses, calls the engine (or the speaker) once and shapes the answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from functools import partial

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from snark.api.cancellation import until_disconnected, within
from snark.api.protocol import PCM_SAMPLE_RATE, ChatCompletionRequest, SpeechRequest
from snark.api.replies import ChatReply, chat_events
from snark.api.state import AppState, get_state
from snark.media import load_image
from snark.speech import clean_for_speech, speak_wav, split_sentences, stream_pcm, stream_wav
from snark.speech.resample import resample_pcm16

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
_STARTED = int(time.time())  # the "created" time /v1/models reports

# Proxies (nginx) buffer responses by default; SSE and audio streams must reach the client as written.
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/chat/completions", summary="Chat completion (JSON, or SSE with stream=true)", response_class=Response)
async def chat_completions(request: Request, body: ChatCompletionRequest, state: AppState = Depends(get_state)) -> Response:
    engine, settings = state.engine, state.settings
    params = body.to_sampling_params(settings, engine.default_sampling)
    turns = await body.to_turns(partial(load_image, limits=state.image_limits), max_images=settings.max_images_per_request)
    prompt = await engine.build_prompt(turns, min_pixels=settings.min_image_pixels, max_pixels=settings.max_image_pixels)
    reply = ChatReply(model=engine.model_name, prompt_tokens=prompt.num_tokens)
    if body.stream:
        generation = engine.submit(prompt, params)  # a full queue is a 503 now, before the stream starts
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = chat_events(
            reply, generation, engine.follow(generation), include_usage=include_usage, timeout_s=settings.request_timeout_s
        )
        # Starlette runs the background task after the stream ends, also when the client left. The
        # stream's own finally cancels the row; this covers a client gone before the stream's first step.
        return StreamingResponse(
            events, media_type="text/event-stream", headers=_STREAM_HEADERS, background=BackgroundTask(engine.cancel, generation)
        )
    done = await until_disconnected(request, engine.generate(prompt, params), timeout_s=settings.request_timeout_s)
    return JSONResponse(reply.completion(done))


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


@router.post("/audio/speech", summary="Speak a text (wav or pcm); long texts stream sentence by sentence", response_class=Response)
async def create_speech(body: SpeechRequest, state: AppState = Depends(get_state)) -> Response:
    body.check_supported()
    speaker, metrics = state.speaker, state.metrics
    # Loading the voice here makes a missing or broken one a 501 now, not a stream cut after its 200.
    voice_rate = await asyncio.to_thread(lambda: speaker.sample_rate)
    if body.response_format == "pcm":
        pcm = _resampled(stream_pcm(speaker, body.input, body.speed), voice_rate, PCM_SAMPLE_RATE)
        chunks = metrics.timed_tts_stream(within(pcm, state.settings.request_timeout_s))
        headers = {**_STREAM_HEADERS, "X-Sample-Rate": str(PCM_SAMPLE_RATE)}
        return StreamingResponse(chunks, media_type="audio/pcm", headers=headers)
    if len(split_sentences(clean_for_speech(body.input))) <= 1:
        # One sentence gains nothing from streaming: send a WAV whose header has the exact sizes.
        wav = await metrics.timed_tts(speak_wav(speaker, body.input, body.speed))
        return Response(wav, media_type="audio/wav")
    chunks = metrics.timed_tts_stream(within(stream_wav(speaker, body.input, body.speed), state.settings.request_timeout_s))
    return StreamingResponse(chunks, media_type="audio/wav", headers=_STREAM_HEADERS)


async def _resampled(chunks: AsyncIterator[bytes], from_rate: int, to_rate: int) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield resample_pcm16(chunk, from_rate, to_rate)
