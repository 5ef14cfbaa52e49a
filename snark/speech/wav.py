"""WAV containers for 16-bit PCM: a complete file, or a header for a stream of unknown length."""

from __future__ import annotations

import io
import struct
import wave

import numpy as np

WAV_HEADER_BYTES = 44
# Streaming servers (piper's and Coqui's HTTP servers, ffmpeg with `-f wav -`) write the largest
# 32-bit size when the length is unknown; players then read until the connection closes.
UNKNOWN_SIZE = 0xFFFFFFFF


def wav_header(sample_rate: int, num_samples: int | None = None, channels: int = 1, sample_width: int = 2) -> bytes:
    """The 44-byte RIFF/WAVE/fmt/data header for PCM.

    ``num_samples`` is frames per channel. ``None`` means a stream of unknown length: the RIFF and
    data sizes are then ``0xFFFFFFFF``. The ``wave`` module cannot write that (it seeks back to patch
    sizes, which a socket cannot do), hence ``struct``.
    """
    block_align = channels * sample_width
    if num_samples is None:
        riff_size = data_size = UNKNOWN_SIZE
    else:
        data_size = num_samples * block_align
        riff_size = 36 + data_size  # everything after the 8-byte RIFF chunk header
        if riff_size > UNKNOWN_SIZE:
            raise ValueError(f"{num_samples} samples do not fit a 32-bit WAV file.")
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        riff_size,
        b"WAVE",
        b"fmt ",
        16,
        1,
        channels,
        sample_rate,
        sample_rate * block_align,
        block_align,
        8 * sample_width,
        b"data",
        data_size,
    )


def pcm_to_wav(pcm: bytes, sample_rate: int) -> bytes:
    """A complete mono 16-bit WAV file with correct sizes around ``pcm``."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav_file:
        wav_file.setnchannels(1)
        wav_file.setsampwidth(2)
        wav_file.setframerate(sample_rate)
        wav_file.writeframes(pcm)
    return buffer.getvalue()


def float_to_pcm16(samples: object) -> bytes:
    """Float samples in [-1, 1] (list or array) -> 16-bit little-endian PCM, clipping overshoot."""
    array = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return (array * 32767.0).astype("<i2").tobytes()


def silence(sample_rate: int, seconds: float = 0.1) -> bytes:
    """Zeros as 16-bit PCM: what a speaker yields for text with nothing to say, so callers always get
    a playable file instead of an error or an empty body."""
    return bytes(2 * round(sample_rate * seconds))
