"""The continuous-batching engine on the tiny model: a row's output does not depend on its batch
companions or on the step it joined at, and each row streams, ends and is cancelled on its own.

"Joined at one step" is checked through ``scheduled_at``: the engine stamps every row it admits at
one step with the same instant. "Ran together" means their running times overlapped. Join points
are set by counting the events of a running request, never by sleeping.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time

import pytest
import torch
from PIL import Image

from snark.engine.loader import load_model
from snark.engine.request import GenerationRequest, Outbox, PromptInputs, RequestState, StreamEvent
from snark.engine.transformers import TransformersEngine as Engine
from snark.engine.transformers.engine import PREPARING_WAIT_FACTOR
from snark.engine.transformers.rows import Row
from snark.errors import InvalidRequest
from snark.values import ChatTurn, FinishReason, SamplingParams
from tests.conftest import start_engine

MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 16 * 28 * 28  # images of 4 to 16 tokens keep the tests fast


def _build(engine: Engine, *parts: str | Image.Image) -> PromptInputs:
    return engine.prompts.build([ChatTurn("user", list(parts))], min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def _mixed_prompts(engine: Engine) -> list[PromptInputs]:
    """Text and image rows of different lengths."""
    return [
        _build(engine, "Hi."),
        _build(engine, Image.new("RGB", (56, 56), (200, 30, 30)), "What colour is this?"),
        _build(engine, "Write a long and careful answer about the history of the bicycle, " * 3),
        _build(engine, Image.new("RGB", (112, 84), (20, 90, 220)), "Describe it."),
        _build(engine, "2 + 2 = ?"),
    ]


def _solo(engine: Engine, prompt: PromptInputs, params: SamplingParams) -> GenerationRequest:
    return asyncio.run(engine.run_to_completion(prompt, params))


def _together(engine: Engine, jobs: list[tuple[PromptInputs, SamplingParams]]) -> list[GenerationRequest]:
    async def run():
        return await asyncio.gather(*(engine.run_to_completion(prompt, params) for prompt, params in jobs))

    return asyncio.run(run())


def _one_batch(requests: list[GenerationRequest]) -> bool:
    """Joined the running batch at the same step."""
    return len({r.scheduled_at for r in requests}) == 1 and requests[0].scheduled_at is not None


def _ran_together(requests: list[GenerationRequest]) -> bool:
    return max(r.scheduled_at for r in requests) < min(r.finished_at for r in requests)


async def _lead_and_join(
    engine: Engine, leader: tuple[PromptInputs, SamplingParams], joiners: list[tuple[int, PromptInputs, SamplingParams]]
) -> tuple[GenerationRequest, list[GenerationRequest]]:
    """Run a leader request; submit each joiner ``(k, prompt, params)`` once the leader has streamed
    ``k`` text events, i.e. while it is running. Returns the leader and the finished joiners."""
    lead = engine.submit(*leader)
    submitted: list[GenerationRequest | None] = [None] * len(joiners)
    seen = 0
    async for event in lead.events():
        seen += bool(event.text)
        for index, (k, prompt, params) in enumerate(joiners):
            if submitted[index] is None and (seen >= k or event.is_final):
                submitted[index] = engine.submit(prompt, params, deliver_deltas=False)
        if all(submitted):
            break
    for request in submitted:
        async for _ in request.events():
            pass
    engine.cancel(lead)  # the leader has done its part; it ends at the next step
    async for _ in lead.events():
        pass
    return lead, submitted


def test_greedy_output_is_the_same_whatever_step_a_row_joins_at(tiny_engine):
    """Text and image rows join a running batch at random steps: each one's greedy output equals
    its output alone."""
    prompts = _mixed_prompts(tiny_engine)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    alone = [_solo(tiny_engine, prompt, params).text for prompt in prompts]
    choose = random.Random(7)
    for _ in range(3):
        leader, *joiners = choose.sample(range(len(prompts)), len(prompts))
        points = [choose.randint(1, 10) for _ in joiners]
        # The leader could run 2000 tokens: it is cancelled once the rows that joined it are done.
        lead, joined = asyncio.run(
            _lead_and_join(
                tiny_engine,
                (prompts[leader], SamplingParams(max_new_tokens=2000, ignore_eos=True)),
                [(k, prompts[i], params) for k, i in zip(points, joiners)],
            )
        )
        assert [r.text for r in joined] == [alone[i] for i in joiners], (leader, joiners, points)
        assert lead.finish_reason is FinishReason.CANCELLED and lead.completion_tokens < 2000
        assert all(lead.scheduled_at < r.scheduled_at < lead.finished_at for r in joined)  # joined mid-flight


def test_a_short_request_does_not_wait_for_long_running_ones(tiny_engine):
    """Head-of-line: a short request that arrives while long ones run starts at the next step and
    ends while they are still running."""
    long_prompt, short_prompt = _mixed_prompts(tiny_engine)[2], _mixed_prompts(tiny_engine)[0]
    long_params = SamplingParams(max_new_tokens=2000, ignore_eos=True)

    async def run():
        longs = [tiny_engine.submit(long_prompt, long_params) for _ in range(3)]
        seen = 0
        async for event in longs[0].events():
            seen += bool(event.text)
            if seen == 3:
                break
        short = await tiny_engine.run_to_completion(short_prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))
        still_running = [not r.is_done for r in longs]
        for request in longs:
            tiny_engine.cancel(request)
            async for _ in request.events():  # until its final event: the engine ended the row
                pass
        return longs, short, still_running

    longs, short, still_running = asyncio.run(run())
    assert short.completion_tokens == 4 and short.finish_reason is FinishReason.LENGTH
    assert still_running == [True, True, True]
    assert all(r.scheduled_at < short.scheduled_at for r in longs)
    assert all(r.finish_reason is FinishReason.CANCELLED for r in longs)


def test_each_row_keeps_its_own_max_new_tokens_in_one_batch(tiny_engine):
    prompts = _mixed_prompts(tiny_engine)[:3]
    limits = [2, 9, 5]
    done = _together(
        tiny_engine, [(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in zip(prompts, limits)]
    )
    assert _one_batch(done)
    assert [r.completion_tokens for r in done] == limits
    assert {r.finish_reason for r in done} == {FinishReason.LENGTH}


def test_a_short_row_reaches_its_client_before_the_long_row_ends(tiny_engine):
    short_prompt, long_prompt = _mixed_prompts(tiny_engine)[:2]
    endless = 2000  # tokens: only the cancellation below ends this row

    async def run():
        short = tiny_engine.submit(short_prompt, SamplingParams(max_new_tokens=2, ignore_eos=True))
        long_ = tiny_engine.submit(long_prompt, SamplingParams(max_new_tokens=endless, ignore_eos=True))
        async for event in short.events():
            if event.is_final:
                long_running = not long_.is_done  # the short answer is in while the long row still runs
                long_.cancel()
        async for _ in long_.events():
            pass
        return short, long_, long_running

    short, long_, long_running = asyncio.run(run())
    assert _one_batch([short, long_])
    assert long_running and long_.finish_reason is FinishReason.CANCELLED and long_.completion_tokens < endless
    assert short.completion_tokens == 2 and short.finish_reason is FinishReason.LENGTH


def test_cancelling_one_row_leaves_the_others_unchanged(tiny_engine):
    prompts = _mixed_prompts(tiny_engine)[:3]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    alone = [_solo(tiny_engine, prompts[i], params).text for i in (0, 2)]

    async def run():
        requests = [tiny_engine.submit(prompt, params) for prompt in prompts]
        events = []

        async def cancel_after_first_event(request: GenerationRequest) -> None:
            async for event in request.events():
                events.append(event)
                request.cancel()  # what a disconnect does; the row ends at its next step

        async def drain(request: GenerationRequest) -> None:
            async for _ in request.events():
                pass

        await asyncio.gather(drain(requests[0]), cancel_after_first_event(requests[1]), drain(requests[2]))
        return requests, events

    (first, cancelled, third), events = asyncio.run(run())
    assert _one_batch([first, cancelled, third])
    assert cancelled.state is RequestState.CANCELLED and events[-1].finish_reason is FinishReason.CANCELLED
    assert cancelled.completion_tokens < 24
    assert [first.text, third.text] == alone
    assert first.completion_tokens == third.completion_tokens == 24


def test_max_batch_size_one_runs_requests_one_after_another(tiny_model_dir, tiny_engine):
    prompts = _mixed_prompts(tiny_engine)[:3]
    params = SamplingParams(max_new_tokens=6)
    expected = [_solo(tiny_engine, prompt, params).text for prompt in prompts]
    serial = start_engine(tiny_model_dir, max_batch_size=1, batch_wait_ms=20)
    try:
        done = _together(serial, [(prompt, params) for prompt in prompts])
    finally:
        serial.stop()
    assert [r.text for r in done] == expected
    ordered = sorted(done, key=lambda r: r.scheduled_at)
    for earlier, later in itertools.pairwise(ordered):
        assert later.scheduled_at >= earlier.finished_at  # never two rows at once


def test_seeded_sampling_is_reproducible_and_ignores_batch_companions(tiny_engine):
    prompts = _mixed_prompts(tiny_engine)
    sampled = SamplingParams(max_new_tokens=8, temperature=3.0, seed=1234, ignore_eos=True)
    first = _solo(tiny_engine, prompts[0], sampled).text
    assert _solo(tiny_engine, prompts[0], sampled).text == first
    other_seed = SamplingParams(max_new_tokens=8, temperature=3.0, seed=99, ignore_eos=True)
    assert _solo(tiny_engine, prompts[0], other_seed).text != first  # the seed is really used
    done = _together(
        tiny_engine,
        [(prompts[1], SamplingParams(max_new_tokens=8)), (prompts[0], sampled), (prompts[2], other_seed)],
    )
    assert _one_batch(done)
    assert done[1].text == first


def test_stop_string_cuts_the_text_where_it_starts(tiny_engine):
    prompt = _mixed_prompts(tiny_engine)[2]
    full = _solo(tiny_engine, prompt, SamplingParams(max_new_tokens=16, ignore_eos=True)).text
    assert len(full) >= 8
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = _solo(tiny_engine, prompt, SamplingParams(max_new_tokens=16, ignore_eos=True, stop=(stop,)))
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason is FinishReason.STOP


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_end_of_turn_ends_a_row_unless_it_ignores_eos(tiny_engine, ignore_eos):
    eos = min(tiny_engine.eos_token_ids)
    request = GenerationRequest(
        prompt=PromptInputs([1, 2]), params=SamplingParams(max_new_tokens=3, ignore_eos=ignore_eos)
    )
    row = Row(
        request,
        tokenizer=tiny_engine.loaded.processor.tokenizer,
        eos_token_ids=tiny_engine.eos_token_ids,
        vocab_size=200,
        device=torch.device("cpu"),
        image_token_id=tiny_engine.loaded.model.config.image_token_id,
        video_token_id=tiny_engine.loaded.model.config.video_token_id,
    )
    row.accept(eos, Outbox(), time.perf_counter())
    assert row.done is not ignore_eos
    if ignore_eos:
        row.accept(100, Outbox(), time.perf_counter())
        row.accept(101, Outbox(), time.perf_counter())
        assert request.finish_reason is FinishReason.LENGTH and request.completion_tokens == 3
    else:
        assert request.finish_reason is FinishReason.STOP and request.completion_tokens == 1


def test_a_batch_waits_for_requests_whose_prompts_are_still_being_built(tiny_engine, monkeypatch):
    # B's prompt takes longer to build than the batch wait (as a burst of images does); A is already
    # queued. B still joins A's batch, because the engine knows B is on its way.
    build = tiny_engine.prompts.build
    release = threading.Event()

    def slow_for_b(turns, **pixels):
        if turns[0].parts[-1] == "B":
            release.wait(30)
        return build(turns, **pixels)

    monkeypatch.setattr(tiny_engine.prompts, "build", slow_for_b)
    # A plain wait of 0.25 s and a longer one of 5 s: B, released past the first, has seconds to join.
    monkeypatch.setattr(tiny_engine, "batch_wait_s", 0.25)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    assert tiny_engine.batch_wait_s * PREPARING_WAIT_FACTOR >= 5

    async def one(text: str) -> GenerationRequest:
        prompt = await tiny_engine.build_prompt(
            [ChatTurn("user", [text])], min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
        )
        return await tiny_engine.run_to_completion(prompt, params)

    async def run():
        b = asyncio.ensure_future(one("B"))
        a = asyncio.ensure_future(one("A"))
        while tiny_engine.num_waiting < 1:  # A is queued, B is still being built
            await asyncio.sleep(0.005)
        await asyncio.sleep(2 * tiny_engine.batch_wait_s)  # past the plain batch wait, well within the longer one
        a_still_waiting = tiny_engine.num_waiting == 1 and tiny_engine.num_running == 0
        release.set()
        return a_still_waiting, *await asyncio.gather(a, b)

    a_still_waiting, a, b = asyncio.run(run())
    assert a_still_waiting  # the engine held A past the plain wait because B was on its way
    assert _one_batch([a, b])


def test_tiny_temperatures_and_top_k_one_are_greedy_and_harmless_to_companions(tiny_engine):
    assert SamplingParams(temperature=1e-40).is_greedy and SamplingParams(temperature=0.7, top_k=1).is_greedy
    assert not SamplingParams(temperature=0.7).is_greedy
    prompt = _build(tiny_engine, "Tell me a story.")
    greedy = SamplingParams(max_new_tokens=6)
    alone = _solo(tiny_engine, prompt, greedy)
    # 1e-40 underflows to 0 in float32: sampled, it would turn the logits into NaN and fail the batch.
    tiny, plain = _together(
        tiny_engine, [(prompt, SamplingParams(max_new_tokens=6, temperature=1e-40)), (prompt, greedy)]
    )
    assert tiny.text == plain.text == alone.text
    assert tiny.state is plain.state is RequestState.FINISHED


def test_a_stopped_engine_refuses_new_requests_instead_of_queueing_them(tiny_model_dir):
    from snark.errors import ModelNotReady

    engine = start_engine(tiny_model_dir, max_batch_size=2)
    prompt = _build(engine, "Hello")
    engine.stop()

    async def submit_after_stop():
        engine.submit(prompt, SamplingParams(max_new_tokens=2))

    with pytest.raises(ModelNotReady, match="shutting down"):
        asyncio.run(submit_after_stop())


def test_a_request_larger_than_the_whole_kv_budget_is_refused_at_submit(tiny_model_dir):
    engine = start_engine(tiny_model_dir, max_batch_size=4, kv_cache_bytes=64 * 1024)
    try:
        budget = engine.kv_cache_budget_tokens
        prompt = _build(engine, "Hello")
        assert 0 < budget < prompt.num_tokens + 2000

        async def submit(max_new: int) -> GenerationRequest:
            return await engine.run_to_completion(prompt, SamplingParams(max_new_tokens=max_new, ignore_eos=True))

        with pytest.raises(InvalidRequest, match="KV cache") as refused:
            asyncio.run(submit(budget))
        assert refused.value.status_code == 400 and "max_tokens" in refused.value.message
        assert asyncio.run(submit(4)).completion_tokens == 4  # one that fits runs
    finally:
        engine.stop()


def test_a_burst_of_long_prompts_waits_for_room_and_stays_within_the_kv_budget(tiny_model_dir, tiny_engine):
    """A budget of about two long rows: eight long requests at once run a few at a time (joining,
    and being preempted, as blocks free up), all finish, their outputs equal their outputs alone, and
    the cache's tensors never outgrow the budget."""
    prompts = [_build(tiny_engine, f"Request {i}: " + "tell me about the history of bicycles. " * 12) for i in range(8)]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    need = max(p.num_tokens for p in prompts) + params.max_new_tokens
    alone = [_solo(tiny_engine, p, params).text for p in prompts]
    per_token = 2 * 2 * 1 * 32 * 4  # keys and values x 2 layers x 1 KV head x 32 dims x float32
    budget = (2 * need + 1) * per_token
    engine = start_engine(tiny_model_dir, max_batch_size=8, kv_cache_bytes=budget, prefix_caching=False)
    try:
        assert engine.cache.block_bytes == per_token * engine.cache.block_size
        assert engine.cache.num_blocks * engine.cache.block_bytes <= budget
        done = _together(engine, [(p, params) for p in prompts])
        assert [r.text for r in done] == alone
        joined_at = sorted({r.scheduled_at for r in done})
        assert len(joined_at) >= 4  # they could not all run at once: they joined as room freed up
    finally:
        engine.stop()


def test_queued_text_events_reach_a_late_consumer_merged_and_in_order():
    async def run():
        request = GenerationRequest(prompt=PromptInputs([1]), params=SamplingParams())
        request.bind_to_running_loop()
        for text in ("a", "b", "c"):
            request.push(StreamEvent(text=text))
        request.finish(FinishReason.LENGTH)
        await asyncio.sleep(0)  # the pushes arrive through call_soon_threadsafe
        await asyncio.sleep(0)
        return [event async for event in request.events()]

    events = asyncio.run(run())
    assert [(e.text, e.finish_reason) for e in events] == [("abc", FinishReason.LENGTH)]


def test_an_error_after_queued_text_comes_after_that_text():
    async def run():
        request = GenerationRequest(prompt=PromptInputs([1]), params=SamplingParams())
        request.bind_to_running_loop()
        request.push(StreamEvent(text="a"))
        request.push(StreamEvent(text="b"))
        request.fail(RuntimeError("boom"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        seen = []
        with pytest.raises(RuntimeError, match="boom"):
            async for event in request.events():
                seen.append(event.text)
        return seen

    assert asyncio.run(run()) == ["ab"]


def test_the_engine_warms_up_before_it_is_ready_without_counting_it_as_traffic(tiny_model_dir):
    engine = Engine(lambda: load_model(tiny_model_dir, device="cpu"), max_batch_size=2)
    heard: list[GenerationRequest] = []
    engine.add_listener(heard.append)
    engine.start()
    try:
        engine.wait_ready(120)
        assert heard == [] and engine.num_running == 0 and engine.num_waiting == 0
        assert engine.peak_blocks_used > 0  # the warm-up did run through the cache
        assert engine.prefix_cache_counts == (0, 0)
    finally:
        engine.stop()


def test_kv_cache_usage_shows_the_blocks_running_rows_hold(tiny_engine):
    """Usage counts the blocks a row's tokens fill so far, not the room its max_tokens could take."""
    prompt = _build(tiny_engine, "Tell me a long story.")

    async def run():
        request = tiny_engine.submit(prompt, SamplingParams(max_new_tokens=2000, ignore_eos=True))
        seen = 0
        async for event in request.events():
            seen += bool(event.text)
            if seen == 3:
                break
        usage = tiny_engine.kv_cache_usage
        generated = request.completion_tokens
        tiny_engine.cancel(request)
        async for _ in request.events():
            pass
        return usage, generated

    usage, generated = asyncio.run(run())
    blocks = usage * (tiny_engine.pool.num_blocks - 1)
    size = tiny_engine.cache.block_size
    assert blocks == pytest.approx(round(blocks))
    assert -(-(prompt.num_tokens + 2) // size) <= round(blocks) <= -(-(prompt.num_tokens + generated + 1) // size)


def test_a_long_prompt_is_prefilled_in_chunks_while_running_rows_keep_decoding(tiny_model_dir, tiny_engine):
    """Prompts longer than SNARK_MAX_PREFILL_TOKENS are prefilled a chunk per step: text and image
    prompts give the same greedy output as in one piece, and a running row decodes between chunks."""
    image = Image.new("RGB", (112, 84), (20, 90, 220))
    prompts = [
        _build(tiny_engine, "Tell me about the history of bicycles, " * 6),
        _build(tiny_engine, image, "Describe it " * 10),
    ]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    whole = [_solo(tiny_engine, p, params).text for p in prompts]
    chunk = 16
    engine = start_engine(tiny_model_dir, max_batch_size=4, max_prefill_tokens=chunk)
    try:
        chunks = 0
        for prompt, expected in zip(prompts, whole):
            assert prompt.num_tokens > 3 * chunk

            async def run(prompt=prompt):  # called within this iteration
                runner = engine.submit(_build(engine, "Hi."), SamplingParams(max_new_tokens=2000, ignore_eos=True))
                async for event in runner.events():
                    if event.text:
                        break
                at_submit, before = runner.completion_tokens, engine.prefill_chunks_run
                done = await engine.run_to_completion(prompt, params)
                decoded_meanwhile = runner.completion_tokens - at_submit
                engine.cancel(runner)
                async for _ in runner.events():
                    pass
                return done, decoded_meanwhile, before

            done, decoded_meanwhile, before = asyncio.run(run())
            chunks = -(-prompt.num_tokens // chunk)
            assert engine.prefill_chunks_run - before == chunks
            assert done.text == expected and done.completion_tokens == 8
            assert decoded_meanwhile >= chunks  # one decode step after every chunk
    finally:
        engine.stop()


def test_requests_refused_or_stopped_at_shutdown_say_so(tiny_model_dir):
    from snark.errors import ShuttingDown

    engine = start_engine(tiny_model_dir, max_batch_size=1)
    prompt = _build(engine, "Hello")

    async def run():
        running = engine.submit(prompt, SamplingParams(max_new_tokens=2000, ignore_eos=True))
        waiting = engine.submit(prompt, SamplingParams(max_new_tokens=4))
        async for event in running.events():
            if event.text:
                break
        await asyncio.to_thread(engine.stop)
        with pytest.raises(ShuttingDown) as refused:
            async for _ in waiting.events():
                pass
        with pytest.raises(ShuttingDown):
            engine.submit(prompt, SamplingParams(max_new_tokens=4))
        return refused.value, running

    refused, running = asyncio.run(run())
    assert refused.status_code == 503 and refused.code == "shutting_down"
    assert running.finish_reason is FinishReason.CANCELLED
