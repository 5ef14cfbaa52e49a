"""The official ``openai`` client, unchanged, against Snark on the tiny model and the real Piper voice.

Answers of the tiny model are noise, but greedy decoding is deterministic, so a streamed answer must
equal the plain one token for token, and stop strings can be picked from a first greedy answer.
"""

from __future__ import annotations

import base64
import io
import struct
import wave
from collections.abc import Iterator

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import image_server as serve_image

GREEDY = {"model": "snark", "temperature": 0}


def ask(text: str = "Hello") -> list[dict]:
    return [{"role": "user", "content": text}]


def png(size: tuple[int, int], color=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def data_uri(size: tuple[int, int]) -> str:
    return "data:image/png;base64," + base64.b64encode(png(size)).decode()


def with_images(*urls: str, text: str = "What is this?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-needed", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving one PNG (test settings allow loopback image URLs)."""
    with serve_image(png((56, 84), (30, 10, 200)), "image/png") as url:
        yield f"{url}/picture.png"


# --- models --------------------------------------------------------------------------------------


def test_models_lists_the_served_model_and_any_name_reaches_it(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["snark-tiny-random-qwen2.5-vl"]
    assert client.models.retrieve(models[0].id).owned_by == "snark"
    # One rule everywhere: chat answers under any model name, so retrieving any name describes the served model.
    for name in ("qwen", "gpt-4o", "Qwen/Qwen2.5-VL-7B-Instruct"):
        assert client.models.retrieve(name).id == models[0].id
        reply = client.chat.completions.create(model=name, messages=ask(), max_tokens=2, temperature=0)
        assert reply.model == models[0].id


# --- chat ----------------------------------------------------------------------------------------


def test_plain_chat_has_openai_shape_and_usage(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(messages=ask(), max_tokens=6, **GREEDY)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "snark-tiny-random-qwen2.5-vl"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 5 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens == 6 if choice.finish_reason == "length" else usage.completion_tokens <= 6


def test_max_completion_tokens_wins_over_max_tokens(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(messages=ask(), max_tokens=9, max_completion_tokens=3, **GREEDY)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3


def test_system_and_assistant_turns_count_in_the_prompt(client: openai.OpenAI) -> None:
    alone = client.chat.completions.create(messages=ask(), max_tokens=1, **GREEDY).usage.prompt_tokens
    history = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Hello"},
    ]
    longer = client.chat.completions.create(messages=history, max_tokens=1, **GREEDY).usage.prompt_tokens
    assert longer > alone


def test_stream_equals_the_plain_answer_with_whole_characters(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(messages=ask(), max_tokens=16, **GREEDY)
    stream = client.chat.completions.create(
        messages=ask(), max_tokens=16, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    # The role comes with the first text (as vLLM sends it): clients time the first token from it.
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 5  # token by token, not one block at the end
    assert all("\ufffd" not in d for d in deltas)  # multi-byte characters never split
    text = "".join(deltas)
    assert text == plain.choices[0].message.content
    assert any(ord(ch) > 127 for ch in text)  # the tiny model's noise has CJK/Thai: the check means something
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_sends_no_usage_and_ends_with_done(base_url: str) -> None:
    body = {"messages": ask(), "max_tokens": 3, "stream": True, **GREEDY}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines) and '"usage"' not in "".join(lines)


def test_malformed_json_is_a_400_that_says_so(base_url: str) -> None:
    response = httpx.post(
        f"{base_url}/v1/chat/completions",
        content=b"{bad json",
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert "not valid JSON" in error["message"] and error["param"] is None


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        options = {"temperature": 1.0, "top_p": 0.9, "seed": seed, "max_tokens": 8}
        extras = {"top_k": 50, "repetition_penalty": 1.1}  # vLLM-style extensions travel in extra_body
        reply = client.chat.completions.create(model="snark", messages=ask(), extra_body=extras, **options)
        return reply.choices[0].message.content

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)  # 151k-token vocabulary: equal 8-token draws are practically impossible


def test_stop_sequence_cuts_the_answer_right_before_it(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(messages=ask("Stop here"), max_tokens=16, **GREEDY).choices[0].message.content
    cut_at = next(
        i for i in range(len(full) // 3, len(full) - 1) if full.find(full[i : i + 2]) == i and full[i : i + 2].strip()
    )
    stop = full[cut_at : cut_at + 2]
    reply = client.chat.completions.create(
        messages=ask("Stop here"), max_tokens=16, stop=["never-there", stop], **GREEDY
    )
    assert reply.choices[0].message.content == full[:cut_at]
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        messages=ask("Stop here"), max_tokens=16, stop=stop, stream=True, **GREEDY
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[:cut_at]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_images_by_data_uri_and_url_count_in_usage(client: openai.OpenAI, image_server: str) -> None:
    def prompt_tokens(messages: list[dict]) -> int:
        reply = client.chat.completions.create(messages=messages, max_tokens=2, **GREEDY)
        assert reply.choices[0].message.content is not None
        return reply.usage.prompt_tokens

    text_only = prompt_tokens(with_images())
    one = prompt_tokens(with_images(data_uri((56, 84))))
    by_url = prompt_tokens(with_images(image_server))  # the same 56x84 picture, fetched over HTTP
    two = prompt_tokens(with_images(data_uri((56, 84)), image_server))
    assert one > text_only and by_url == one
    assert two - text_only == 2 * (one - text_only)  # each image adds its own tokens
    assert prompt_tokens(with_images(data_uri((224, 224)))) > one  # more pixels, more image tokens


def test_streamed_chat_with_an_image(client: openai.OpenAI, image_server: str) -> None:
    chunks = list(
        client.chat.completions.create(messages=with_images(image_server), max_tokens=4, stream=True, **GREEDY)
    )
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


# --- errors surface as the client's own exception types ------------------------------------------


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"n": 9}, "n"),  # over SNARK_MAX_N
        ({"tools": [{"type": "function", "function": {"name": "look up"}}]}, "tools[0].function.name"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"temperature": 3.5}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": with_images("ftp://example.com/cat.png")}, "messages[0].content[0].image_url.url"),
        ({"messages": with_images("data:image/png;base64,!!!")}, "messages[0].content[0].image_url.url"),
    ],
)
def test_bad_requests_raise_bad_request_error(client: openai.OpenAI, options: dict, param: str) -> None:
    request = {"messages": ask(), "max_tokens": 2, **GREEDY, **options}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**request)
    assert info.value.param == param and info.value.type == "invalid_request_error"
    assert info.value.message


def test_a_streamed_bad_request_is_a_400_before_any_event(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(messages=ask(), n=9, stream=True, **GREEDY)


# --- speech --------------------------------------------------------------------------------------

SENTENCE = "Snark can talk."
PARAGRAPH = "Snark can talk. It speaks one sentence at a time! Long answers start playing early."


def test_speech_writes_a_playable_wav(client: openai.OpenAI, tmp_path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "speech.wav"
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=SENTENCE, response_format="wav"
    ) as response:
        assert response.headers["content-type"] == "audio/wav"
        response.stream_to_file(target)
    with wave.open(str(target), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 22050)
        frames = wav.getnframes()
        assert len(wav.readframes(frames)) == 2 * frames  # header sizes match the data exactly
    assert frames / 22050 > 0.5


def test_long_speech_streams_a_wav_of_unknown_length(client: openai.OpenAI) -> None:
    short = client.audio.speech.create(model="tts-1", voice="echo", input=SENTENCE, response_format="wav").read()
    with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="nova", input=PARAGRAPH, response_format="wav", speed=1.0
    ) as response:
        assert "content-length" not in response.headers
        data = response.read()
    assert struct.unpack_from("<I", data, 40)[0] == 0xFFFFFFFF  # streaming header: size unknown up front
    with wave.open(io.BytesIO(data), "rb") as wav:
        assert wav.getframerate() == 22050
        pcm = wav.readframes(wav.getnframes())
    assert len(pcm) > 2 * (len(short) - 44)  # three sentences speak longer than the first alone


def test_speech_pcm_is_24khz_like_openai(client: openai.OpenAI) -> None:
    def pcm(text: str) -> bytes:
        with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=text, response_format="pcm"
        ) as response:
            assert response.headers["x-sample-rate"] == "24000"
            return response.read()

    # Nothing speakable gives the voice's 0.1 s of silence: 2205 samples at 22.05 kHz become exactly
    # 2400 at 24 kHz. (Spoken lengths vary by a few percent per run: Piper's VITS samples durations.)
    assert len(pcm("🎉")) == 2 * 2400
    speech = pcm(SENTENCE)
    assert len(speech) % 2 == 0 and 0.6 < len(speech) / 2 / 24000 < 2.5


@pytest.mark.parametrize(
    ("options", "param"),
    [({"response_format": "mp3"}, "response_format"), ({"input": ""}, "input"), ({"speed": 10.0}, "speed")],
)
def test_speech_refusals_raise_bad_request_error(client: openai.OpenAI, options: dict, param: str) -> None:
    request = {"model": "tts-1", "voice": "alloy", "input": SENTENCE, "response_format": "wav", **options}
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.speech.create(**request)
    assert info.value.param == param
    if param == "response_format":
        assert "wav and pcm" in info.value.message
