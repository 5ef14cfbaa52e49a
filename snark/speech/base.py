"""The one protocol every text-to-speech engine speaks, plus the speed check they share.

A ``Speaker`` turns one sentence into 16-bit mono little-endian PCM, so the API can stream audio
while later sentences are still being synthesized.
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
    """A text-to-speech engine. It is handed one sentence at a time, already split and cleaned of
    markdown and emoji (``stream.py`` does both, once, for every caller): it neither splits nor cleans."""

    @property
    def sample_rate(self) -> int:
        """Hertz of every PCM chunk ``synthesize`` yields."""
        ...

    def synthesize(self, sentence: str, *, speed: float = 1.0) -> Iterator[bytes]:
        """Yield 16-bit mono little-endian PCM chunks for one clean ``sentence``; a short silence when
        it has nothing to say (""). ``speed`` 1.0 is normal, 2.0 twice as fast. Raises
        ``InvalidRequest`` when called, not when iterated, for a speed out of range: requests are
        checked where they enter, and this guards the engine for callers that come straight here.
        The synthesis pool calls it from several threads at once: an engine that cannot run
        concurrently serialises itself (Coqui does)."""
        ...


def validate_speed(speed: float) -> float:
    """Return ``speed`` or raise ``InvalidRequest``; NaN and infinities fail the range check. The
    request models call it where a request enters; each ``Speaker`` calls it to guard its engine."""
    if not MIN_SPEED <= speed <= MAX_SPEED:  # also rejects NaN: every comparison with it is False
        raise InvalidRequest(
            f"speed must be between {MIN_SPEED} and {MAX_SPEED} (1.0 is normal), got {speed!r}.",
            param="speed",
        )
    return float(speed)
