"""The OpenAI chat completions API: request parsing and response shapes for /v1/chat/completions and /v1/models.

Thinking comes back as `reasoning_content`, the answer as `content` (message or stream delta), and
`usage.completion_tokens_details.reasoning_tokens` counts the thinking. Extra request fields (the openai client's
`extra_body`): `thinking` (bool; default: the newest user message's " /think" or " /no think" switch, else on) and
`think_budget` (thinking tokens, or null for none).
"""

import time
import uuid

from serving.chat import (ChatRequest, RequestError, check_bool, check_int, check_messages, check_number, check_text,
                          json_type)
from serving.engine import Finished, SamplingParams
from trainer.tokenizer import split_think_switch

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED_FIELDS = ("tools", "functions", "tool_choice", "function_call", "logit_bias", "audio", "prediction")


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
    if body.get("stop") is not None:
        raise RequestError("'stop' is not supported (generation ends at the model's end-of-turn token)", param="stop")
    if body.get("logprobs"):
        raise RequestError("'logprobs' is not supported", param="logprobs")
    if body.get("model") is not None:
        check_text(body["model"], "model")
    messages = check_messages(_plain_messages(body["messages"]), "messages")

    switch = split_think_switch(messages[-1]["content"])[1]  # " /think", " /no think" or None
    thinking = check_bool(body.get("thinking"), "thinking", default=True if switch is None else switch)
    think_budget = None
    if body.get("think_budget") is not None:
        think_budget = check_int(body["think_budget"], "think_budget", 0, max_context)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    sampling = SamplingParams(
        temperature=check_number(body.get("temperature"), "temperature", 0.0, 2.0, 1.0),
        top_p=check_number(body.get("top_p"), "top_p", 0.0, 1.0, 1.0),
        max_new_tokens=None if max_tokens is None else check_int(max_tokens, "max_tokens", 1, max_context))
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
    return plain


def _text_part(part, where: str) -> str:
    if not isinstance(part, dict) or part.get("type") != "text":
        raise RequestError(f"'{where}': only text content parts are supported", param=where)
    return check_text(part.get("text"), f"{where}.text")


# --- responses -----------------------------------------------------------------------------------------------------


def usage(finished: Finished) -> dict:
    return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens,
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


def error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = {404: "not_found_error", 503: "server_busy"}.get(status,
                                                             "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def models_list(model_name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "cortex"}]}
