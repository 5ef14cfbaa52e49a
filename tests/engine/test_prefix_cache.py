"""Prefix caching and the vision encoder cache on the tiny model: hits never change greedy output
(alone, joining mid-flight, chunked), images are keyed by content, salts separate, eviction under
block pressure loses no request."""

from __future__ import annotations

import asyncio

import pytest
from PIL import Image

from snark.engine.request import GenerationRequest, PromptInputs
from snark.values import ChatTurn, SamplingParams
from tests.conftest import start_engine, wait_until

PARAMS = SamplingParams(max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def uncached(tiny_model_dir):
    """The reference: the same engine with prefix caching off."""
    engine = start_engine(tiny_model_dir, max_batch_size=4, prefix_caching=False, encoder_cache_bytes=0)
    yield engine
    engine.stop()


@pytest.fixture
def cached(tiny_model_dir):
    engine = start_engine(tiny_model_dir, max_batch_size=4, max_prefill_tokens=24)
    yield engine
    engine.stop()


def _build(engine, *turns: list) -> PromptInputs:
    chat = [ChatTurn(role, parts) for role, parts in turns]
    return engine.prompts.build(chat, min_pixels=3136, max_pixels=200_000)


def _generate(engine, prompt: PromptInputs, params: SamplingParams = PARAMS) -> GenerationRequest:
    async def run():
        return await engine.run_to_completion(prompt, params)

    return asyncio.run(run())


def _hits(engine) -> int:
    return engine.prefix_cache_counts[1]


def _image(color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (112, 84), color)


def test_a_conversation_re_sending_its_image_hits_and_answers_as_without_the_cache(cached, uncached):
    image = _image((20, 90, 220))
    turns = [("user", [image, "What is in this picture? " * 3])]
    for turn in range(3):
        prompt_c, prompt_u = _build(cached, *turns), _build(uncached, *turns)
        before = _hits(cached)
        answer = _generate(cached, prompt_c)
        assert answer.text == _generate(uncached, prompt_u).text
        if turn:  # the history, image included, comes from the cache
            assert _hits(cached) - before >= prompt_c.num_tokens - 24 - cached.cache.block_size
        turns += [("assistant", [answer.text]), ("user", [f"And question {turn}?"])]
    assert cached.runner.images_encoded == 2  # the warm-up's image and this one, once


def test_a_hit_joining_mid_flight_and_in_chunks_answers_as_alone(cached, uncached):
    prompt = _build(cached, ("user", ["Tell me about the history of bicycles. " * 8]))
    expected = _generate(uncached, prompt).text
    _generate(cached, prompt)  # now cached

    async def run():
        runner = cached.submit(_build(cached, ("user", ["Hi."])), SamplingParams(max_new_tokens=400, ignore_eos=True))
        async for event in runner.events():
            if event.text:
                break
        done = await cached.run_to_completion(prompt, PARAMS)
        cached.cancel(runner)
        async for _ in runner.events():
            pass
        return done

    assert asyncio.run(run()).text == expected


def test_two_images_of_the_same_size_share_no_cached_blocks(cached, uncached):
    question = "Describe the picture in detail."
    red, blue = (
        _build(cached, ("user", [_image((220, 30, 30)), question])),
        _build(cached, ("user", [_image((30, 30, 220)), question])),
    )
    assert red.input_ids == blue.input_ids  # the same placeholder tokens
    _generate(cached, red)
    before = _hits(cached)
    answer = _generate(cached, blue)
    image_start = blue.input_ids.index(cached.loaded.model.config.image_token_id)
    assert _hits(cached) - before <= image_start  # at most the text before the image
    assert answer.text == _generate(uncached, blue).text


def test_a_salt_keeps_requests_apart(cached):
    prompt = _build(cached, ("user", ["The same question from two tenants. " * 4]))
    salted = PromptInputs(input_ids=prompt.input_ids, cache_salt="tenant-a")
    other = PromptInputs(input_ids=prompt.input_ids, cache_salt="tenant-b")
    _generate(cached, salted)
    before = _hits(cached)
    _generate(cached, other)
    assert _hits(cached) == before
    _generate(cached, PromptInputs(input_ids=prompt.input_ids, cache_salt="tenant-a"))
    assert _hits(cached) - before >= prompt.num_tokens - cached.cache.block_size


def test_an_image_asked_again_is_encoded_once(cached):
    image = _image((90, 200, 40))
    before = cached.runner.images_encoded
    for question in ("What color is it?", "Is it a square?", "Describe the edges."):
        _generate(cached, _build(cached, ("user", [image, question])))
    assert cached.runner.images_encoded - before == 1


def test_eviction_under_block_pressure_loses_no_request(tiny_model_dir, uncached):
    per_block = 2 * 2 * 1 * 32 * 4 * 16  # keys and values x layers x KV heads x dims x float32 x block
    engine = start_engine(tiny_model_dir, max_batch_size=4, kv_cache_bytes=24 * per_block)
    try:
        prompts = [
            _build(engine, ("user", [f"Topic {i}: " + "tell me about the history of bicycles. " * 6])) for i in range(6)
        ]
        expected = [_generate(uncached, p).text for p in prompts]

        async def run():
            return await asyncio.gather(*[engine.run_to_completion(p, PARAMS) for p in prompts * 2])

        done = asyncio.run(run())
        assert [r.text for r in done] == expected * 2
        # The last answers reach their clients just before the engine thread gives their blocks back.
        wait_until(lambda: engine.pool.num_used == 0, "every block back in the pool")
        assert engine.peak_blocks_used <= engine.pool.num_blocks - 1
    finally:
        engine.stop()


def test_cache_salt_over_http_and_the_cache_counters_in_metrics(base_url):
    import httpx

    body = {"messages": [{"role": "user", "content": "A salted question, asked twice. " * 4}], "max_tokens": 2}

    def counters() -> dict[str, float]:
        text = httpx.get(f"{base_url}/metrics").text
        return {
            line.split()[0]: float(line.split()[1])
            for line in text.splitlines()
            if line.startswith("snark:prefix_cache")
        }

    before = counters()
    for salt in ("tenant-a", "tenant-b"):
        assert (
            httpx.post(f"{base_url}/v1/chat/completions", json={**body, "cache_salt": salt}, timeout=60).status_code
            == 200
        )
    middle = counters()
    assert middle["snark:prefix_cache_queries_total"] > before["snark:prefix_cache_queries_total"]
    assert middle["snark:prefix_cache_hits_total"] == before["snark:prefix_cache_hits_total"]  # salts share nothing
    httpx.post(f"{base_url}/v1/chat/completions", json={**body, "cache_salt": "tenant-a"}, timeout=60)
    assert counters()["snark:prefix_cache_hits_total"] > middle["snark:prefix_cache_hits_total"]
    bad = httpx.post(f"{base_url}/v1/chat/completions", json={**body, "cache_salt": ""}, timeout=60)
    assert bad.status_code == 400 and "cache_salt" in bad.text


def test_long_chunks_after_cached_tokens_answer_as_one_piece(tiny_model_dir, uncached, monkeypatch):
    """Chunks of 300 tokens after 300 and 600 cached ones take the merged two-part attention on CPU."""
    from snark.engine.transformers.model import FlatLanguageModel

    merged = []
    original = FlatLanguageModel._attend_after_context
    monkeypatch.setattr(
        FlatLanguageModel, "_attend_after_context", lambda self, *a: merged.append(1) or original(self, *a)
    )
    prompt = _build(uncached, ("user", ["Tell me about the history of bicycles, part by part. " * 60]))
    assert prompt.num_tokens > 700
    expected = _generate(uncached, prompt).text  # one piece: under the default budget
    engine = start_engine(tiny_model_dir, max_batch_size=2, max_prefill_tokens=300)
    try:
        assert _generate(engine, prompt).text == expected
        assert engine.prefill_chunks_run >= 3 and merged
    finally:
        engine.stop()
