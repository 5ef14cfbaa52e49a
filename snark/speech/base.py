"""The one protocol every text-to-speech engine speaks, plus the checks they share.

A ``Speaker`` turns text into 16-bit mono little-endian PCM, one chunk per sentence (or per engine
chunk), so the API can stream audio while later sentences are still being synthesized.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from snark.errors import InvalidRequest, SnarkError

# OpenAI's /v1/audio/speech accepts 0.25..4.0; we take the same range so its clients just work.
MIN_SPEED = 0.25
MAX_SPEED = 4.0


class SpeechUnavailable(SnarkError):
    """The configured speech engine cannot run on this server (501): a missing optional extra or
    voice file. Not the client's fault, and not a bug: the operator has to install or configure it."""

    status_code = 501
    type = "not_implemented_error"
    code = "speech_unavailable"


@runtime_checkable
class Speaker(Protocol):
    @property
    def sample_rate(self) -> int:
        """Hertz of every PCM chunk ``synthesize`` yields."""
        ...

    def synthesize(self, text: str, *, speed: float = 1.0) -> Iterator[bytes]:
        """Yield 16-bit mono little-endian PCM chunks for ``text``. ``speed`` 1.0 is normal, 2.0
        twice as fast. Raises ``InvalidRequest`` when called, not when iterated, for a bad speed.
        The synthesis pool calls it from several threads at once: an engine that cannot run
        concurrently serialises itself (Coqui does)."""
        ...


def validate_speed(speed: float) -> float:
    """Return ``speed`` or raise ``InvalidRequest``; NaN and infinities fail the range check."""
    if not MIN_SPEED <= speed <= MAX_SPEED:  # also rejects NaN: every comparison with it is False
        raise InvalidRequest(
            f"speed must be between {MIN_SPEED} and {MAX_SPEED} (1.0 is normal), got {speed!r}.",
            param="speed",
        )
    return float(speed)
