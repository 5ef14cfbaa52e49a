"""Spoken-reply latency and real-time factor against a running Snark server.

    SNARK_TINY_DIR=/tmp/snark-tiny-v2 uv run snark serve --tiny &
    uv run python bench_spoken.py --url http://127.0.0.1:8123 --tokens 200 --rounds 3 --concurrency 4

Per round, one after the other on the same prompt (greedy, so the same answer each time):
  text      POST /infer/text (JSON): the whole answer
  sentence  POST /infer/text stream=true: when the first sentence (as the server's splitter cuts it) is written
  spoken    POST /infer/text response_format=wav: the first audio byte after the header, and the last byte
Then a short /v1/audio/speech "Hi." sent 10 s into a 300-token spoken reply (still synthesizing), and
``--concurrency`` spoken replies at once; for each, the stream's real-time factor: the time from
its first to its last audio byte over the audio's length (below 1: playback started at the first
byte never runs dry, given the first sentence), and the longest stall a player would have had.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import httpx

from snark.speech.splitter import SentenceSplitter

PROMPT = "Describe a walk through an old city in detail."
HEADER_BYTES = 44
BYTES_PER_SECOND = 22050 * 2  # the bundled voice: 22,050 Hz 16-bit mono


def form(tokens: int, **extra: str) -> dict:
    return {"prompt": PROMPT, "max_new_tokens": str(tokens), "temperature": "0", **extra}


def text_seconds(http: httpx.Client, tokens: int) -> float:
    started = time.perf_counter()
    http.post("/infer/text", data=form(tokens)).raise_for_status()
    return time.perf_counter() - started


def first_sentence_seconds(http: httpx.Client, tokens: int) -> float:
    splitter, started = SentenceSplitter(), time.perf_counter()
    with http.stream("POST", "/infer/text", data=form(tokens, response_format="text", stream="true")) as response:
        for text in response.iter_text():
            if splitter.feed(text):
                return time.perf_counter() - started
    return time.perf_counter() - started  # one sentence: the whole answer


def spoken(http: httpx.Client, tokens: int) -> dict:
    """First audio byte, last byte, audio seconds and the worst playback stall of one spoken reply."""
    started, received, first_at, stall = time.perf_counter(), 0, None, 0.0
    with http.stream("POST", "/infer/text", data=form(tokens, response_format="wav")) as response:
        for chunk in response.iter_raw():
            now = time.perf_counter()
            audio_before = max(received - HEADER_BYTES, 0) / BYTES_PER_SECOND
            received += len(chunk)
            if first_at is None and received > HEADER_BYTES:
                first_at = now
            elif first_at is not None:
                stall = max(stall, (now - first_at) - audio_before)  # >0: the player ran out of audio
    last_at = time.perf_counter()
    audio_s = (received - HEADER_BYTES) / BYTES_PER_SECOND
    return {
        "first_audio_s": first_at - started,
        "last_byte_s": last_at - started,
        "audio_s": audio_s,
        "stream_rtf": (last_at - first_at) / audio_s,
        "stall_s": stall,
    }


def short_during_long(url: str, tokens: int = 300, after_s: float = 10.0) -> float:
    """Seconds for a "Hi." speech request sent ``after_s`` into a ``tokens``-token spoken reply (minutes
    of audio on the tiny model, so its synthesis is still running then, on any version of the server)."""

    def speak_long() -> None:
        with httpx.stream(
            "POST", f"{url}/infer/text", data=form(tokens, response_format="wav"), timeout=600
        ) as response:
            for _ in response.iter_raw():
                pass

    reader = threading.Thread(target=speak_long)
    reader.start()
    time.sleep(after_s)
    sent = time.perf_counter()
    httpx.post(
        f"{url}/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": "Hi."}, timeout=600
    ).raise_for_status()
    took = time.perf_counter() - sent
    reader.join()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8123")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    with httpx.Client(base_url=args.url, timeout=600) as http:
        spoken(http, 20)  # warm-up: loads the voice
        rows = []
        for _ in range(args.rounds):
            rows.append(
                (text_seconds(http, args.tokens), first_sentence_seconds(http, args.tokens), spoken(http, args.tokens))
            )
        print(f"{args.tokens}-token answer, {args.rounds} rounds (median):")
        text_s = statistics.median(row[0] for row in rows)
        sentence_s = statistics.median(row[1] for row in rows)
        first_audio_s = statistics.median(row[2]["first_audio_s"] for row in rows)
        last_s = statistics.median(row[2]["last_byte_s"] for row in rows)
        print(f"  text answer (JSON)          {text_s:6.2f} s")
        print(f"  first sentence written      {sentence_s:6.2f} s")
        print(
            f"  spoken: first audio byte    {first_audio_s:6.2f} s  ({first_audio_s / text_s:.2f}x the text answer, "
            f"first sentence + {first_audio_s - sentence_s:.2f} s)"
        )
        print(
            f"  spoken: last byte           {last_s:6.2f} s  "
            f"({statistics.median(r[2]['audio_s'] for r in rows):.1f} s of audio)"
        )

        print(f'"Hi." while a long speech streams: {short_during_long(args.url):.2f} s')
        results: list[dict] = []

        def one() -> None:
            with httpx.Client(base_url=args.url, timeout=600) as own:
                results.append(spoken(own, args.tokens))

        threads = [threading.Thread(target=one) for _ in range(args.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(f"{args.concurrency} spoken replies at once:")
        for i, result in enumerate(results):
            print(
                f"  reply {i}: first audio {result['first_audio_s']:5.2f} s, {result['audio_s']:5.1f} s of audio, "
                f"stream real-time factor {result['stream_rtf']:.2f}, longest stall {result['stall_s']:.2f} s"
            )


if __name__ == "__main__":
    main()
