"""model/generate.py: greedy and sampled decoding, stop tokens, streaming and left-padded batches."""

import pytest
import torch

from model import CortexModel, batch_generate, generate, generate_stream, process_logits, tiny_config

VOCAB = 101


@pytest.fixture(scope="module")
def model() -> CortexModel:
    torch.manual_seed(0)
    return CortexModel(tiny_config(VOCAB)).eval()


def greedy_without_cache(model, prompt, steps):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))["logits"][0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_generation_equals_argmax_over_full_forwards(model):
    prompt = [5, 17, 42, 8]
    assert generate(model, prompt, max_new_tokens=12) == greedy_without_cache(model, prompt, 12)


def test_stop_token_is_emitted_and_ends_generation(model):
    prompt = [5, 17, 42, 8]
    expected = greedy_without_cache(model, prompt, 6)
    stop = expected[3]
    out = generate(model, prompt, max_new_tokens=6, stop_token_ids=[stop, 1000])
    assert out == expected[: expected.index(stop) + 1]


def test_streaming_yields_tokens_one_by_one_and_restores_train_mode(model):
    model.train()
    stream = generate_stream(model, [3, 4, 5], max_new_tokens=5)
    first = next(stream)
    assert not model.training  # dropout off while generating
    assert [first, *stream] == greedy_without_cache(model, [3, 4, 5], 5)
    assert model.training
    model.eval()


def test_sampling_is_deterministic_under_a_seeded_generator(model):
    kwargs = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.1)
    first = generate(model, [1, 2, 3], generator=torch.Generator().manual_seed(7), **kwargs)
    again = generate(model, [1, 2, 3], generator=torch.Generator().manual_seed(7), **kwargs)
    other = generate(model, [1, 2, 3], generator=torch.Generator().manual_seed(8), **kwargs)
    assert first == again and first != other


def test_top_k_1_and_tiny_top_p_sample_the_argmax(model):
    greedy = generate(model, [9, 9, 1], max_new_tokens=8)
    gen = torch.Generator().manual_seed(0)
    assert generate(model, [9, 9, 1], max_new_tokens=8, temperature=1.5, top_k=1, generator=gen) == greedy
    assert generate(model, [9, 9, 1], max_new_tokens=8, temperature=1.5, top_p=1e-6, generator=gen) == greedy


def test_batch_generation_with_left_padding_equals_each_prompt_alone(model):
    prompts = [[5, 17, 42, 8, 9, 1], [7], [3, 3, 60]]
    alone = [greedy_without_cache(model, p, 7) for p in prompts]
    stop = alone[2][2]  # make the third row stop early
    out = batch_generate(model, prompts, max_new_tokens=7, pad_token_id=0, stop_token_ids=[stop])
    for row, expected in zip(out.tolist(), alone):
        if stop in expected:
            cut = expected.index(stop) + 1
            expected = expected[:cut] + [0] * (len(row) - cut)
        assert row == expected[: len(row)]
    assert out.shape[1] == 7 or all(stop in r for r in out.tolist())


def test_batch_generation_stops_when_every_row_is_done(model):
    prompts = [[1, 2], [3, 4]]
    firsts = [greedy_without_cache(model, p, 1)[0] for p in prompts]
    out = batch_generate(model, prompts, max_new_tokens=10, pad_token_id=0, stop_token_ids=firsts)
    assert out.tolist() == [[firsts[0]], [firsts[1]]]


def test_process_logits_on_hand_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    seen = torch.tensor([[True, True, False, False]])
    penalised = process_logits(logits, repetition_penalty=2.0, seen_tokens=seen)
    assert penalised.tolist() == [[1.0, -2.0, 0.5, 1.0]]
    suppressed = process_logits(logits, suppress_token_ids=[0])
    assert suppressed[0, 0] == float("-inf") and suppressed[0, 1:].tolist() == [-1.0, 0.5, 1.0]
    top_k = process_logits(logits, temperature=2.0, top_k=2)
    assert top_k.tolist() == [[1.0, float("-inf"), float("-inf"), 0.5]]
    # probabilities ~ [0.57, 0.03, 0.13, 0.21] -> top_p 0.7 keeps tokens 0 and 3 (0.57 < 0.7, then 0.78 covers it)
    top_p = process_logits(logits, temperature=1.0, top_p=0.7)
    assert torch.isfinite(top_p).tolist() == [[True, False, False, True]]


def test_empty_prompt_is_an_error(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [], max_new_tokens=3)
