"""The OpenAI (legacy) completions API, /v1/completions, and the tokenizer endpoints vLLM serves (/tokenizer_info,
/tokenize, /detokenize): what lm-evaluation-harness's `local-completions` model needs to score a running server.

Raw text in, raw text out: no chat template. `prompt` is a string, a list of token ids, or a list of either (one
choice each); `max_tokens` 0 or more (default 16, as OpenAI); `echo` puts the prompt in front of the text;
`logprobs: N` (0-20) gives each token's log-probability and the N most likely tokens (OpenAI's format: tokens,
token_logprobs, top_logprobs, text_offset), for the prompt's tokens too with `echo` (the first is null: nothing
predicts it). The log-probabilities are the model's own (fp32 log-softmax of its logits, before temperature, top-p
and penalties). Sampling fields as on /v1/chat/completions (serving/openai_api.py), `stop` included.
lm-eval asks for a loglikelihood as: prompt = context + continuation ids, echo, logprobs 1, max_tokens 1.
"""

import queue
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from serving.chat import EVENT_POLL_S, RequestError, check_bool, check_int, check_text, json_type
from serving.engine import Finished, GenerationRequest, PromptLogprobs, SamplingParams, TokenEvent, TokenLogprobs
from serving.openai_api import StopMatcher, parse_sampling
from trainer.tokenizer import Tokenizer

MAX_LOGPROBS = 20
MAX_PROMPTS = 64
DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class CompletionRequest:
    prompts: list[tuple[list[int], str]]  # (token ids, text to echo) per choice
    sampling: SamplingParams
    echo: bool
    logprobs: int | None


def parse_completion_request(body, tokenizer: Tokenizer, max_context: int) -> CompletionRequest:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {json_type(body)}")
    if "prompt" not in body:
        raise RequestError("'prompt' is missing: send text, a list of token ids, or a list of either", param="prompt")
    for name in ("suffix", "logit_bias"):
        if body.get(name) is not None:
            raise RequestError(f"'{name}' is not supported by this server", param=name)
    for name in ("n", "best_of"):
        if body.get(name) not in (None, 1):
            raise RequestError(f"only {name}=1 is supported", param=name)
    if check_bool(body.get("stream"), "stream", default=False):
        raise RequestError("'stream' is not supported on /v1/completions (it is on /v1/chat/completions)",
                           param="stream")
    logprobs = None if body.get("logprobs") is None else check_int(body["logprobs"], "logprobs", 0, MAX_LOGPROBS)
    echo = check_bool(body.get("echo"), "echo", default=False)
    sampling = parse_sampling({"max_tokens": DEFAULT_MAX_TOKENS, **body}, max_context, min_tokens=0)
    prompts = [_prompt(p, f"prompt[{i}]" if _is_batch(body["prompt"]) else "prompt", tokenizer, max_context)
               for i, p in enumerate(body["prompt"] if _is_batch(body["prompt"]) else [body["prompt"]])]
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise RequestError(f"'prompt' must hold 1 to {MAX_PROMPTS} prompts, got {len(prompts)}", param="prompt")
    return CompletionRequest(prompts, sampling, echo, logprobs)


def _is_batch(prompt) -> bool:
    return isinstance(prompt, list) and any(isinstance(p, (str, list)) for p in prompt)


def _prompt(prompt, name: str, tokenizer: Tokenizer, max_context: int) -> tuple[list[int], str]:
    if isinstance(prompt, str):
        ids, text = tokenizer.encode(check_text(prompt, name)), prompt
    elif isinstance(prompt, list):
        for i, token in enumerate(prompt):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < tokenizer.vocab_size:
                raise RequestError(f"'{name}[{i}]' must be a token id from 0 to {tokenizer.vocab_size - 1}, got "
                                   f"{token!r}", param=name)
        ids, text = list(prompt), tokenizer.decode(prompt)
    else:
        raise RequestError(f"'{name}' must be text or a list of token ids, got {json_type(prompt)}", param=name)
    if not ids:
        raise RequestError(f"'{name}' is empty: send at least one token", param=name)
    if len(ids) >= max_context:
        raise RequestError(f"'{name}' has {len(ids)} tokens; the context holds {max_context}, so at most "
                           f"{max_context - 1} fit", param=name)
    return ids, text


def generation_requests(request: CompletionRequest, client_gone) -> list[GenerationRequest]:
    return [GenerationRequest(ids, request.sampling, thinking=False, client_gone=client_gone,
                              logprobs=request.logprobs, prompt_logprobs=request.echo and request.logprobs is not None)
            for ids, _ in request.prompts]


# --- the reply -----------------------------------------------------------------------------------------------------


class _Logprobs:
    """The OpenAI completions logprobs object, built token by token."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        self.previous: int | None = None

    def _text(self, token: int) -> str:
        """The token's text as it reads after the previous token (a lone token may decode without its leading space)."""
        if self.previous is None:
            return self.tokenizer.decode([token])
        return self.tokenizer.decode([self.previous, token])[len(self.tokenizer.decode([self.previous])):]

    def add(self, token: int, scored: TokenLogprobs | None, offset: int):
        self.tokens.append(self._text(token))
        self.token_logprobs.append(None if scored is None else scored.logprob)
        if scored is None:
            self.top_logprobs.append(None)
        else:
            top: dict[str, float] = {}
            for alternative, logprob in scored.top:  # most likely first: tokens of the same text keep the likeliest
                top.setdefault(self._text(alternative), logprob)
            self.top_logprobs.append(top)
        self.text_offset.append(offset)
        self.previous = token

    def body(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


@dataclass(frozen=True)
class Choice:
    text: str
    logprobs: dict | None
    finish_reason: str  # "stop", "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of the prompt's, reused (Finished.cached_tokens)


def collect_choice(generation: GenerationRequest, echo_text: str, request: CompletionRequest, tokenizer: Tokenizer,
                   check_client: Callable[[], None] = lambda: None) -> Choice:
    """Reads a submitted generation to its end: the text (after the echoed prompt), cut before a stop string, and its
    logprobs. A stop string ends the generation at once. check_client: as for stream_reply."""
    logprobs = _Logprobs(tokenizer) if request.logprobs is not None else None
    text = echo_text if request.echo else ""
    if logprobs is not None and request.echo:
        offset_decoder = tokenizer.stream_decoder()
        prompt_scores = _next_event(generation, check_client)
        if not isinstance(prompt_scores, PromptLogprobs):  # the generation failed before its prefill
            return Choice(text, None, prompt_scores.reason, len(generation.prompt_ids), 0)
        offset = 0
        for token, scored in zip(generation.prompt_ids, prompt_scores.entries):
            logprobs.add(token, scored, offset)
            offset += len(offset_decoder.push(token))
    decoder, stops = tokenizer.stream_decoder(skip_special_tokens=True), StopMatcher(request.sampling.stop)
    generated = cached = 0
    try:
        while True:
            event = _next_event(generation, check_client)
            if isinstance(event, Finished):
                text += stops.push(decoder.flush())
                text += "" if stops.stopped else stops.flush()  # held back, but no stop string came
                reason = "stop" if stops.stopped else event.reason
                cached = event.cached_tokens
                break
            generated += 1
            if logprobs is not None:
                logprobs.add(event.token_id, event.logprobs, len(text) + len(stops.held))
            text += stops.push(decoder.push(event.token_id))
            if stops.stopped:
                generation.cancel("stop")
                reason = "stop"
                break
    finally:
        generation.cancel()  # a caller that stops reading (error, disconnect) frees the slot
    return Choice(text, None if logprobs is None else logprobs.body(), reason, len(generation.prompt_ids), generated,
                  cached)


def _next_event(generation: GenerationRequest,
                check_client: Callable[[], None]) -> TokenEvent | PromptLogprobs | Finished:
    while True:
        check_client()
        try:
            return generation.events.get(timeout=EVENT_POLL_S)
        except queue.Empty:  # still queued, or the engine busy with other requests
            continue


def completion_body(choices: list[Choice], model_name: str) -> dict:
    prompt_tokens = sum(c.prompt_tokens for c in choices)
    completion_tokens = sum(c.completion_tokens for c in choices)
    cached_tokens = sum(c.cached_tokens for c in choices)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": i, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
                        for i, c in enumerate(choices)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": cached_tokens}}}


# --- tokenizer endpoints (vLLM's) ----------------------------------------------------------------------------------


def tokenizer_info(tokenizer: Tokenizer, max_context: int) -> dict:
    hf = tokenizer.hf
    return {"tokenizer_class": type(hf).__name__, "eos_token": hf.convert_ids_to_tokens(tokenizer.eos_id),
            "bos_token": hf.bos_token, "pad_token": hf.convert_ids_to_tokens(tokenizer.pad_id),
            "model_max_length": max_context, "vocab_size": tokenizer.vocab_size}


def tokenize(body, tokenizer: Tokenizer, max_context: int) -> dict:
    """{"prompt": text} -> its token ids (no special tokens are added: Cortex has no BOS)."""
    if not isinstance(body, dict) or "prompt" not in body:
        raise RequestError("send {\"prompt\": text}", param="prompt")
    check_bool(body.get("add_special_tokens"), "add_special_tokens", default=False)
    tokens = tokenizer.encode(check_text(body["prompt"], "prompt"))
    return {"tokens": tokens, "count": len(tokens), "max_model_len": max_context}


def detokenize(body, tokenizer: Tokenizer) -> dict:
    """{"tokens": [ids]} -> {"prompt": text}."""
    if not isinstance(body, dict) or "tokens" not in body:
        raise RequestError("send {\"tokens\": [token ids]}", param="tokens")
    tokens = body["tokens"]
    if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tokenizer.vocab_size for t in tokens):
        raise RequestError(f"'tokens' must be a list of token ids from 0 to {tokenizer.vocab_size - 1}", param="tokens")
    return {"prompt": tokenizer.decode(tokens)}
