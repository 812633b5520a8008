"""The OpenAI chat completions API: request parsing and response shapes for /v1/chat/completions and /v1/models.

Thinking comes back as `reasoning_content`, the answer as `content` (message or stream delta), and
`usage.completion_tokens_details.reasoning_tokens` counts the thinking, `usage.prompt_tokens_details.cached_tokens` the
prompt's tokens not prefilled again (prefix reuse, serving/engine.py). Extra request fields (the openai client's
`extra_body`): `thinking` (bool; default: the newest user message's " /think" or " /no think" switch, else on) and
`think_budget` (thinking tokens, or null for none).

Sampling fields as OpenAI means them: `top_p: 0` is greedy; `seed` gives the request its own generator (same seed
and request, same reply, whatever else is in the batch); `presence_penalty`/`frequency_penalty` in [-2, 2] count the
reply's tokens; `stop` (a string or up to 4) ends the answer before the first stop string (thinking is not cut). A
trailing assistant message is a prefill that the model continues (the reply holds only the continuation).
"""

import dataclasses
import time
import uuid
from collections.abc import Iterator

from serving.chat import (ChatRequest, ReplyPiece, RequestError, check_bool, check_int, check_messages, check_number,
                          check_text, json_type, prefill_thinking)
from serving.engine import Finished, GenerationRequest, SamplingParams
from trainer.tokenizer import split_think_switch

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 4
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes
UNSUPPORTED_FIELDS = ("tools", "functions", "tool_choice", "function_call", "logit_bias", "audio", "prediction")


def check_model(body, model_name: str):
    """A request naming another model than the one served: 404 model_not_found (no model named: the served one)."""
    if isinstance(body, dict) and body.get("model") is not None and check_text(body["model"], "model") != model_name:
        raise RequestError(f"the model '{body['model']}' does not exist; this server serves '{model_name}' "
                           f"(GET /v1/models)", status=404, param="model", code="model_not_found")


def parse_sampling(body: dict, max_context: int, min_tokens: int = 1) -> SamplingParams:
    """temperature, top_p, max_tokens (or max_completion_tokens), seed, presence/frequency penalties, stop."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    temperature = check_number(body.get("temperature"), "temperature", 0.0, 2.0, 1.0)
    top_p = check_number(body.get("top_p"), "top_p", 0.0, 1.0, 1.0)
    return SamplingParams(
        temperature=0.0 if top_p == 0 else temperature,  # OpenAI clients mean top_p 0 as (near-)greedy
        top_p=top_p,
        max_new_tokens=None if max_tokens is None else check_int(max_tokens, "max_tokens", min_tokens, max_context),
        seed=None if body.get("seed") is None else check_int(body["seed"], "seed", *SEED_RANGE),
        presence_penalty=check_number(body.get("presence_penalty"), "presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=check_number(body.get("frequency_penalty"), "frequency_penalty", -2.0, 2.0, 0.0),
        stop=_stop_strings(body.get("stop")))


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS:
        got = f"{len(stops)} strings" if isinstance(stops, list) else json_type(stop)
        raise RequestError(f"'stop' must be a string or an array of at most {MAX_STOP_STRINGS} strings, got {got}",
                           param="stop")
    for i, text in enumerate(stops):
        if check_text(text, f"stop[{i}]") == "":
            raise RequestError(f"'stop[{i}]' is empty: a stop string needs at least one character", param="stop")
    return tuple(stops)


def parse_openai_request(body, max_context: int) -> tuple[ChatRequest, bool, bool]:
    """(chat request, stream, include usage in the stream)."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {json_type(body)}")
    if "messages" not in body:
        raise RequestError("'messages' is missing", param="messages")
    for name in UNSUPPORTED_FIELDS:
        if body.get(name) is not None:
            raise RequestError(f"'{name}' is not supported by this server", param=name)
    if body.get("n") not in (None, 1):
        raise RequestError("only n=1 is supported", param="n")
    if body.get("logprobs"):
        raise RequestError("'logprobs' is not supported on chat completions (it is on /v1/completions)",
                           param="logprobs")
    messages = check_messages(_plain_messages(body["messages"]), "messages", prefill=True)

    newest_user = next(m for m in reversed(messages) if m["role"] == "user")
    switch = split_think_switch(newest_user["content"])[1]  # " /think", " /no think" or None
    thinking = check_bool(body.get("thinking"), "thinking", default=True if switch is None else switch)
    if prefill_thinking(messages) is not None:  # a prefill decides: open thinking or an answer under way
        thinking = prefill_thinking(messages)
    think_budget = None
    if body.get("think_budget") is not None:
        think_budget = check_int(body["think_budget"], "think_budget", 0, max_context)
    sampling = parse_sampling(body, max_context)
    stream = check_bool(body.get("stream"), "stream", default=False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(f"'stream_options' must be an object, got {json_type(options)}", param="stream_options")
    include_usage = check_bool(options.get("include_usage"), "stream_options.include_usage", default=False)
    return ChatRequest(messages, thinking, think_budget if thinking else None, sampling), stream, include_usage


def _plain_messages(messages) -> list:
    """OpenAI messages -> {role, content[, think]}: 'developer' is a system message, content parts are joined text,
    an assistant's reasoning_content is its thinking. Anything malformed is left for check_messages to name."""
    if not isinstance(messages, list):
        return messages
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            plain.append(message)
            continue
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"'messages[{i}].role' must be one of {', '.join(ROLES)}, got {role!r}",
                               param=f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(_text_part(part, f"messages[{i}].content[{j}]") for j, part in enumerate(content))
        elif content is None and role == "assistant":
            content = ""
        entry = {"role": ROLES[role], "content": content}
        if role == "assistant" and message.get("reasoning_content") is not None:
            entry["think"] = message["reasoning_content"]
        plain.append(entry)
    if plain and plain[-1] == {"role": "assistant", "content": ""}:  # an empty prefill: the usual generation prompt
        plain.pop()
    return plain


def _text_part(part, where: str) -> str:
    if not isinstance(part, dict) or part.get("type") != "text":
        raise RequestError(f"'{where}': only text content parts are supported", param=where)
    return check_text(part.get("text"), f"{where}.text")


# --- stop strings --------------------------------------------------------------------------------------------------


class StopMatcher:
    """Text in pieces -> the same text cut before the first stop string. Text that may be the start of a stop string
    is held back until the next piece settles it (so a stream never shows part of one)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        text = self.held + text
        found = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        if found:
            self.stopped, self.held = True, ""
            return text[:min(found)]
        keep = max((k for stop in self.stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def stop_answer_at(pieces: Iterator[ReplyPiece | Finished], request: GenerationRequest,
                   stops: tuple[str, ...]) -> Iterator[ReplyPiece | Finished]:
    """stream_reply's pieces with the answer cut before the first stop string; then the generation is ended (finish
    reason "stop")."""
    matcher = StopMatcher(stops)
    for item in pieces:
        if isinstance(item, Finished):
            if not matcher.stopped and (rest := matcher.flush()):
                yield ReplyPiece("answer", rest)
            yield dataclasses.replace(item, reason="stop") if matcher.stopped and item.reason != "error" else item
            return
        if matcher.stopped:
            continue  # what the engine made before it saw the cancel
        if item.kind == "answer":
            text = matcher.push(item.text)
            if matcher.stopped:
                request.cancel("stop")
            item = ReplyPiece("answer", text)
        if item.text:
            yield item


# --- responses -----------------------------------------------------------------------------------------------------


def usage(finished: Finished) -> dict:
    return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": finished.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": finished.thinking_tokens}}


class Completion:
    """The response objects of one chat completion: streamed chunks or the whole message."""

    def __init__(self, model_name: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_name = model_name

    def _base(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name}

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return {**self._base("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    def usage_chunk(self, finished: Finished) -> dict:
        return {**self._base("chat.completion.chunk"), "choices": [], "usage": usage(finished)}

    def message(self, thinking: str, answer: str, finished: Finished) -> dict:
        message = {"role": "assistant", "content": answer, "reasoning_content": thinking or None}
        return {**self._base("chat.completion"),
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finished.reason}],
                "usage": usage(finished)}


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    kind = {404: "not_found_error", 503: "server_busy"}.get(status,
                                                             "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def model_card(model_name: str, created: int) -> dict:
    return {"id": model_name, "object": "model", "created": created, "owned_by": "cortex"}


def models_list(model_name: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(model_name, created)]}
