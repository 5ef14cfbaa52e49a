"""Log-probabilities in Snark's engine on the tiny model, checked against the Hugging Face model's own
forward pass: generated tokens' (from the distribution each was drawn from: penalised, masked,
tempered, truncated) and the prompt's (chunk by chunk, never from the prefix cache), the same alone
and in a batch; ``max_new_tokens=0`` scores a prompt without generating; each event carries the
entries of the tokens whose text it carries."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time

import pytest
import torch

from snark.engine.request import GenerationRequest, Outbox, PromptInputs, StreamEvent
from snark.engine.token_text import TokenTexts
from snark.engine.transformers.logprobs import PROMPT_SLICE_TOKENS, HeldLogprobs
from snark.engine.transformers.rows import Row
from snark.values import ChatTurn, FinishReason, SamplingParams, StructuredOutput, TokenLogprob
from tests.conftest import start_engine

GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def chunked(tiny_model_dir):
    """Prompts prefilled 7 tokens a step: every chunk boundary falls somewhere new."""
    engine = start_engine(tiny_model_dir, max_batch_size=4, max_prefill_tokens=7)
    yield engine
    engine.stop()


def _prompt(engine, text: str) -> PromptInputs:
    return engine.prompts.build([ChatTurn("user", [text])], min_pixels=3136, max_pixels=3136)


def _run(engine, *jobs: tuple[PromptInputs, SamplingParams]) -> list[GenerationRequest]:
    async def run():
        return await asyncio.gather(*(engine.run_to_completion(prompt, params) for prompt, params in jobs))

    return asyncio.run(run())


def _raw_logprobs(engine, ids: list[int]) -> torch.Tensor:
    """The reference: the Hugging Face model's own forward pass over ``ids``, row ``p`` being the
    log-distribution of the token after position ``p`` ([len(ids), vocab])."""
    model = engine.loaded.model
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def _assert_matches(entry: TokenLogprob, reference: torch.Tensor, *, atol: float = 2e-4) -> None:
    """``entry`` (k alternatives) agrees with ``reference`` ([vocab] logprobs) on its token and its top k."""
    assert entry.logprob == pytest.approx(float(reference[entry.token_id]), abs=atol)
    values = reference.topk(len(entry.top)).values.tolist()
    assert [value for _, _, value in entry.top] == pytest.approx(values, abs=atol)
    for token_id, _, value in entry.top:
        assert value == pytest.approx(float(reference[token_id]), abs=atol)


def test_greedy_logprobs_put_the_chosen_token_first_in_a_sorted_top_list(tiny_engine):
    done = _run(tiny_engine, (_prompt(tiny_engine, "Count to ten."), GREEDY))[0]
    assert len(done.logprobs) == done.completion_tokens == 10
    texts = TokenTexts(tiny_engine.loaded.processor.tokenizer)
    for entry in done.logprobs:
        assert entry.logprob <= 0 and math.isfinite(entry.logprob)
        assert len(entry.top) == 5 and entry.top[0][0] == entry.token_id
        assert entry.top[0][2] == entry.logprob
        values = [value for _, _, value in entry.top]
        assert values == sorted(values, reverse=True)
        assert (entry.token, entry.token_bytes) == texts(entry.token_id)
        assert all(token == texts(token_id)[0] for token_id, token, _ in entry.top)


def test_generated_logprobs_equal_the_models_own_distribution(tiny_engine):
    prompt = _prompt(tiny_engine, "Describe a bicycle.")
    done = _run(tiny_engine, (prompt, GREEDY))[0]
    generated = [entry.token_id for entry in done.logprobs]
    reference = _raw_logprobs(tiny_engine, prompt.input_ids + generated)
    for index, entry in enumerate(done.logprobs):
        _assert_matches(entry, reference[prompt.num_tokens - 1 + index])


def test_a_row_alone_and_in_a_batch_gets_the_same_tokens_and_logprobs(tiny_engine):
    prompts = [_prompt(tiny_engine, text) for text in ("Hi.", "Name three rivers, please.", "2 + 2 = ?")]
    jobs = [
        (prompts[0], GREEDY),
        (prompts[1], SamplingParams(max_new_tokens=10, ignore_eos=True)),  # asks for none: none computed
        (prompts[2], dataclasses.replace(GREEDY, logprobs=0, repetition_penalty=1.3)),
        (prompts[0], SamplingParams(max_new_tokens=10, ignore_eos=True, temperature=0.8, seed=3, logprobs=2)),
    ]
    alone = [_run(tiny_engine, job)[0] for job in jobs]
    together = _run(tiny_engine, *jobs)
    for one, other in zip(alone, together):
        assert [e.token_id for e in one.logprobs] == [e.token_id for e in other.logprobs]
        assert one.text == other.text
        for a, b in zip(one.logprobs, other.logprobs):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _, _ in a.top] == [t for t, _, _ in b.top]
            assert [v for _, _, v in a.top] == pytest.approx([v for _, _, v in b.top], abs=1e-4)
    assert together[1].logprobs == [] and together[2].logprobs[0].top == ()
    assert len(together[3].logprobs) == 10 and all(len(e.top) == 2 for e in together[3].logprobs)


def test_penalised_rows_report_the_penalised_distribution(tiny_engine):
    prompt = _prompt(tiny_engine, "Say the same word again and again.")
    params = dataclasses.replace(GREEDY, repetition_penalty=1.5, frequency_penalty=0.7, presence_penalty=0.4)
    done = _run(tiny_engine, (prompt, params))[0]
    generated = [entry.token_id for entry in done.logprobs]
    model = tiny_engine.loaded.model
    with torch.inference_mode():
        raw = model(input_ids=torch.tensor([prompt.input_ids + generated]), use_cache=False).logits[0].float()
    differs = False
    for index, entry in enumerate(done.logprobs):
        logits = raw[prompt.num_tokens - 1 + index].clone()
        seen = set(prompt.input_ids + generated[:index])
        for token in seen:  # HF-style repetition penalty over prompt and output
            logits[token] = logits[token] / 1.5 if logits[token] > 0 else logits[token] * 1.5
        for token in set(generated[:index]):  # OpenAI-style, over the output
            logits[token] -= 0.7 * generated[:index].count(token) + 0.4
        processed = torch.log_softmax(logits, dim=-1)
        _assert_matches(entry, processed)
        differs |= (
            abs(entry.logprob - float(torch.log_softmax(raw[prompt.num_tokens - 1 + index], -1)[entry.token_id])) > 1e-3
        )
    assert differs  # the penalties changed what was reported


def test_a_sampling_row_reports_its_tempered_and_truncated_distribution(tiny_engine):
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=0.7, top_k=3, seed=11, logprobs=6)
    done = _run(tiny_engine, (_prompt(tiny_engine, "Tell me a story."), params))[0]
    for entry in done.logprobs:
        finite = [value for _, _, value in entry.top if math.isfinite(value)]
        assert len(finite) == 3  # top_k=3: the other tokens could not be drawn
        assert entry.token_id in [token for token, _, value in entry.top if math.isfinite(value)]
        assert math.fsum(math.exp(value) for value in finite) == pytest.approx(1.0, abs=1e-4)


def test_a_constrained_row_reports_the_masked_distribution(tiny_engine):
    params = dataclasses.replace(GREEDY, max_new_tokens=6, structure=StructuredOutput("json_object"))
    params = asyncio.run(tiny_engine.prepare(params))
    prompt = _prompt(tiny_engine, "Answer in JSON.")
    done = _run(tiny_engine, (prompt, params))[0]
    generated = [entry.token_id for entry in done.logprobs]
    reference = _raw_logprobs(tiny_engine, prompt.input_ids + generated)
    first = done.logprobs[0]
    assert done.text.lstrip().startswith("{")
    # The mask removed most of the random model's mass: the allowed tokens' share is renormalised.
    assert first.logprob > float(reference[prompt.num_tokens - 1][first.token_id]) + 1.0
    for entry in done.logprobs:
        finite = [value for _, _, value in entry.top if math.isfinite(value)]
        assert math.fsum(math.exp(value) for value in finite) <= 1 + 1e-4


def test_prompt_logprobs_equal_the_models_forward_pass_in_chunks_and_not_from_the_cache(tiny_engine, chunked):
    prompt = _prompt(tiny_engine, "The quick brown fox jumps over the lazy dog. " * 3)
    assert prompt.num_tokens > 3 * 7
    params = SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=3)
    reference = _raw_logprobs(tiny_engine, prompt.input_ids)
    for engine in (tiny_engine, chunked):
        hits = engine.prefix_cache_counts[1]
        first, again = _run(engine, (prompt, params)), _run(engine, (prompt, params))  # again: its blocks are cached
        assert engine.prefix_cache_counts[1] == hits  # neither took a cached prefix
        for done in (first[0], again[0]):
            scores = done.prompt_logprobs
            assert scores is not None and len(scores) == prompt.num_tokens and scores[0] is None
            for position, entry in enumerate(scores[1:], start=1):
                assert entry is not None and entry.token_id == prompt.input_ids[position]
                assert len(entry.top) == 3
                _assert_matches(entry, reference[position - 1])
    assert chunked.prefill_chunks_run > 0


def test_a_prompt_longer_than_a_slice_is_scored_whole(tiny_engine):
    prompt = _prompt(tiny_engine, "one two three four five six seven eight nine ten " * 30)
    assert prompt.num_tokens > PROMPT_SLICE_TOKENS
    done = _run(tiny_engine, (prompt, SamplingParams(max_new_tokens=0, prompt_logprobs=0)))[0]
    reference = _raw_logprobs(tiny_engine, prompt.input_ids)
    assert done.prompt_logprobs is not None and len(done.prompt_logprobs) == prompt.num_tokens
    for position in (1, PROMPT_SLICE_TOKENS, PROMPT_SLICE_TOKENS + 1, prompt.num_tokens - 1):
        entry = done.prompt_logprobs[position]
        assert entry is not None and entry.top == ()
        assert entry.logprob == pytest.approx(float(reference[position - 1][entry.token_id]), abs=2e-4)


def test_zero_new_tokens_scores_the_prompt_and_generates_nothing(tiny_engine):
    prompt = _prompt(tiny_engine, "Score me.")
    done = _run(tiny_engine, (prompt, SamplingParams(max_new_tokens=0, prompt_logprobs=1)))[0]
    assert done.finish_reason is FinishReason.LENGTH
    assert done.completion_tokens == 0 and done.text == "" and done.logprobs == []
    assert done.prompt_logprobs is not None and len(done.prompt_logprobs) == prompt.num_tokens
    # Generating after it scores the same prompt the same way, and the answer's tokens score as generated.
    answer = _run(tiny_engine, (prompt, dataclasses.replace(GREEDY, max_new_tokens=4, prompt_logprobs=1)))[0]
    assert answer.prompt_logprobs is not None
    for a, b in zip(done.prompt_logprobs[1:], answer.prompt_logprobs[1:]):
        assert a is not None and b is not None and a.logprob == pytest.approx(b.logprob, abs=1e-4)
    extended = PromptInputs(prompt.input_ids + [entry.token_id for entry in answer.logprobs])
    scored = _run(tiny_engine, (extended, SamplingParams(max_new_tokens=0, prompt_logprobs=5)))[0]
    assert scored.prompt_logprobs is not None
    for entry, again in zip(answer.logprobs, scored.prompt_logprobs[prompt.num_tokens :]):
        assert again is not None and again.token_id == entry.token_id
        assert again.logprob == pytest.approx(entry.logprob, abs=1e-4)


# --- which event carries which entries -------------------------------------------------------------


def _recording_row(engine, params: SamplingParams) -> tuple[Row, list[StreamEvent]]:
    """A row of ``engine``'s model whose events are recorded as it pushes them."""
    request = GenerationRequest(prompt=PromptInputs([1, 2]), params=params)
    events: list[StreamEvent] = []
    request.push = lambda event, outbox=None: events.append(event)  # type: ignore[method-assign]
    loaded = engine.loaded
    row = Row(
        request,
        tokenizer=loaded.processor.tokenizer,
        eos_token_ids=engine.eos_token_ids,
        vocab_size=loaded.text_config.vocab_size,
        device=torch.device("cpu"),
        image_token_id=loaded.model.config.image_token_id,
        video_token_id=loaded.model.config.video_token_id,
    )
    return row, events


def _feed(row: Row, tokens: list[int]) -> None:
    """The engine's part: each token in turn, with made-up scores, until the row ends."""
    for index, token in enumerate(tokens):
        if row.done:
            return
        row.accept(token, Outbox(), time.perf_counter(), (-float(index), ((token, -float(index)),)))


def test_a_token_held_back_goes_out_with_the_event_that_releases_its_text(tiny_engine):
    tokenizer = tiny_engine.loaded.processor.tokenizer
    # A character the vocabulary splits across tokens that are not text on their own.
    char = next(c for c in "𝄞𓀀🜁𐍈" if len(ids := tokenizer.encode(c)) > 1 and "\ufffd" in tokenizer.decode(ids[:1]))
    tokens = tokenizer.encode("ab" + char + "cd")
    row, events = _recording_row(tiny_engine, SamplingParams(max_new_tokens=len(tokens), logprobs=1))
    _feed(row, tokens)
    assert "".join(e.text for e in events) == "ab" + char + "cd"
    assert [e.token_id for e in events for e in e.logprobs] == tokens  # each token once, in order
    for event in events:  # every event's entries are exactly the bytes of its text
        assert b"".join(entry.token_bytes for entry in event.logprobs) == event.text.encode()
    assert events[-1].finish_reason is FinishReason.LENGTH


def test_a_stop_string_holds_entries_then_the_last_event_takes_them_all(tiny_engine):
    tokenizer = tiny_engine.loaded.processor.tokenizer
    tokens = tokenizer.encode("Hello world and more")
    stop = "world"
    row, events = _recording_row(tiny_engine, SamplingParams(max_new_tokens=50, logprobs=0, stop=(stop,)))
    _feed(row, tokens)
    text = "".join(e.text for e in events)
    assert text == "Hello "
    reported = [entry.token_id for e in events for entry in e.logprobs]
    stopped_at = next(i for i in range(len(tokens)) if stop in tokenizer.decode(tokens[: i + 1]))
    assert reported == tokens[: stopped_at + 1]  # the tokens up to the one that completed the stop string
    assert events[-1].finish_reason is FinishReason.STOP
    for event in events[:-2]:
        assert b"".join(entry.token_bytes for entry in event.logprobs) == event.text.encode()


def test_end_of_turn_has_its_entry_on_the_last_event(tiny_engine):
    tokenizer = tiny_engine.loaded.processor.tokenizer
    eos = min(tiny_engine.eos_token_ids)
    tokens = [*tokenizer.encode("Done."), eos]
    row, events = _recording_row(tiny_engine, SamplingParams(max_new_tokens=50, logprobs=0))
    _feed(row, tokens)
    assert [entry.token_id for e in events for entry in e.logprobs] == tokens
    end = [e for e in events if any(entry.token_id == eos for entry in e.logprobs)][0]
    assert end.text == "" and end.logprobs[-1].token == tokenizer.decode([eos])
    assert events[-1].finish_reason is FinishReason.STOP


def test_held_logprobs_release_by_characters():
    held = HeldLogprobs()
    a, b, c = (TokenLogprob(i, t, t.encode(), -1.0) for i, t in enumerate(["ab", "", "c"]))
    held.add(a, "ab")
    assert held.release("a") == ()  # half of its text
    assert held.release("b") == (a,)
    held.add(b, "")  # text held back by the detokenizer
    assert held.release("") == ()
    held.add(c, "xc")  # the held text arrives with the next token's
    assert held.release("xc") == (b, c)
    held.add(a, "ab")
    assert held.rest() == (a,) and held.rest() == ()


def test_rows_preempted_for_room_report_what_they_report_alone(tiny_model_dir, tiny_engine, monkeypatch):
    """A KV budget of about two rows and small prefill chunks: rows are sent back mid-prompt or
    mid-answer and recompute; their prompt and answer logprobs still equal their logprobs alone."""
    prompts = [_prompt(tiny_engine, f"Request {i}: " + "tell me about the history of bicycles. " * 8) for i in range(5)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    alone = [_run(tiny_engine, (prompt, params))[0] for prompt in prompts]
    per_token = 2 * 2 * 1 * 32 * 4  # keys and values x 2 layers x 1 KV head x 32 dims x float32
    need = max(p.num_tokens for p in prompts) + params.max_new_tokens
    engine = start_engine(
        tiny_model_dir, max_batch_size=8, kv_cache_bytes=(2 * need + 1) * per_token, max_prefill_tokens=48
    )
    preempted = []
    send_back = engine.scheduler._preempt
    monkeypatch.setattr(engine.scheduler, "_preempt", lambda row, plan: (preempted.append(row), send_back(row, plan)))
    try:
        together = _run(engine, *[(prompt, params) for prompt in prompts])
    finally:
        engine.stop()
    assert preempted  # the budget did send rows back
    for one, other in zip(alone, together):
        assert [e.token_id for e in one.logprobs] == [e.token_id for e in other.logprobs]
        assert [e.logprob for e in one.logprobs] == pytest.approx([e.logprob for e in other.logprobs], abs=1e-4)
        assert one.prompt_logprobs is not None and other.prompt_logprobs is not None
        assert len(other.prompt_logprobs) == len(one.prompt_logprobs)
        ours = [e.logprob for e in one.prompt_logprobs[1:] if e is not None]
        theirs = [e.logprob for e in other.prompt_logprobs[1:] if e is not None]
        assert theirs == pytest.approx(ours, abs=1e-4) and len(theirs) == len(one.prompt_logprobs) - 1
