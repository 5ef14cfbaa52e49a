"""16-bit PCM from a voice's own sample rate to the rate a client expects (OpenAI's pcm is 24 kHz)."""

from __future__ import annotations

import numpy as np


def resample_pcm16(pcm: bytes, from_rate: int, to_rate: int) -> bytes:
    """Mono 16-bit little-endian PCM at ``from_rate`` -> the same at ``to_rate``, by linear interpolation.

    Meant for speech chunks (a sentence each), resampled one by one: chunk edges are the pauses
    between sentences, so no seam is audible. Upsampling (the bundled voice's 22.05 kHz -> 24 kHz)
    adds no aliasing; downsampling a voice above the target rate would alias a little, as there is no
    low-pass filter here.
    """
    if from_rate == to_rate or not pcm:
        return pcm
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
    count = round(len(samples) * to_rate / from_rate)
    positions = np.arange(count, dtype=np.float64) * (from_rate / to_rate)
    resampled = np.interp(positions, np.arange(len(samples)), samples)
    return np.clip(np.rint(resampled), -32768, 32767).astype("<i2").tobytes()
