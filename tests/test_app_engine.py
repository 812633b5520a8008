"""serving/engine.py and serving/sampling.py: continuous batching over a slot KV cache, per-request sampling, the
thinking budget, cancellation, the bounded queue."""

import threading

import pytest
import torch

from model import CortexModel, generate, process_logits, tiny_config
from serving.engine import (ANSWER, THINK_BUDGET_CLOSINGS, THINKING, Engine, Finished, GenerationRequest,
                            QueueFullError, SamplingParams, TokenEvent, closing_language)
from serving.sampling import next_token_probs, sample_tokens
from trainer.tokenizer import tiny_tokenizer

from test_app_server import single_torch_thread  # noqa: F401  (an autouse fixture)

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return CortexModel(tiny_config(tokenizer.vocab_size, long_context=True)).eval()


@pytest.fixture(params=[False, True], ids=["eager", "compiled"])
def engine(request, model, tokenizer):
    # compiled: each decode step is one torch.compile'd graph (model/compiled_decode.py); the same tokens are expected
    engine = Engine(model, tokenizer, slots=3, max_queue=16, seed=0, compile=request.param).start()
    yield engine
    engine.stop()


def collect(request: GenerationRequest, timeout: float = 30.0) -> tuple[list[TokenEvent], Finished]:
    events = []
    while True:
        event = request.events.get(timeout=timeout)
        if isinstance(event, Finished):
            return events, event
        events.append(event)


def test_batched_greedy_decoding_equals_decoding_each_prompt_alone(engine, model, tokenizer):
    # 7 prompts of different lengths through 3 slots: requests join and leave the batch between steps
    prompts = [[(7 * i + j) % 500 + 20 for j in range(n)] for i, n in enumerate((3, 17, 9, 30, 4, 1, 12))]
    max_new = [40, 25, 33, 40, 8, 40, 19]
    requests = [engine.submit(GenerationRequest(p, SamplingParams(temperature=0.0, max_new_tokens=m), thinking=False))
                for p, m in zip(prompts, max_new)]
    for prompt, limit, request in zip(prompts, max_new, requests):
        events, finished = collect(request)
        expected = generate(model, prompt, max_new_tokens=limit, stop_token_ids=[tokenizer.eos_id])
        assert [e.token_id for e in events] == expected
        assert finished.completion_tokens == len(expected) and finished.prompt_tokens == len(prompt)
        assert finished.reason == ("stop" if expected[-1] == tokenizer.eos_id else "length")
        assert all(e.phase == ANSWER for e in events)


def test_sampled_neighbours_do_not_change_a_greedy_request(engine):
    prompt = [40, 41, 42, 43]
    alone, _ = collect(engine.submit(GenerationRequest(prompt, SamplingParams(temperature=0.0, max_new_tokens=30), False)))
    noisy = [engine.submit(GenerationRequest([9, 8, 7], SamplingParams(temperature=1.5, top_p=0.9), False))
             for _ in range(2)]
    greedy = engine.submit(GenerationRequest(prompt, SamplingParams(temperature=0.0, max_new_tokens=30), False))
    assert [e.token_id for e in collect(greedy)[0]] == [e.token_id for e in alone]
    for request in noisy:
        collect(request)


def test_generation_stops_at_the_end_of_the_context(engine):
    prompt = list(range(100, 100 + engine.max_context - 5))
    events, finished = collect(engine.submit(GenerationRequest(prompt, SamplingParams(temperature=1.0), False)))
    assert finished.reason in ("length", "stop") and len(prompt) + len(events) <= engine.max_context
    with pytest.raises(ValueError, match="context holds"):
        engine.submit(GenerationRequest(list(range(engine.max_context)), GREEDY, False))


@pytest.mark.parametrize("budget", [0, 1, 5, 42, 43, 52, 90])
def test_no_reply_thinks_longer_than_its_budget(engine, tokenizer, budget):
    """Thinking tokens are counted exactly; when the budget is spent the closing sentence (when it fits) and </think>
    are forced, then the answer follows (budget 0: </think> is the first token). The sentence's language is the
    thought's when the room left first reached the longest closing."""
    assert sorted(len(ids) for ids in engine.closing_ids.values()) == [42, 51]  # the budgets above straddle both
    requests = [engine.submit(GenerationRequest([30 + i, 31, 32], SamplingParams(temperature=1.0, max_new_tokens=budget + 80),
                                                thinking=True, think_budget=budget)) for i in range(6)]
    forced_seen = 0
    for request in requests:
        events, finished = collect(request)
        ids = [e.token_id for e in events]
        thinking = [e.token_id for e in events if e.phase == THINKING and e.token_id != tokenizer.think_end_id]
        assert len(thinking) <= budget and finished.thinking_tokens == len(thinking)
        if finished.reason == "stop" and tokenizer.think_end_id not in ids:
            continue  # ended with </s> while thinking
        end = ids.index(tokenizer.think_end_id)
        assert all(e.phase == THINKING for e in events[: end + 1]) and all(e.phase == ANSWER for e in events[end + 1:])
        if len(thinking) == budget:  # the budget closed the thought
            forced_seen += 1
            judged = thinking[: max(0, budget - engine.longest_closing)]
            closing = engine.closing_ids[closing_language(tokenizer.decode(judged))]
            expected_tail = closing if budget > len(closing) else []
            assert ids[end - len(expected_tail): end] == expected_tail
    assert forced_seen >= 1


def test_the_budget_closing_follows_the_language_of_the_thought(model, tokenizer):
    assert closing_language("The user asks for a sum, so I add the numbers.") == "en"
    assert closing_language("用户想知道两个数的和，我先把它们相加。") == "zh"
    assert closing_language("用户问 what 是什么意思") == "zh" and closing_language("") == "en"
    engine = Engine(model, tokenizer, slots=1)  # not started: only its closings are looked at
    think_end = [tokenizer.think_end_id]
    for language, text in THINK_BUDGET_CLOSINGS.items():
        assert tokenizer.decode(engine.closing_ids[language]) == text  # the tokens say exactly the sentence
    english, chinese = (tokenizer.encode(t) for t in ("Let me think about the question.", "让我想想这个问题。"))
    assert engine.closing_for(90, english) == engine.closing_ids["en"] + think_end
    assert engine.closing_for(90, chinese) == engine.closing_ids["zh"] + think_end
    assert engine.closing_for(45, chinese) == think_end  # too small for the Chinese sentence (51 tokens)


def test_a_cancelled_request_frees_its_slot_for_a_waiting_one(model, tokenizer):
    engine = Engine(model, tokenizer, slots=1, max_queue=1, seed=0).start()
    try:
        running = engine.submit(GenerationRequest([5, 6, 7], SamplingParams(temperature=1.0), False))
        running.events.get(timeout=30)  # it holds the only slot now
        waiting = engine.submit(GenerationRequest([5, 6, 7], SamplingParams(temperature=1.0, max_new_tokens=3), False))
        with pytest.raises(QueueFullError, match="busy"):
            engine.submit(GenerationRequest([1], GREEDY, False))
        running.cancel()
        events, finished = collect(running)
        assert finished.reason == "cancelled"
        assert collect(waiting)[1].reason in ("length", "stop")
        stats = engine.stats()
        assert stats["cancelled_total"] == 1 and stats["rejected_total"] == 1 and stats["active"] == 0
    finally:
        engine.stop()


def test_a_failing_step_ends_the_requests_in_flight_and_the_engine_keeps_serving(model, tokenizer):
    engine = Engine(model, tokenizer, slots=2, seed=0).start()
    try:
        bad = engine.submit(GenerationRequest([tokenizer.vocab_size + 10_000], GREEDY, False))  # id outside the table
        assert collect(bad)[1].reason == "error"
        good = engine.submit(GenerationRequest([5, 6], SamplingParams(temperature=0.0, max_new_tokens=4), False))
        assert collect(good)[1].reason in ("length", "stop") and engine.alive
        assert engine.stats()["failed_total"] == 1
    finally:
        engine.stop()


def test_a_client_leaving_between_admission_and_prefill_fails_no_other_request(model, tokenizer):
    engine = Engine(model, tokenizer, slots=2, seed=0)
    running = engine.submit(GenerationRequest([5, 6], SamplingParams(temperature=0.0, max_new_tokens=30), False))
    engine.start()
    try:
        running.events.get(timeout=30)
        answers = iter([False])  # still there when admitted, gone when asked again before its prefill
        leaving = engine.submit(GenerationRequest([7, 8], GREEDY, False, client_gone=lambda: next(answers, True)))
        assert collect(leaving)[1].reason == "cancelled"
        assert collect(running)[1].reason in ("length", "stop") and engine.stats()["failed_total"] == 0
    finally:
        engine.stop()


def test_run_beside_decodes_in_the_calling_thread_and_returns_the_clients_result(model, tokenizer):
    engine = Engine(model, tokenizer, slots=2, seed=0)
    decoding_threads = set()
    hook = model.register_forward_hook(lambda *_: decoding_threads.add(threading.get_ident()))
    try:
        request = engine.submit(GenerationRequest([5, 6], SamplingParams(temperature=0.0, max_new_tokens=4), False))
        events, finished = engine.run_beside(lambda: collect(request))
        assert len(events) == finished.completion_tokens >= 1 and decoding_threads == {threading.get_ident()}
        assert not engine.alive
        with pytest.raises(RuntimeError, match="the engine is stopped"):  # run_beside stopped it
            engine.submit(GenerationRequest([5], GREEDY, False))

        failing = Engine(model, tokenizer, slots=1, seed=0)
        with pytest.raises(ZeroDivisionError):  # the client's error, raised in the decoding thread
            failing.run_beside(lambda: 1 / 0)
        assert not failing.alive
    finally:
        hook.remove()


def test_requests_from_many_threads(engine):
    results = []

    def client(i):
        results.append(collect(engine.submit(GenerationRequest([i + 3, 4], SamplingParams(max_new_tokens=10), False))))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 8 and all(f.completion_tokens >= 1 for _, f in results)
    stats = engine.stats()
    assert stats["tokens_total"] >= 8 and stats["ttft_ms_p50"] is not None and stats["queued"] == 0


def greedy_ids(request: GenerationRequest) -> tuple[list[int], Finished]:
    events, finished = collect(request)
    return [e.token_id for e in events], finished


def assert_the_models_own_greedy_reply(model, tokenizer, prompt: list[int], events: list[TokenEvent]):
    """The reply's tokens are model.generate's, their log-probabilities those of one forward over prompt + reply."""
    tokens = [e.token_id for e in events]
    assert tokens == generate(model, prompt, max_new_tokens=len(tokens), stop_token_ids=[tokenizer.eos_id])
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))["logits"][0, len(prompt) - 1:-1]
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
    assert torch.allclose(torch.tensor([e.logprobs.logprob for e in events]), expected, atol=1e-4)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_freed_slot_keeps_its_conversation_for_the_next_turn(model, tokenizer, compile):
    # Prefix reuse. A finishes first, and B, still decoding, moves from slot 1 into slot 0 (their caches trade places:
    # the batch stays one row); then each conversation's next turn has its cache brought into the lowest free slot,
    # prefills only its new tokens, and decodes exactly what a fresh prefill of the whole prompt gives.
    engine = Engine(model, tokenizer, slots=3, max_queue=4, seed=0, compile=compile)
    prompt_a = [(5 * j) % 400 + 30 for j in range(90)]
    prompt_b = [(11 * j) % 400 + 30 for j in range(100)]
    a = engine.submit(GenerationRequest(prompt_a, SamplingParams(temperature=0.0, max_new_tokens=3), False))
    b = engine.submit(GenerationRequest(prompt_b, SamplingParams(temperature=0.0, max_new_tokens=70), False))
    engine.start()  # both admitted together: A in slot 0, B in slot 1
    try:
        (reply_a, finished_a), (reply_b, finished_b) = greedy_ids(a), greedy_ids(b)
        assert finished_a.cached_tokens == finished_b.cached_tokens == 0
        assert engine.kept[1] == [*prompt_a, *reply_a][:-1]  # the last token was emitted, never fed
        assert engine.kept[0] == [*prompt_b, *reply_b][:-1]
        kept_a = engine.kept[1]
        for prompt, reply in ((prompt_b, reply_b), (prompt_a, reply_a)):
            follow_up = [*prompt, *reply, 7, 8, 9, 10]
            request = engine.submit(GenerationRequest(follow_up, SamplingParams(temperature=0.0, max_new_tokens=12),
                                                      False, logprobs=0))
            events, finished = collect(request)
            assert finished.cached_tokens == len(prompt) + len(reply) - 1
            assert engine.kept[0][:len(follow_up)] == follow_up  # in the lowest slot: the batch stays one row
            if prompt is prompt_b:
                assert engine.kept[1] == kept_a  # still kept
            assert_the_models_own_greedy_reply(model, tokenizer, follow_up, events)
        stats = engine.stats()
        assert stats["cached_prompt_tokens_total"] == 90 + 3 - 1 + 100 + 70 - 1
        assert stats["prompt_tokens_total"] == 90 + 100 + 90 + 3 + 4 + 100 + 70 + 4

        # prompt log-probabilities need the whole prompt's logits: prefilled whole; with reuse off, nothing is reused
        scored = engine.submit(GenerationRequest(follow_up, SamplingParams(temperature=0.0, max_new_tokens=1), False,
                                                 logprobs=0, prompt_logprobs=True))
        assert collect(scored)[1].cached_tokens == 0
        engine.reuse_prefixes = False
        assert greedy_ids(engine.submit(GenerationRequest(follow_up, GREEDY, False)))[1].cached_tokens == 0
    finally:
        engine.stop()


def test_a_reply_in_a_higher_slot_moves_down_when_a_lower_slot_frees(model, tokenizer):
    # else the free slot rides along, masked, in every step: two rows, twice a CPU step
    engine = Engine(model, tokenizer, slots=3, seed=0)
    calls = []  # (rows, tokens) of each forward
    hook = model.register_forward_hook(lambda module, args, kwargs, out: calls.append(tuple(args[0].shape)),
                                       with_kwargs=True)
    short = engine.submit(GenerationRequest([5, 6, 7], SamplingParams(temperature=0.0, max_new_tokens=3), False))
    prompt = [8, 9, 10, 11]
    long = engine.submit(GenerationRequest(prompt, SamplingParams(temperature=0.0, max_new_tokens=30), False,
                                           logprobs=0))
    engine.start()
    try:
        collect(short)
        events, _ = collect(long)
    finally:
        engine.stop()
        hook.remove()
    steps = [shape[0] for shape in calls if shape[1] == 1]
    assert steps[:2] == [2, 2] and steps[-1] == 1 and steps.count(2) <= 3  # one row once the short one ended
    assert len(events) == 30
    assert_the_models_own_greedy_reply(model, tokenizer, prompt, events)
    assert engine.kept[1][:3] == [5, 6, 7] and len(engine.kept[1]) == 5  # the short one's: still kept


def test_a_free_slot_holding_the_prompts_start_trades_places_with_the_lowest_free_slot(model, tokenizer):
    # the request stays in the lowest free slot (a higher one would widen the batch), and both caches stay kept
    engine = Engine(model, tokenizer, slots=2, seed=0)
    engine.kept[0], engine.kept[1] = list(range(100, 110)), list(range(40, 110))
    engine.cache.keys[-1][0, :, :10], engine.cache.keys[-1][1, :, :70] = 1.0, 2.0
    assert engine._free_slot_for(GenerationRequest([*range(40, 110), 3], GREEDY, False)) == (0, 70)
    assert engine.kept[0] == list(range(40, 110)) and engine.kept[1] == list(range(100, 110))
    assert bool((engine.cache.keys[-1][0, :, :70] == 2.0).all() and (engine.cache.keys[-1][1, :, :10] == 1.0).all())
    assert engine._free_slot_for(GenerationRequest([*range(40, 110), 3], GREEDY, False, logprobs=0,
                                                   prompt_logprobs=True)) == (0, 0)


def test_a_running_requests_prompt_start_is_copied_for_a_request_sharing_it(model, tokenizer):
    # e.g. the same long system prompt: the second request copies the first one's positions while it decodes
    engine = Engine(model, tokenizer, slots=3, seed=0)
    shared = [(7 * j) % 300 + 40 for j in range(80)]
    first = engine.submit(GenerationRequest([*shared, 5, 6], SamplingParams(temperature=0.0, max_new_tokens=40), False))
    engine.start()
    try:
        first.events.get(timeout=30)  # prefilled: slot 0 holds its prompt
        second_prompt = [*shared, 9, 10, 11]
        second = engine.submit(GenerationRequest(second_prompt, SamplingParams(temperature=0.0, max_new_tokens=10),
                                                 False, logprobs=0))
        events, finished = collect(second)
        assert finished.cached_tokens == len(shared) and engine.kept[1][:len(second_prompt)] == second_prompt
        assert_the_models_own_greedy_reply(model, tokenizer, second_prompt, events)
        collect(first)
    finally:
        engine.stop()


@pytest.mark.parametrize("scale", [0.5, 8.0])  # flat logits (full sort) and peaked ones (nucleus within the top 64)
@pytest.mark.parametrize("top_p", [[0.9, 1.0, 0.5, 0.0, 0.99, 0.3], [0.9, 0.95, 0.5, 0.2, 0.99, 0.3], [1.0] * 6])
def test_per_row_sampling_has_the_distribution_of_process_logits(scale, top_p):
    torch.manual_seed(0)
    logits = torch.randn(6, 500) * scale
    temperature = torch.tensor([0.5, 1.0, 1.3, 0.8, 2.0, 1.0])
    top_p = torch.tensor(top_p)
    probs = next_token_probs(logits, temperature, top_p)
    for row in range(len(logits)):
        processed = process_logits(logits[row:row + 1], temperature=float(temperature[row]), top_p=float(top_p[row]))
        assert torch.allclose(probs[row], processed.softmax(dim=-1)[0], atol=1e-6)


def test_sampled_tokens_follow_their_distribution_and_greedy_rows_take_the_argmax():
    torch.manual_seed(1)
    logits = torch.randn(3, 40) * 2
    temperature, top_p = torch.tensor([0.0, 1.0, 0.7]), torch.tensor([1.0, 0.8, 1.0])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_tokens(logits, temperature, top_p, torch.rand(3, generator=generator))
                         for _ in range(4000)])
    assert (draws[:, 0] == logits[0].argmax()).all()
    probs = next_token_probs(logits[1:], temperature[1:], top_p[1:])
    for row in (1, 2):  # a nucleus drawn from the top candidates, and a full distribution
        frequency = torch.bincount(draws[:, row], minlength=40).float() / len(draws)
        assert (frequency[probs[row - 1] == 0] == 0).all()  # nothing outside the nucleus
        assert (frequency - probs[row - 1]).abs().max() < 0.03
