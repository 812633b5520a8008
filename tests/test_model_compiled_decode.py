"""generate(..., compile=True): each decode step is one torch.compile'd graph; same numbers as eager decoding."""

import pytest
import torch

from model import CortexModel, KVCache, batch_generate, generate, tiny_config
from model.compiled_decode import CompiledDecoder
from model.generate import left_pad

VOCAB = 101


@pytest.fixture(scope="module")
def model() -> CortexModel:
    torch.manual_seed(0)
    return CortexModel(tiny_config(VOCAB)).eval()


@torch.no_grad()
def test_each_compiled_step_gives_the_eager_logits_with_left_padding(model):
    prompts = [[5, 17, 42, 8, 9, 3], [7, 2]]
    input_ids, mask = left_pad(prompts, pad_token_id=0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    eager_cache, compiled_cache = KVCache(max_length=20), KVCache(max_length=20)
    first = model(input_ids, attention_mask=mask, position_ids=positions, past_key_values=eager_cache)["logits"][:, -1]
    model(input_ids, attention_mask=mask, position_ids=positions, past_key_values=compiled_cache)
    decoder = CompiledDecoder(model, compiled_cache, mask)
    tokens, next_position = first.argmax(-1), positions[:, -1:] + 1
    for _ in range(5):
        mask = torch.cat((mask, mask.new_ones(2, 1)), dim=1)
        eager = model(tokens[:, None], attention_mask=mask, position_ids=next_position,
                      past_key_values=eager_cache)["logits"][:, -1]
        compiled = decoder.step(tokens, next_position)
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
        tokens, next_position = eager.argmax(-1), next_position + 1
    assert compiled_cache.get_seq_len() == eager_cache.get_seq_len() == 11


def test_generation_with_compile_equals_eager_generation(model):
    prompt = [5, 17, 42, 8]
    assert generate(model, prompt, max_new_tokens=12, compile=True) == generate(model, prompt, max_new_tokens=12)
    prompts = [[5, 17, 42, 8], [9], [3, 3, 1]]
    eager = batch_generate(model, prompts, max_new_tokens=8, pad_token_id=0, stop_token_ids=[7])
    compiled = batch_generate(model, prompts, max_new_tokens=8, pad_token_id=0, stop_token_ids=[7], compile=True)
    assert torch.equal(compiled, eager)
    sampled = [generate(model, prompt, max_new_tokens=10, temperature=0.9, top_p=0.9, compile=compile_,
                        generator=torch.Generator().manual_seed(4)) for compile_ in (False, True)]
    assert sampled[0] == sampled[1]


def test_weight_updates_are_seen_by_the_compiled_step():
    torch.manual_seed(1)
    model = CortexModel(tiny_config(VOCAB)).eval()
    prompt = [5, 17, 42, 8]
    before = generate(model, prompt, max_new_tokens=10, compile=True)
    with torch.no_grad():  # in place, as an optimizer step does
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    after = generate(model, prompt, max_new_tokens=10, compile=True)
    assert after == generate(model, prompt, max_new_tokens=10) and after != before


def test_zero3_shards_and_growing_caches_are_refused(model):
    cache = KVCache()
    with torch.no_grad():
        model(torch.tensor([[1, 2]]), past_key_values=cache)
    with pytest.raises(ValueError, match="fixed-size KVCache"):
        CompiledDecoder(model, cache, None)
    sharded = CortexModel(tiny_config(VOCAB))
    sharded.lm_head.weight.ds_id = 0  # what DeepSpeed ZeRO-3 sets on the parameters it partitions
    with pytest.raises(ValueError, match="ZeRO-3 shards"):
        generate(sharded, [1, 2], max_new_tokens=2, compile=True)
