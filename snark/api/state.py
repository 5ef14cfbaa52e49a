"""What every route needs, built once by ``create_app`` and reached through a dependency."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from snark.api.metrics import Metrics
from snark.config import Settings
from snark.engine.base import Engine
from snark.media import DecodedImages, ImageLimits
from snark.speech import LazySpeaker, Voices, build_voices
from snark.video.load import VideoLimits, VideoLoader


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    speaker: LazySpeaker
    image_limits: ImageLimits
    metrics: Metrics
    decoded_images: DecodedImages = field(default_factory=DecodedImages)  # images sent again skip decoding
    videos: VideoLoader = field(default_factory=lambda: VideoLoader(VideoLimits()))  # limits and decoded clips
    voices: Voices = field(init=False)  # named voices around ``speaker``, and the synthesis pool

    def __post_init__(self) -> None:
        self.voices = build_voices(self.settings, self.speaker, on_spoken=self.metrics.observe_synthesis)


async def get_state(request: Request) -> AppState:
    # async: FastAPI would run a plain function in a worker thread, a thread hop for every request.
    return request.app.state.snark
