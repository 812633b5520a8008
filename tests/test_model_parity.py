"""Parity with the reference implementation llm_model 0.6.0 (PyPI project-llm-model), skipped when it is not installed.

The reference's state dict must load strictly into ours and give the same logits (1e-5) and aux loss (1e-6).
"""

import pytest
import torch

from model import CortexModel, KVCache, cortex_2_5_config, tiny_config
from model.rope import RotaryEmbedding

llm_model = pytest.importorskip("llm_model")

from tests.llm_reference import reference_config  # noqa: E402  (needs llm_model)

VOCAB = 100


def model_pair(long_context: bool, seed: int = 0, seq_aux: bool = True):
    """A reference model with random weights and ours loaded strictly from its state dict."""
    config = tiny_config(VOCAB, long_context)
    config.moe_config.seq_aux = seq_aux
    torch.manual_seed(seed)
    reference = llm_model.LlmModel(reference_config(config))
    with torch.no_grad():  # norms start at 1; make them matter
        for name, param in reference.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
    ours = CortexModel(config)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def assert_same_outputs(ref_out, our_out, positions=slice(None)):
    torch.testing.assert_close(our_out["logits"][:, positions], ref_out["logits"][:, positions], atol=1e-5, rtol=0)
    if ref_out["aux_loss"] is None:
        assert our_out["aux_loss"] is None
    else:
        assert abs(our_out["aux_loss"].item() - ref_out["aux_loss"].item()) < 1e-6


def test_same_seed_builds_the_same_state_dict():
    config = tiny_config(VOCAB)
    torch.manual_seed(3)
    reference = llm_model.LlmModel(reference_config(config)).state_dict()
    torch.manual_seed(3)
    ours = CortexModel(config).state_dict()
    assert list(ours) == list(reference)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


@pytest.mark.parametrize("long_context", [False, True])
def test_full_config_keys_and_shapes_match_the_reference(long_context):
    config = cortex_2_5_config(long_context)
    with torch.device("meta"):
        reference = llm_model.LlmModel(reference_config(config))
        ours = CortexModel(config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert len(ours.state_dict()) == 842
    # RoPE frequencies and YaRN scaling of the full config, built on CPU, agree bit for bit
    from llm_model.llm_model import RotaryEmbedding as ReferenceRotaryEmbedding

    ref_rope, our_rope = ReferenceRotaryEmbedding(reference_config(config)), RotaryEmbedding(config)
    assert torch.equal(our_rope.inv_freq, ref_rope.inv_freq)
    assert our_rope.attention_scaling == ref_rope.attention_scaling


@pytest.mark.parametrize("long_context", [False, True])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("seq_aux", [True, False])
def test_logits_and_aux_loss_match_without_and_with_padding(long_context, training, seq_aux):
    reference, ours = model_pair(long_context, seq_aux=seq_aux)
    reference.train(training)
    ours.train(training)
    ids = torch.randint(0, VOCAB, (3, 24))
    right_padded = torch.ones(3, 24, dtype=torch.bool)
    right_padded[0, 17:] = False
    left_padded = torch.ones(3, 24, dtype=torch.bool)
    left_padded[1, :6] = False
    for mask in (None, right_padded, left_padded):
        assert_same_outputs(reference(ids, attention_mask=mask), ours(ids, attention_mask=mask))


@pytest.mark.parametrize("long_context", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_packed_documents_match(long_context, training):
    """Pretraining input: documents packed in a row, positions restarting after each EOS, the additive doc mask."""
    reference, ours = model_pair(long_context, seed=1)
    reference.train(training)
    ours.train(training)
    eos = 2
    ids = torch.randint(3, VOCAB, (2, 20))
    ids[0, [4, 11]] = eos
    ids[1, 13] = eos
    # doc id of token t = number of EOS strictly before t; positions restart right after an EOS
    doc_ids = torch.cat((torch.zeros(2, 1, dtype=torch.long), (ids == eos).long().cumsum(-1)[:, :-1]), dim=1)
    position_ids = torch.stack([
        torch.cat([torch.arange(int((doc_ids[b] == d).sum())) for d in doc_ids[b].unique()]) for b in range(2)
    ])
    blocked = doc_ids[:, :, None] > doc_ids[:, None, :]
    doc_mask = torch.zeros(2, 1, 20, 20).masked_fill(blocked[:, None], torch.finfo(torch.float32).min)
    ref_out = reference(ids, doc_boundary_mask=doc_mask, position_ids=position_ids)
    assert_same_outputs(ref_out, ours(ids, doc_boundary_mask=doc_mask, position_ids=position_ids))
    assert_same_outputs(ref_out, ours(ids, doc_boundary_mask=~blocked[:, None], position_ids=position_ids))


@pytest.mark.parametrize("long_context", [False, True])
@pytest.mark.parametrize("max_length", [None, 40])
def test_kv_cache_decoding_matches_the_reference(long_context, max_length):
    reference, ours = model_pair(long_context, seed=2)
    reference.eval()
    ours.eval()
    ids = torch.randint(0, VOCAB, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, :4] = False  # left padding, the reference's way: full-length mask, default positions
    ref_cache, our_cache = llm_model.KVCache(), KVCache(max_length=max_length)
    ref_prefill = reference(ids[:, :12], attention_mask=mask[:, :12], past_key_values=ref_cache, use_cache=True)
    assert_same_outputs(ref_prefill, ours(ids[:, :12], attention_mask=mask[:, :12], past_key_values=our_cache))
    for t in range(12, 30):
        step_mask = mask[:, : t + 1]
        ref_step = reference(ids[:, t : t + 1], attention_mask=step_mask, past_key_values=ref_cache, use_cache=True)
        assert_same_outputs(ref_step, ours(ids[:, t : t + 1], attention_mask=step_mask, past_key_values=our_cache))


def test_logits_to_keep_matches():
    reference, ours = model_pair(False)
    reference.eval()
    ours.eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    assert_same_outputs(reference(ids, logits_to_keep=3), ours(ids, logits_to_keep=3))


@pytest.mark.parametrize("training", [False, True])
def test_whole_model_bf16_matches_the_reference_with_fp32_rope_frequencies(training):
    """The DeepSpeed-style whole-model bf16 cast: identical numerics (norm cast order, mask, router, fp32 weighting)
    once the reference's inv_freq, which its cast rounds to bf16, is given back its fp32 values."""
    reference, ours = model_pair(True)
    reference.to(torch.bfloat16).train(training)
    ours.to(torch.bfloat16).train(training)
    reference.rotary_emb.inv_freq = ours.rotary_emb.inv_freq.clone()
    ids = torch.randint(0, VOCAB, (3, 24))
    mask = torch.ones(3, 24, dtype=torch.bool)
    mask[1, :5] = False
    for attention_mask in (None, mask):
        ref_out, our_out = reference(ids, attention_mask=attention_mask), ours(ids, attention_mask=attention_mask)
        torch.testing.assert_close(our_out["logits"], ref_out["logits"], atol=1e-2, rtol=0)
        if training:
            assert abs(our_out["aux_loss"].item() - ref_out["aux_loss"].item()) < 1e-5
