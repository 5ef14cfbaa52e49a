"""snark.api.protocol and the small pure parts around it: no server, no model.

Request models convert themselves into engine parameters; these tests pin the defaults, the bounds
and the 400s for everything Snark cannot honour. Images go through the real ``load_image``.
"""

from __future__ import annotations

import asyncio
import base64
import io
from functools import partial

import numpy as np
import pytest
from PIL import Image

from snark.api.auth import key_matches
from snark.api.protocol import ChatCompletionRequest, SpeechRequest
from snark.config import Settings
from snark.errors import InvalidRequest
from snark.media import ImageLimits, load_image
from snark.speech.resample import resample_pcm16
from snark.values import SamplingParams

SETTINGS = Settings(default_max_new_tokens=100, max_new_tokens_limit=500, max_images_per_request=2)
MODEL_DEFAULTS = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
HELLO = [{"role": "user", "content": "Hello"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "any", "messages": HELLO, **fields})


def params(**fields) -> SamplingParams:
    return chat(**fields).to_sampling_params(SETTINGS, MODEL_DEFAULTS)


def data_uri(size=(32, 32)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 10)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def turns(messages: list, max_images: int = 2):
    request = ChatCompletionRequest.model_validate({"messages": messages})
    return asyncio.run(request.to_turns(partial(load_image, limits=ImageLimits()), max_images=max_images))


# --- sampling ------------------------------------------------------------------------------------


def test_silent_request_takes_the_model_defaults_and_the_server_length() -> None:
    assert params() == SamplingParams(max_new_tokens=100, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)


def test_request_values_win_and_map_one_to_one() -> None:
    got = params(
        max_tokens=7,
        temperature=1.2,
        top_p=0.5,
        top_k=-1,
        seed=3,
        stop="END",
        repetition_penalty=1.2,
        frequency_penalty=0.5,
        presence_penalty=-0.5,
        ignore_eos=True,
    )
    assert got == SamplingParams(
        max_new_tokens=7,
        temperature=1.2,
        top_p=0.5,
        top_k=0,
        seed=3,
        stop=("END",),
        repetition_penalty=1.2,
        frequency_penalty=0.5,
        presence_penalty=-0.5,
        ignore_eos=True,
    )


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert params(max_tokens=9, max_completion_tokens=4).max_new_tokens == 4


def test_temperature_zero_is_greedy_whatever_top_p_and_top_k_say() -> None:
    got = params(temperature=0, top_p=0.3, top_k=5)
    assert got.is_greedy and (got.top_p, got.top_k) == (1.0, 0)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_over_the_token_limit_is_a_400_naming_the_setting(field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        params(**{field: 501})
    assert info.value.param == field
    assert "SNARK_MAX_NEW_TOKENS_LIMIT" in info.value.message and "500" in info.value.message


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("n", 9, "SNARK_MAX_N"),
        ("functions", [{"name": "f"}], "send the same definitions as tools"),
        ("function_call", "auto", "use tool_choice"),
        ("logit_bias", {"50256": -100}, "logit_bias"),
        ("reasoning_effort", "high", "reasoning"),
    ],
)
def test_features_snark_cannot_honour_are_a_400_naming_the_field(field: str, value, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        params(**{field: value})
    assert info.value.param == field and info.value.status_code == 400
    assert fragment in info.value.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"modalities": ["text", "audio"]}, "audio"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "modalities"),
        ({"modalities": ["audio"], "audio": {"format": "wav"}}, "modalities"),
        ({"modalities": ["text", "audio"], "audio": {"format": "mp3"}}, "audio.format"),
        ({"modalities": ["text", "audio"], "audio": {"format": "wav"}, "stream": True}, "audio.format"),
        ({"modalities": ["text", "audio"], "audio": {"format": "wav", "speed": 9}}, "speed"),
        ({"modalities": ["text", "audio"], "audio": {"format": "wav"}, "n": 2}, "n"),
        ({"modalities": ["text", "audio"], "audio": {"format": "wav"}, "logprobs": True}, "logprobs"),
    ],
)
def test_chat_audio_requests_that_cannot_be_spoken_are_a_400(fields: dict, param: str) -> None:
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)
    with pytest.raises(InvalidRequest) as info:
        request.audio_output()
    assert info.value.param == param and info.value.status_code == 400


def test_chat_audio_output_and_text_only() -> None:
    spoken = ChatCompletionRequest(
        messages=[{"role": "user", "content": "hi"}],
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "pcm16"},
        stream=True,
    )
    assert spoken.audio_output().format == "pcm16" and spoken.audio_output().voice_name == "alloy"
    assert (
        ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], modalities=["text"]).audio_output() is None
    )


def test_an_assistant_audio_id_brings_back_its_transcript() -> None:
    from snark.api.chat_audio import audio_id

    said = "Bonjour. Ça va? 你好。"
    request = ChatCompletionRequest(
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "audio": {"id": audio_id(said)}},
            {"role": "user", "content": "again"},
        ]
    )
    turns = asyncio.run(request.to_turns(lambda url: pytest.fail("no images here"), max_images=1))
    assert [(turn.role, turn.parts) for turn in turns] == [("user", ["hi"]), ("assistant", [said]), ("user", ["again"])]
    forged = ChatCompletionRequest(messages=[{"role": "assistant", "audio": {"id": "audio_not-ours"}}])
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(forged.to_turns(lambda url: pytest.fail("no images here"), max_images=1))
    assert info.value.param == "messages[0].audio.id"


def test_off_values_of_refused_features_and_unknown_fields_are_accepted() -> None:
    got = params(
        n=1,
        tools=[],
        tool_choice="none",
        logprobs=False,
        top_logprobs=0,
        response_format={"type": "text"},
        modalities=["text"],
        user="u1",
        store=False,
        metadata={"a": "b"},
        some_future_option=True,
    )
    assert got.max_new_tokens == 100


def test_logprobs_map_to_the_engines_count_of_alternatives() -> None:
    assert params().logprobs is None and params(logprobs=False).logprobs is None
    assert params(logprobs=True).logprobs == 0
    assert params(logprobs=True, top_logprobs=20).logprobs == 20
    with pytest.raises(InvalidRequest) as info:
        params(top_logprobs=3)  # without logprobs=true
    assert info.value.param == "top_logprobs" and "logprobs=true" in info.value.message


def test_stream_options_without_stream_is_a_400() -> None:
    with pytest.raises(InvalidRequest) as info:
        params(stream_options={"include_usage": True})
    assert info.value.param == "stream_options"


# --- messages ------------------------------------------------------------------------------------


def test_messages_become_turns_in_order_with_images_decoded() -> None:
    got = turns(
        [
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare"},
                    {"type": "image_url", "image_url": {"url": data_uri((32, 32)), "detail": "low"}},
                    {"type": "image_url", "image_url": {"url": data_uri((64, 32))}},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Done."}]},
            {"role": "user", "content": "Again"},
        ]
    )
    assert [t.role for t in got] == ["system", "user", "assistant", "user"]
    assert got[0].parts == ["Be brief."]
    assert got[1].parts[0] == "Compare"
    assert [p.size for p in got[1].parts[1:]] == [(32, 32), (64, 32)]


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "function", "content": "42", "name": "x"}, "messages[0].role"),
        ({"role": "wizard", "content": "hi"}, "messages[0].role"),
        (
            {"role": "user", "content": "x", "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{}"}}]},
            "messages[0].tool_calls",
        ),
        (
            {"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "[1]"}}]},
            "messages[0].tool_calls[0].function.arguments",
        ),
        ({"role": "user", "content": None}, "messages[0].content"),
        ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, "messages[0].content[0].type"),
        (
            {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
            "messages[0].content[0]",
        ),
    ],
)
def test_malformed_messages_are_a_400_naming_where(message: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        turns([message])
    assert info.value.param == param


def test_too_many_images_is_refused_before_any_download() -> None:
    part = {"type": "image_url", "image_url": {"url": "http://nonexistent.invalid/cat.png"}}
    with pytest.raises(InvalidRequest) as info:
        turns([{"role": "user", "content": [part, part, part]}], max_images=2)
    assert "SNARK_MAX_IMAGES_PER_REQUEST" in info.value.message and info.value.code == "invalid_request"


def test_a_bad_image_names_which_part_failed() -> None:
    parts = [
        {"type": "image_url", "image_url": {"url": data_uri()}},
        {"type": "image_url", "image_url": {"url": "ftp://example.com/cat.png"}},
    ]
    with pytest.raises(InvalidRequest) as info:
        turns([{"role": "user", "content": parts}])
    assert info.value.param == "messages[0].content[1].image_url.url"
    assert "http, https and data:" in info.value.message


# --- speech, resampling, keys --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": "mp3"}, "response_format"),
        ({"response_format": "opus"}, "response_format"),
        ({"input": "   "}, "input"),
        ({"input": "a" * 4097}, "input"),
        ({"speed": 5.0}, "speed"),
        ({"instructions": "Speak like a pirate."}, "instructions"),
        ({"stream_format": "sse"}, "stream_format"),
    ],
)
def test_speech_requests_snark_cannot_honour_are_a_400(fields: dict, param: str) -> None:
    request = SpeechRequest.model_validate({"model": "tts-1", "input": "Hello.", "voice": "alloy", **fields})
    with pytest.raises(InvalidRequest) as info:
        request.check_supported()
    assert info.value.param == param
    if param == "response_format":
        assert "wav" in info.value.message and "pcm" in info.value.message


def test_speech_accepts_any_voice_name_or_id() -> None:
    for voice in ("alloy", "verse", {"id": "voice_123"}, None):
        SpeechRequest.model_validate({"input": "Hi.", "voice": voice, "response_format": "pcm"}).check_supported()


def test_resample_keeps_duration_and_shape_of_the_signal() -> None:
    t = np.arange(22050) / 22050
    tone = (np.sin(2 * np.pi * 440 * t) * 10000).astype("<i2").tobytes()  # 1 s of A4 at 22.05 kHz
    out = np.frombuffer(resample_pcm16(tone, 22050, 24000), dtype="<i2")
    assert len(out) == 24000
    expected = np.sin(2 * np.pi * 440 * np.arange(24000) / 24000) * 10000
    assert np.max(np.abs(out - expected)) < 150  # linear interpolation error on a 440 Hz tone
    assert resample_pcm16(tone, 22050, 22050) is tone


def test_key_matches_only_whole_keys() -> None:
    keys = (b"alpha-key", b"beta-key")
    assert key_matches("beta-key", keys)
    assert not key_matches("beta", keys) and not key_matches("beta-key2", keys) and not key_matches("", keys)
    assert not key_matches("ключ", keys)  # non-ASCII input must not raise


@pytest.mark.parametrize("usage_field", [False, True])
@pytest.mark.parametrize("text", ["Hello", 'quote " and \\ backslash', "東京 🎉\n", "\x00 nul"])
def test_the_templated_content_chunk_equals_the_plain_one(text: str, usage_field: bool) -> None:
    from snark.api.replies import ChatReply, sse_line

    reply = ChatReply(model='tiny "model"', prompt_tokens=3)
    assert reply.content_sse(text, usage_field=usage_field) == sse_line(
        reply.chunk({"content": text}, usage_field=usage_field)
    )


def test_a_finished_row_has_a_finish_reason_and_a_row_stopped_by_shutdown_raises() -> None:
    from snark.api.streaming import finish_reason_of, raise_if_shut_down
    from snark.errors import ShuttingDown
    from snark.values import FinishReason

    assert finish_reason_of(FinishReason.STOP) == "stop" and finish_reason_of(FinishReason.LENGTH) == "length"
    raise_if_shut_down(FinishReason.LENGTH)  # an answer that finished passes
    for reason in (FinishReason.CANCELLED, None):
        with pytest.raises(ShuttingDown) as info:
            raise_if_shut_down(reason)
        assert info.value.status_code == 503
        with pytest.raises(ShuttingDown):
            finish_reason_of(reason)
