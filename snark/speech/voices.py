"""Voice names -> speakers, and the synthesis pool they share.

``SNARK_TTS_VOICES`` names extra Piper voices (``name=path.onnx,...``), each loaded on first use.
OpenAI's voice names (alloy, echo, ...) and no name at all speak with the default voice, so OpenAI
clients work unchanged; any other unknown name is a 400 that lists the voices there are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from snark.errors import InvalidRequest
from snark.speech.base import Speaker
from snark.speech.lazy import LazySpeaker
from snark.speech.pool import SynthesisPool, default_workers

if TYPE_CHECKING:
    from snark.config import Settings

OPENAI_VOICES = frozenset("alloy ash ballad coral echo fable nova onyx sage shimmer verse marin cedar".split())
DEFAULT_VOICE = "default"


class Voices:
    def __init__(self, default: LazySpeaker, named: dict[str, LazySpeaker], pool: SynthesisPool) -> None:
        self.default = default
        self.named = named
        self.pool = pool

    def pick(self, name: str | None) -> LazySpeaker:
        """The speaker for ``name``; raises ``InvalidRequest`` (param ``voice``) for an unknown one."""
        if name is None or name == DEFAULT_VOICE:
            return self.default
        speaker = self.named.get(name)
        if speaker is not None:
            return speaker
        if name.lower() in OPENAI_VOICES:
            return self.default
        known = ", ".join([DEFAULT_VOICE, *sorted(self.named)])
        raise InvalidRequest(
            f"Unknown voice {name!r}: this server has {known} (SNARK_TTS_VOICES); OpenAI's voice names "
            "speak with the default voice.",
            param="voice",
        )


def build_voices(
    settings: Settings, default: LazySpeaker, *, on_spoken: Callable[[float, float], None] | None = None
) -> Voices:
    """The configured voices (unloaded) around ``default``, and a pool of SNARK_TTS_WORKERS threads."""
    threads = settings.tts_threads

    def piper_voice(path: str) -> LazySpeaker:
        def load() -> Speaker:
            from snark.speech.piper_engine import PiperSpeaker

            return PiperSpeaker(path, threads=threads)

        return LazySpeaker(load, engine_name="piper")

    named = {name: piper_voice(path) for name, path in settings.tts_voice_paths.items()}
    pool = SynthesisPool(settings.tts_workers or default_workers(), on_spoken=on_spoken)
    return Voices(default, named, pool)
