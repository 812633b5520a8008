"""Autoregressive generation with a fixed-size KV cache: greedy or sampling, stop tokens, streaming, left-padded batches.
Logits: repetition penalty -> suppressed tokens -> temperature -> top-k -> top-p, then argmax or a draw. A stop token is
emitted and ends its row (finished rows continue with pad tokens). The model runs in eval mode while generating."""

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .compiled_decode import CompiledDecoder
from .kv_cache import KVCache


def process_logits(logits: torch.Tensor, *, temperature: float | None = None, top_k: int | None = None,
                   top_p: float | None = None, repetition_penalty: float = 1.0, seen_tokens: torch.Tensor | None = None,
                   suppress_token_ids: Sequence[int] = ()) -> torch.Tensor:
    """logits (B, V) -> processed fp32 logits; seen_tokens (B, V) bool marks the tokens the penalty applies to."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen_tokens is not None:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen_tokens, penalised, logits)
    if suppress_token_ids:
        logits = logits.index_fill(-1, torch.tensor(list(suppress_token_ids), device=logits.device), float("-inf"))
    if not temperature:
        return logits
    logits = logits / temperature
    if top_k:
        kth_largest = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p and top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token once the more likely tokens already cover top_p (the most likely one always stays)
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, sorted_idx, drop_sorted), float("-inf"))
    return logits


def select_tokens(logits: torch.Tensor, temperature: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """Processed logits (B, V) -> token ids (B,): argmax when greedy, else a draw from softmax(logits)."""
    if not temperature:
        return logits.max(dim=-1).indices  # the first maximum, like argmax
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids (B, T), attention_mask (B, T) bool), right-aligned so every row ends at the last column."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generation needs at least one prompt and every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = True
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def _decode(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, pad_token_id: int,
            stop_token_ids: Sequence[int] = (), temperature: float | None = None, top_k: int | None = None,
            top_p: float | None = None, repetition_penalty: float = 1.0, suppress_token_ids: Sequence[int] = (),
            generator: torch.Generator | None = None, compile: bool = False) -> Iterator[torch.Tensor]:
    """Yields the next token of every row (B,) per step."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    device = model.embed_tokens.weight.device  # never quantized (serving/quantize.py)
    input_ids, prompt_mask = left_pad(prompts, pad_token_id, device)
    batch, prompt_len = input_ids.shape
    # Real tokens are numbered from 0 in every row (padding is masked out)
    position_ids = (prompt_mask.cumsum(dim=-1) - 1).clamp(min=0)
    attention_mask = None if bool(prompt_mask.all()) else prompt_mask  # None keeps the fast unmasked attention path
    stop_ids = torch.tensor(list(stop_token_ids), dtype=torch.long, device=device)
    seen_tokens = None
    if repetition_penalty != 1.0:
        seen_tokens = torch.zeros(batch, model.config.vocab_size, dtype=torch.bool, device=device)
        seen_tokens[prompt_mask.nonzero(as_tuple=True)[0], input_ids[prompt_mask]] = True
    cache = KVCache(max_length=prompt_len + max_new_tokens)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)

    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
                       logits_to_keep=1)["logits"][:, -1]
        next_position = position_ids[:, -1:] + 1
        decoder = CompiledDecoder(model, cache, attention_mask) if compile else None
        for step in range(max_new_tokens):
            logits = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                    repetition_penalty=repetition_penalty, seen_tokens=seen_tokens,
                                    suppress_token_ids=suppress_token_ids)
            tokens = select_tokens(logits, temperature, generator).masked_fill(finished, pad_token_id)
            yield tokens
            finished |= torch.isin(tokens, stop_ids)
            if step == max_new_tokens - 1 or bool(finished.all()):
                return
            if seen_tokens is not None:
                seen_tokens[torch.arange(batch, device=device), tokens] = True
            if decoder is not None:
                logits = decoder.step(tokens, next_position)
            else:
                if attention_mask is not None:
                    attention_mask = torch.cat((attention_mask, attention_mask.new_ones(batch, 1)), dim=1)
                logits = model(tokens[:, None], attention_mask=attention_mask, position_ids=next_position,
                               past_key_values=cache)["logits"][:, -1]
            next_position = next_position + 1
    finally:
        model.train(was_training)


def generate_stream(model: nn.Module, prompt_ids: Sequence[int], *, max_new_tokens: int, **sampling) -> Iterator[int]:
    """Yield new token ids one at a time for a single prompt; a stop token is yielded last.
    sampling: stop_token_ids=(), temperature=None (None or 0: greedy), top_k=None, top_p=None, repetition_penalty=1.0,
    suppress_token_ids=(), generator=None, compile=False (True: one torch.compile'd step per token, compiled_decode.py)."""
    for tokens in _decode(model, [prompt_ids], max_new_tokens=max_new_tokens, pad_token_id=0, **sampling):
        yield int(tokens[0])


def generate(model: nn.Module, prompt_ids: Sequence[int], **kwargs) -> list[int]:
    """The new token ids for one prompt (same keyword arguments as generate_stream)."""
    return list(generate_stream(model, prompt_ids, **kwargs))


def batch_generate(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, pad_token_id: int,
                   **sampling) -> torch.Tensor:
    """Completions (B, L <= max_new_tokens) of several prompts at once (left-padded, one KV cache): each row's tokens up
    to and including its stop token, then pad_token_id; sampling as in generate_stream."""
    steps = _decode(model, prompts, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, **sampling)
    return torch.stack(list(steps), dim=1)
