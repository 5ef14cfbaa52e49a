"""Speech seam tests with the real bundled joe piper voice (loaded once for the module)."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import struct
import threading
import time
import wave
from collections.abc import Iterator
from functools import partial

import pytest

from snark.config import Settings
from snark.errors import InvalidRequest
from snark.speech import (
    WAV_HEADER_BYTES,
    LazySpeaker,
    Speaker,
    SpeechUnavailable,
    SynthesisPool,
    build_speaker,
    clean_for_speech,
    pcm_to_wav,
    single_text,
    speak_deltas,
    speakable_sentences,
    split_sentences,
    wav_header,
)
from snark.speech.piper_engine import PiperSpeaker

SENTENCE = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def piper() -> PiperSpeaker:
    return PiperSpeaker()  # the bundled joe voice: en_US-joe-medium, 22,050 Hz


def read_wav(data: bytes) -> tuple[wave.Wave_read, bytes]:
    reader = wave.open(io.BytesIO(data), "rb")
    return reader, reader.readframes(reader.getnframes())


def speak_wav(speaker: Speaker, text: str, speed: float = 1.0) -> bytes:
    return pcm_to_wav(b"".join(speaker.synthesize(text, speed=speed)), speaker.sample_rate)


def seconds(wav_bytes: bytes) -> float:
    reader, _ = read_wav(wav_bytes)
    return reader.getnframes() / reader.getframerate()


# --- text ----------------------------------------------------------------------------------------

MARKDOWN = """# Answer ##
Here is **bold**, _it_, ~~old~~ and `snake_case` with [the docs](https://x.y/z) and ![a cat](c.png) 🎉🔥👍🏽.

```python
print("hi")
```

- first item
* [x] done
2. second
> quoted <b>text</b> &amp; more
| name | value |
|------|:-----:|
| a    | 1     |
---
Family 👨‍👩‍👧 ok, 25°C and 3 < 4."""


def test_clean_for_speech_strips_markdown_html_and_emoji() -> None:
    assert clean_for_speech(MARKDOWN) == "\n".join(
        [
            "Answer",
            "Here is bold, it, old and snake_case with the docs and a cat.",
            'print("hi")',  # code kept, fence markers dropped
            "first item",
            "done",
            "second",
            "quoted text & more",
            "name, value",
            "a, 1",
            "Family ok, 25°C and 3 < 4.",
        ]
    )


@pytest.mark.parametrize(
    ("markdown", "spoken"),
    [
        ("Compute `2 * 3` in `__init__`, not *2*.", "Compute 2 * 3 in __init__, not 2."),
        ("See <https://example.com> or <br/>here.", "See https://example.com or here."),
        ("### Steps\n1) plug in\n10. done", "Steps\nplug in\ndone"),
        ("> > nested *quote* 🚀", "nested quote"),
        ("a\x00b, bell\x07 and\x7f\x9bdelete", "a b, bell and delete"),  # control characters are gaps
    ],
)
def test_clean_for_speech_inline_cases(markdown: str, spoken: str) -> None:
    assert clean_for_speech(markdown) == spoken


@pytest.mark.parametrize("text", ["", "   \n\t ", "🎉🔥👍🏽", "**__**", "```\n```"])
def test_clean_for_speech_of_nothing_speakable_is_empty(text: str) -> None:
    assert clean_for_speech(text) == ""
    assert split_sentences(clean_for_speech(text)) == []


def test_split_sentences_keeps_abbreviations_decimals_and_initials() -> None:
    text = "Dr. Smith met J. R. Tolkien at 3.5 p.m. today! Really? Yes, e.g. this one.\nNew line"
    assert split_sentences(text) == [
        "Dr. Smith met J. R. Tolkien at 3.5 p.m. today!",
        "Really?",
        "Yes, e.g. this one.",
        "New line",
    ]


@pytest.mark.parametrize("max_chars", [1, 7, 20, 50])
def test_split_sentences_bounds_every_piece_and_loses_no_words(max_chars: int) -> None:
    text = "alpha, beta gamma; delta " * 20 + "x" * 120 + ". Short one."
    pieces = split_sentences(text, max_chars=max_chars)
    assert all(0 < len(piece) <= max_chars for piece in pieces)
    assert "".join("".join(pieces).split()) == "".join(text.split())


def test_speakable_sentences_split_then_clean_and_drop_what_has_nothing_to_say() -> None:
    text = "# Title\n**Bold.** Then *more* 🎉.\n```\n🎉"
    assert speakable_sentences(text) == ["Title", "Bold.", "Then more."]
    assert speakable_sentences("🎉 **") == []


def test_split_sentences_prefers_commas_over_spaces() -> None:
    assert split_sentences("one two three, four five six seven", max_chars=20) == [
        "one two three,",
        "four five six seven",
    ]


# --- wav -----------------------------------------------------------------------------------------


def test_pcm_to_wav_matches_wav_header_with_known_length() -> None:
    pcm = struct.pack("<4h", 0, 1000, -1000, 32767)
    wav_bytes = pcm_to_wav(pcm, 22050)
    assert wav_bytes == wav_header(22050, num_samples=4) + pcm
    reader, frames = read_wav(wav_bytes)
    assert (reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) == (1, 2, 22050)
    assert frames == pcm


def test_streaming_header_has_unknown_sizes_and_still_parses() -> None:
    header = wav_header(16000)
    assert len(header) == WAV_HEADER_BYTES == 44
    assert header[:4] == b"RIFF" and header[8:16] == b"WAVEfmt " and header[36:40] == b"data"
    assert struct.unpack_from("<I", header, 4)[0] == 0xFFFFFFFF
    assert struct.unpack_from("<I", header, 40)[0] == 0xFFFFFFFF
    assert struct.unpack_from("<I", header, 24)[0] == 16000
    # Python's wave reader (like most players) accepts it and reads the PCM that follows.
    reader, frames = read_wav(header + b"\x01\x00\x02\x00")
    assert reader.getframerate() == 16000 and frames == b"\x01\x00\x02\x00"


# --- piper, the real joe voice -------------------------------------------------------------------


def test_piper_is_a_speaker(piper: PiperSpeaker) -> None:
    assert isinstance(piper, Speaker)
    assert piper.sample_rate == 22050


def test_piper_sentence_is_a_plausible_wav(piper: PiperSpeaker) -> None:
    wav_bytes = speak_wav(piper, SENTENCE)
    reader, frames = read_wav(wav_bytes)
    assert (reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) == (1, 2, 22050)
    assert reader.getnframes() > 0 and len(frames) == 2 * reader.getnframes()
    assert 0.3 < seconds(wav_bytes) < 10.0
    assert max(abs(s) for (s,) in struct.iter_unpack("<h", frames)) > 1000  # speech, not silence


def test_speed_two_is_clearly_shorter(piper: PiperSpeaker) -> None:
    normal = speak_wav(piper, SENTENCE, speed=1.0)
    fast = speak_wav(piper, SENTENCE, speed=2.0)
    assert seconds(fast) < 0.8 * seconds(normal)


@pytest.mark.parametrize("speed", [0.0, 0.2, 4.01, -1.0, float("nan"), float("inf")])
def test_speed_out_of_range_is_a_400(piper: PiperSpeaker, speed: float) -> None:
    with pytest.raises(InvalidRequest, match="speed") as caught:
        piper.synthesize(SENTENCE, speed=speed)  # raised on the call, before any iteration
    assert caught.value.status_code == 400 and caught.value.param == "speed"


@pytest.mark.parametrize("text", ["", "   ", "🎉🔥 👍🏽", "...", "**"])
def test_nothing_speakable_gives_short_silence(piper: PiperSpeaker, text: str) -> None:
    wav_bytes = speak_wav(piper, clean_for_speech(text))  # a Speaker is handed clean text (stream.py cleans it)
    reader, frames = read_wav(wav_bytes)
    assert reader.getframerate() == 22050 and 0 < seconds(wav_bytes) <= 0.5
    assert frames == bytes(len(frames))


def test_a_nul_in_the_text_is_spoken_as_a_gap(piper: PiperSpeaker) -> None:
    # espeak refuses a NUL outright; cleaning turns every control character into a space first.
    assert seconds(speak_wav(piper, clean_for_speech("Hello\x00world."))) > 0.3


def spoken(speaker: Speaker, text: str, pool: SynthesisPool | None = None) -> list[bytes]:
    pool = pool or SynthesisPool(2)

    async def collect() -> list[bytes]:
        pieces = speak_deltas(single_text(text), partial(pool.speak, speaker))
        return [piece.pcm async for piece in pieces if piece.pcm]

    return asyncio.run(collect())


def test_spoken_text_is_pcm_per_sentence(piper: PiperSpeaker) -> None:
    chunks = spoken(piper, "First sentence here. Second one follows! And a **third**?")
    assert len(chunks) == 3  # one per sentence, so the first can play while the rest render
    assert all(len(chunk) > 0 and len(chunk) % 2 == 0 for chunk in chunks)


class ThreadRecordingSpeaker:
    """The real piper voice, noting which thread produced each chunk and how many sentences it spoke."""

    def __init__(self, inner: Speaker) -> None:
        self.inner, self.threads, self.sentences = inner, set[int](), 0
        self.texts: list[str] = []
        self.started = threading.Event()

    @property
    def sample_rate(self) -> int:
        return self.inner.sample_rate

    def synthesize(self, text: str, *, speed: float = 1.0) -> Iterator[bytes]:
        self.threads.add(threading.get_ident())
        self.sentences += 1
        self.texts.append(text)
        self.started.set()
        return self.inner.synthesize(text, speed=speed)


def test_synthesis_never_runs_on_the_event_loop(piper: PiperSpeaker) -> None:
    speaker = ThreadRecordingSpeaker(piper)
    loop_threads = []

    async def collect() -> int:
        loop_threads.append(threading.get_ident())
        pool = SynthesisPool(2)
        pieces = speak_deltas(single_text("One. Two. Three."), partial(pool.speak, speaker))
        return len([piece async for piece in pieces if piece.pcm])

    assert asyncio.run(collect()) == 3
    assert speaker.threads and loop_threads[0] not in speaker.threads


def test_the_speaker_is_handed_each_sentence_split_and_cleaned_once(piper: PiperSpeaker) -> None:
    speaker = ThreadRecordingSpeaker(piper)
    written = ["# Ti", "tle\n**Bold.** Then *mo", "re* 🎉.\n```\n🎉"]

    async def deltas():  # type: ignore[no-untyped-def]
        for delta in written:
            yield delta

    async def collect() -> list:
        pieces = speak_deltas(deltas(), partial(SynthesisPool(2).speak, speaker))
        return [piece async for piece in pieces]

    pieces = asyncio.run(collect())
    assert speaker.texts == ["Title", "Bold.", "Then more."]  # the fence and the lone emoji: nothing to say
    assert "".join(piece.text for piece in pieces) == "".join(written)  # the transcript keeps the markdown
    assert len([piece for piece in pieces if piece.pcm]) == 3


def test_leaving_the_stream_stops_synthesis(piper: PiperSpeaker) -> None:
    """A client that disconnects after the first sentence costs at most the run-ahead in synthesis."""
    speaker = ThreadRecordingSpeaker(piper)
    text = " ".join(f"Sentence number {n} is here." for n in range(30))

    async def first_sentence_only() -> None:
        pool = SynthesisPool(2)
        pieces = speak_deltas(single_text(text), partial(pool.speak, speaker), run_ahead=2)
        async for piece in pieces:
            if piece.pcm:
                break
        await pieces.aclose()  # what Starlette does when the client goes away
        pool.close(wait=True)  # a sentence already running finishes: count it

    asyncio.run(first_sentence_only())
    assert 1 <= speaker.sentences <= 1 + 2  # the one heard, plus at most the run-ahead


# --- lazy loading and engine choice --------------------------------------------------------------


def test_lazy_speaker_loads_once_under_concurrent_first_calls(piper: PiperSpeaker) -> None:
    calls = 0

    def factory() -> Speaker:
        nonlocal calls
        calls += 1
        time.sleep(0.05)  # widen the race window; correctness does not depend on it
        return piper

    lazy = LazySpeaker(factory, engine_name="piper")
    assert not lazy.loaded and lazy.load_seconds is None and calls == 0
    start = threading.Barrier(6)
    results: list[object] = []

    def first_call(index: int) -> None:
        start.wait()
        if index % 2:
            results.append(lazy.sample_rate)
        else:
            results.append(b"".join(lazy.synthesize("Hi.")))

    threads = [threading.Thread(target=first_call, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == 1 and lazy.loaded and lazy.engine_name == "piper"
    assert lazy.load_seconds is not None and lazy.load_seconds >= 0.05
    assert len(results) == 6 and results.count(22050) == 3


def test_lazy_speaker_rejects_bad_speed_without_loading() -> None:
    lazy = LazySpeaker(lambda: pytest.fail("the engine must not load for a bad request"))
    with pytest.raises(InvalidRequest):
        lazy.synthesize("Hello.", speed=10.0)
    assert not lazy.loaded


def test_build_speaker_piper_is_lazy_and_honours_tts_voice(tmp_path) -> None:  # type: ignore[no-untyped-def]
    speaker = build_speaker(Settings(tts_engine="piper"))
    assert isinstance(speaker, LazySpeaker) and speaker.engine_name == "piper" and not speaker.loaded
    missing = build_speaker(Settings(tts_engine="piper", tts_voice=str(tmp_path / "nope.onnx")))
    with pytest.raises(SpeechUnavailable, match="SNARK_TTS_VOICE") as caught:
        missing.load()
    assert caught.value.status_code == 501 and not missing.loaded


def test_build_speaker_coqui_without_the_extra_says_how_to_install() -> None:
    speaker = build_speaker(Settings(tts_engine="coqui"))
    assert speaker.engine_name == "coqui" and not speaker.loaded  # building it imports nothing
    if importlib.util.find_spec("TTS") is None:
        with pytest.raises(SpeechUnavailable, match=r"uv sync --extra coqui") as caught:
            speaker.load()
        assert caught.value.status_code == 501
        assert "SNARK_TTS_ENGINE=piper" in caught.value.message
    else:  # the extra is installed: the configured model must really load and report its rate
        assert speaker.sample_rate > 0
