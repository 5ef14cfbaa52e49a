"""Videos over HTTP on the tiny model: chat ``video_url`` parts (the official ``openai`` client, data:
URIs, http URLs, frame lists, streaming, sampling fields), ``/infer/video`` (upload, URL, spoken
answers), and bad input refused with a 4xx naming the field."""

from __future__ import annotations

import base64
import io
import wave

import httpx
import openai
import pytest
from PIL import Image

from snark.values import ChatTurn
from snark.video.decode import decode_video
from snark.video.load import VideoLimits
from tests.conftest import image_server
from tests.videos import make_audio_only, make_video

CLIP = make_video(16, fps=8)  # 2 s: 4 frames sampled at 2 a second


def data_uri(data: bytes, media_type: str = "video/mp4") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def png_uri(color: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, "PNG")
    return data_uri(buffer.getvalue(), "image/png")


def video_part(url: str, **fields) -> dict:
    return {"type": "video_url", "video_url": {"url": url}, **fields}


def chat(base_url: str, *parts: dict, text: str = "What happens?", **body) -> httpx.Response:
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
    payload = {"messages": messages, "max_tokens": 4, "temperature": 0, **body}
    return httpx.post(f"{base_url}/v1/chat/completions", json=payload, timeout=120)


def expected_tokens(tiny_engine, test_settings, data: bytes, text: str = "What happens?", **sampling) -> int:
    """Prompt tokens Snark's own builder counts for this video under the server's default sampling."""
    caps = VideoLimits.from_settings(test_settings).caps
    video = decode_video(data, caps.clamp(**sampling), VideoLimits.from_settings(test_settings).decode)
    prompt = tiny_engine.prompts.build([ChatTurn("user", [video, text])], min_pixels=3136, max_pixels=100_000)
    return prompt.num_tokens


def assert_error(response: httpx.Response, status: int, param: str | None, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    for fragment in fragments:
        assert fragment in error["message"]
    return error


def test_the_openai_client_sends_a_video(base_url, tiny_engine, test_settings):
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    content = [video_part(data_uri(CLIP)), {"type": "text", "text": "What happens?"}]
    reply = client.chat.completions.create(
        model="snark", messages=[{"role": "user", "content": content}], max_tokens=4, temperature=0
    )
    assert reply.choices[0].message.content and reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == expected_tokens(tiny_engine, test_settings, CLIP)


def test_streamed_answer_about_a_video_url(base_url):
    with image_server(CLIP, "video/mp4") as server:
        body = {
            "messages": [
                {"role": "user", "content": [video_part(f"{server}/clip.mp4"), {"type": "text", "text": "Hi"}]}
            ],
            "max_tokens": 4,
            "stream": True,
        }
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and any('"content"' in line for line in lines)


def test_sampling_fields_change_the_frames_and_are_held_to_the_caps(base_url, tiny_engine, test_settings):
    clip = make_video(48, fps=8)  # 6 s: 12 frames by default
    default = chat(base_url, video_part(data_uri(clip))).json()["usage"]["prompt_tokens"]
    assert default == expected_tokens(tiny_engine, test_settings, clip)
    one_fps = chat(base_url, video_part(data_uri(clip), fps=1.0)).json()["usage"]["prompt_tokens"]
    assert one_fps == expected_tokens(tiny_engine, test_settings, clip, fps=1.0) < default
    # Request-wide (vLLM's mm_processor_kwargs), a part's own fields nearer: video_url's, then the part's.
    wide = chat(base_url, video_part(data_uri(clip)), mm_processor_kwargs={"fps": 1.0}).json()
    assert wide["usage"]["prompt_tokens"] == one_fps
    nearest = {"type": "video_url", "video_url": {"url": data_uri(clip), "fps": 1.0}, "fps": 4.0}
    assert chat(base_url, nearest, mm_processor_kwargs={"fps": 4.0}).json()["usage"]["prompt_tokens"] == one_fps
    # Asking for more than the server allows is held to its caps, not refused.
    greedy = chat(base_url, video_part(data_uri(clip), max_pixels=10**9, total_pixels=10**12, max_frames=100_000))
    assert greedy.status_code == 200 and greedy.json()["usage"]["prompt_tokens"] == default
    part = chat(base_url, video_part(data_uri(clip), video_start=2.0, video_end=4.0)).json()
    assert part["usage"]["prompt_tokens"] == expected_tokens(tiny_engine, test_settings, clip, start_s=2.0, end_s=4.0)


def test_frames_sampled_by_the_client_are_one_video(base_url):
    frames = [png_uri((i * 40, 90, 200)) for i in range(3)]
    reply = chat(base_url, {"type": "video", "video": frames, "fps": 1.0})
    assert reply.status_code == 200, reply.text
    # 3 frames padded to 4 (2 pairs), each 64x48 frame raised to the 128-token floor of a frame: 10x14 patches of 28
    assert reply.json()["usage"]["prompt_tokens"] > 2 * 10 * 14


def test_a_video_and_an_image_together(base_url):
    image = {"type": "image_url", "image_url": {"url": png_uri((10, 200, 30))}}
    assert chat(base_url, image, video_part(data_uri(CLIP))).status_code == 200


@pytest.mark.parametrize(
    ("part", "status", "param", "fragment"),
    [
        (
            video_part(data_uri(b"not a video at all")),
            400,
            "messages[0].content[0].video_url.url",
            "is not a video file",
        ),
        (video_part(data_uri(make_audio_only())), 400, "messages[0].content[0].video_url.url", "no video track"),
        (video_part("file:///etc/passwd"), 400, "messages[0].content[0].video_url.url", "Only http, https"),
        (video_part("data:text/plain;base64,aGk="), 400, "messages[0].content[0].video_url.url", "data:video/mp4"),
        (video_part(data_uri(CLIP), fps=0), 400, "messages[0].content[0].fps", "greater than 0"),
        (video_part(data_uri(CLIP), video_start=3, video_end=1), 400, "messages[0].content[0].video_end", "video_end"),
        ({"type": "video", "video": []}, 400, "messages[0].content[0].video", "empty"),
    ],
)
def test_bad_videos_are_4xx_naming_the_part(base_url, part, status, param, fragment):
    error = assert_error(chat(base_url, part), status, param, fragment)
    assert error["type"] == "invalid_request_error"


def test_too_many_videos_is_refused_before_any_download(base_url):
    hits: list[str] = []
    with image_server(CLIP, "video/mp4", on_get=hits.append) as server:
        parts = [video_part(f"{server}/{i}.mp4") for i in range(3)]
        assert_error(chat(base_url, *parts), 400, "messages", "SNARK_MAX_VIDEOS_PER_REQUEST")
    assert hits == []


def test_videos_only_in_user_messages(base_url):
    messages = [{"role": "assistant", "content": [video_part(data_uri(CLIP))]}, {"role": "user", "content": "Hi"}]
    response = httpx.post(f"{base_url}/v1/chat/completions", json={"messages": messages, "max_tokens": 2}, timeout=60)
    assert_error(response, 400, "messages[0].content[0]", "only accepted in user messages")


# --- /infer/video ---------------------------------------------------------------------------------


def infer(base_url, files=None, **fields) -> httpx.Response:
    data = {"prompt": "What happens?", "max_new_tokens": "4", **{k: str(v) for k, v in fields.items()}}
    return httpx.post(f"{base_url}/infer/video", data=data, files=files, timeout=120)


def test_form_upload_and_url(base_url, tiny_engine, test_settings):
    uploaded = infer(base_url, files={"video_file": ("clip.mp4", CLIP, "video/mp4")})
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["usage"]["prompt_tokens"] == expected_tokens(tiny_engine, test_settings, CLIP)
    with image_server(CLIP, "video/mp4") as server:
        fetched = infer(base_url, video_url=f"{server}/clip.mp4", fps=1, max_frames=2)
    assert (
        fetched.status_code == 200
        and fetched.json()["usage"]["prompt_tokens"] < uploaded.json()["usage"]["prompt_tokens"]
    )


def test_form_spoken_answer_about_a_video(base_url):
    response = infer(
        base_url, files={"video_file": ("clip.mp4", CLIP, "video/mp4")}, response_format="wav", stream="false"
    )
    assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
    with wave.open(io.BytesIO(response.content)) as wav:
        assert wav.getnframes() > 0


def test_form_errors_name_the_field(base_url):
    assert_error(infer(base_url), 400, "video_url", "exactly one of video_url")
    bad = infer(base_url, files={"video_file": ("notes.txt", b"hello", "text/plain")})
    assert_error(bad, 400, "video_file", "'notes.txt' is not a video file")
    assert_error(infer(base_url, video_url="ftp://example.com/a.mp4"), 400, "video_url", "Only http, https")
