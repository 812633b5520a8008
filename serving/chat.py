"""Chats in, prompts out; tokens in, text out. Shared by the page's /api/chat and the OpenAI API.

Prompt (training.md section 2), always in the form training saw:
    <system>S</s> <user>Q1 /no think</s><assistant><think> </think><answer>A1</answer></s> ... <user>Qn /think</s><assistant><think>
* the system prompt is the client's or, as in the original app, a single space;
* past assistant turns are re-templated with their thinking when the client sends it (`think`/`reasoning_content`), else
  with the empty think block of no-think training data; each past user turn gets the soft switch that matches its reply;
* the newest user turn gets " /think" or " /no think" from the thinking flag, and the prompt ends with
  `<assistant><think>` or `<assistant><think> </think>`;
* a later system message (mid-conversation) is a `<system>S</s>` turn where it stands, kept or dropped with the
  exchange it precedes;
* a trailing assistant message (OpenAI API) is a prefill that the model continues: `<assistant><think>T</think>
  <answer>C` (T a single space when not given), or `<assistant><think>T` (thinking continued) when only its thinking
  is given;
* leading assistant messages (the original page sent its welcome bubble as history) are dropped;
* message text (system, user, assistant, thinking) is encoded as text: a "</s><system>" typed into a message stays
  text, only the template inserts control tokens. Our replies never contain the tags (the decoder hides them), so
  clients send thinking and answer as separate fields and the template re-inserts the tags around them;
* when the prompt does not fit the context (minus room for the reply), the oldest exchanges are dropped; the system
  prompt and the newest message never are. They are dropped in blocks of about half that room, counted from the
  conversation's start, so the kept history starts at the same exchange for several turns and each turn's prompt
  extends the previous one: the server then prefills only the new turn (prefix reuse, serving/engine.py), where
  dropping one exchange a turn would change the prompt's start, and so its whole prefill, at every turn. The model
  sees between about half and all of that room, as with llama.cpp's context shift.
"""

import json
import math
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from serving.engine import THINKING, Finished, GenerationRequest, SamplingParams, TokenEvent
from trainer.tokenizer import Tokenizer, add_think_switch, split_think_switch

DEFAULT_SYSTEM_PROMPT = " "
MAX_MESSAGES = 512
EVENT_POLL_S = 0.2  # a waiting reader wakes this often, to check that its client is still there
FLUSH_INTERVAL_S = 0.05  # after the first piece, a stream sends what it has at most 20 times a second


class RequestError(ValueError):
    """Bad client input: answered with this status and message (never a stack trace)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]  # validated {role, content[, think]}
    thinking: bool
    think_budget: int | None
    sampling: SamplingParams


# --- validation helpers (both APIs) ----------------------------------------------------------------------------------


def check_text(value, name: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f"'{name}' must be a string, got {json_type(value)}", param=name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates such as "\ud800" are valid JSON but not text
        raise RequestError(f"'{name}' is not valid Unicode text (it holds an unpaired surrogate)", param=name) from None
    return value


def check_bool(value, name: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false, got {json_type(value)}", param=name)
    return value


def check_number(value, name: str, low: float, high: float, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"'{name}' must be a number, got {json_type(value)}", param=name)
    if not math.isfinite(value):
        raise RequestError(f"'{name}' must be a finite number, got {json.dumps(value)}", param=name)
    if not low <= value <= high:
        raise RequestError(f"'{name}' must be between {low} and {high}, got {value}", param=name)
    return float(value)


def check_int(value, name: str, low: int, high: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer, got {json_type(value)}", param=name)
    if not low <= value <= high:
        raise RequestError(f"'{name}' must be between {low} and {high}, got {value}", param=name)
    return value


def json_type(value) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def check_messages(messages, name: str, prefill: bool = False) -> list[dict]:
    """A non-empty list of {role: system|user|assistant, content: str[, think: str]} with a user message, the last one
    from the user or (prefill) the assistant."""
    if not isinstance(messages, list):
        raise RequestError(f"'{name}' must be an array of messages, got {json_type(messages)}", param=name)
    if not messages:
        raise RequestError(f"'{name}' is empty: send at least one user message", param=name)
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"'{name}' has {len(messages)} messages; at most {MAX_MESSAGES} are accepted", param=name)
    checked = []
    for i, message in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"'{where}' must be an object with 'role' and 'content', got {json_type(message)}",
                               param=where)
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise RequestError(f"'{where}.role' must be 'system', 'user' or 'assistant', got {role!r}", param=where)
        entry = {"role": role, "content": check_text(message.get("content"), f"{where}.content")}
        if role == "assistant" and message.get("think") is not None:
            entry["think"] = check_text(message["think"], f"{where}.think")
        checked.append(entry)
    last = checked[-1]
    if prefill and last["role"] == "assistant" and any(m["role"] == "user" for m in checked):
        return checked
    if last["role"] != "user" or not last["content"].strip():
        ending = " (or an assistant message for the model to continue)" if prefill else ""
        raise RequestError(f"the last message of '{name}' must be a non-empty user message{ending}", param=name)
    return checked


# --- /api/chat (the original page's protocol) ------------------------------------------------------------------------


def parse_web_request(body, max_context: int) -> ChatRequest:
    """The original request fields: history, thinking, temperature, top_p, think_budget_enable, think_budget (uuid is
    accepted and ignored). As in the original, a null or missing temperature means greedy and top_p means no cut."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {json_type(body)}")
    if "history" not in body:
        raise RequestError("'history' is missing: send the conversation as a list of {role, content}", param="history")
    messages = check_messages(body["history"], "history")
    thinking = check_bool(body.get("thinking"), "thinking", default=True)
    budget_enabled = check_bool(body.get("think_budget_enable"), "think_budget_enable", default=False)
    think_budget = None
    if thinking and budget_enabled:
        if body.get("think_budget") is None:
            raise RequestError("'think_budget' is required when 'think_budget_enable' is true", param="think_budget")
        think_budget = check_int(body["think_budget"], "think_budget", 0, max_context)
    sampling = SamplingParams(temperature=check_number(body.get("temperature"), "temperature", 0.0, 2.0, 0.0),
                              top_p=check_number(body.get("top_p"), "top_p", 0.0, 1.0, 1.0))
    return ChatRequest(messages, thinking, think_budget, sampling)


# --- prompts -------------------------------------------------------------------------------------------------------


def reply_reserve(max_context: int) -> int:
    """Tokens kept free for the reply when the history is trimmed."""
    return min(512, max_context // 4)


def prefill_thinking(messages: list[dict]) -> bool | None:
    """For a chat ending with an assistant message: whether its prefill ends inside an open <think> (only thinking
    given); None when the chat ends with a user message."""
    last = messages[-1]
    return None if last["role"] != "assistant" else (not last["content"] and last.get("think") is not None)


def build_prompt(tokenizer: Tokenizer, messages: list[dict], thinking: bool, max_context: int) -> tuple[list[int], int]:
    """(prompt ids, number of oldest messages dropped so that the reply keeps reply_reserve tokens of the context).
    thinking: the prompt ends inside an open <think> (for a prefill, prefill_thinking says).
    Message text is encoded as text: only the template's tags are control ids. Raises RequestError when even the
    system prompt plus the newest message do not fit."""
    max_prompt_tokens = max_context - reply_reserve(max_context)
    system = messages[0] if messages[0]["role"] == "system" else {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    chat = messages[1:] if messages[0]["role"] == "system" else messages
    prefill = chat[-1] if chat[-1]["role"] == "assistant" else None
    if prefill is not None:
        chat = chat[:-1]
    first = next(i for i, m in enumerate(chat) if m["role"] != "assistant")
    skipped, exchanges = first, _exchanges(chat[first:], thinking, prefill)

    # More characters than this cannot fit, whatever the text: refused (or dropped) without tokenising them
    max_chars = tokenizer.max_token_chars * max_prompt_tokens
    newest_chars = _chars([system, *exchanges[-1]])
    if newest_chars > max_chars:
        raise RequestError(f"the message is too long: with the system prompt it has {newest_chars} characters, far "
                           f"more than the {max_prompt_tokens} tokens that fit (the context holds {max_context} tokens, "
                           f"{max_context - max_prompt_tokens} of them kept for the reply); shorten it")

    fixed = tokenizer.apply_chat_template([system]) + (tokenizer.encode_prompt([], thinking) if prefill is None
                                                        else _prefill_ids(tokenizer, prefill))
    kept = _kept_exchanges(tokenizer, exchanges, max_prompt_tokens - len(fixed), max_chars)
    while True:  # the exact check on the whole prompt
        turns = [m for exchange in exchanges[len(exchanges) - kept:] for m in exchange]
        if prefill is None:
            ids = tokenizer.encode_prompt([system, *turns], thinking)
        else:
            ids = tokenizer.apply_chat_template([system, *turns]) + _prefill_ids(tokenizer, prefill)
        if len(ids) <= max_prompt_tokens:
            return ids, skipped + sum(len(e) for e in exchanges[: len(exchanges) - kept])
        if kept == 1:
            raise RequestError(f"the message is too long: with the system prompt it takes {len(ids)} tokens, and at "
                               f"most {max_prompt_tokens} fit (the context holds {max_context} tokens, "
                               f"{max_context - max_prompt_tokens} of them kept for the reply); shorten it")
        kept -= 1


# Above this many characters of history (times the most a prompt can hold), the stable blocks are not counted (each
# turn would tokenise all of it): the newest exchanges that fit are kept
STABLE_TRIM_MAX_CHARS_FACTOR = 4


def _kept_exchanges(tokenizer: Tokenizer, exchanges: list[list[dict]], budget: int, max_chars: int) -> int:
    """How many of the newest exchanges fit in budget tokens by their own token counts (the newest always counts as
    fitting): the history from the first block start whose rest fits, blocks of budget / 2 tokens counted from the
    oldest exchange (see the module's docstring); when no block start fits, or the history is too long to count, as
    many as fit."""
    if _chars([m for exchange in exchanges for m in exchange]) <= STABLE_TRIM_MAX_CHARS_FACTOR * max_chars:
        counts = [len(tokenizer.apply_chat_template(exchange)) for exchange in exchanges]
        block_starts, block = [0], 0
        for index, count in enumerate(counts[:-1]):
            block += count
            if block >= budget // 2:
                block_starts.append(index + 1)
                block = 0
        for start in block_starts:
            if sum(counts[start:]) <= budget:
                return len(exchanges) - start
    kept, used = 0, 0  # newest first
    for exchange in reversed(exchanges):
        if kept and _chars(exchange) > max_chars:
            break
        used += len(tokenizer.apply_chat_template(exchange))
        if kept and used > budget:
            break
        kept += 1
    return kept


def _chars(messages: list[dict]) -> int:
    return sum(len(m["content"]) + len(m.get("think", "")) for m in messages)


def _prefill_ids(tokenizer: Tokenizer, prefill: dict) -> list[int]:
    """<assistant><think>T, or <assistant><think>T</think><answer>C (T a single space when not given); T and C as
    text."""
    if prefill_thinking([prefill]):
        return [tokenizer.assistant_id, tokenizer.think_id, *tokenizer.encode_text(prefill["think"])]
    return [tokenizer.assistant_id, tokenizer.think_id, *tokenizer.encode_text(prefill.get("think") or " "),
            tokenizer.think_end_id, tokenizer.answer_id, *tokenizer.encode_text(prefill["content"])]


def _exchanges(chat: list[dict], thinking: bool, prefill: dict | None = None) -> list[list[dict]]:
    """Groups [system..., user, assistant...] with the template fields training used; the last group holds the newest
    user message (and is answered by the prefill, when given)."""
    exchanges: list[list[dict]] = []
    systems: list[dict] = []  # later system messages, kept with the exchange they precede
    for message in chat:
        if message["role"] == "system":
            systems.append(message)
        elif message["role"] == "user":
            exchanges.append([*systems, message])
            systems = []
        else:
            exchanges[-1].append(message)
    exchanges[-1].extend(systems)  # after the newest user message (before a prefill)
    templated = []
    for n, exchange in enumerate(exchanges):
        u = next(i for i, m in enumerate(exchange) if m["role"] == "user")
        user, replies = exchange[u], exchange[u + 1:]
        if n == len(exchanges) - 1 and prefill is not None:
            user_thinking = prefill_thinking([prefill]) or bool((prefill.get("think") or "").strip())
        elif n == len(exchanges) - 1 or not replies:
            user_thinking = thinking if n == len(exchanges) - 1 else split_think_switch(user["content"])[1]
            user_thinking = thinking if user_thinking is None else user_thinking
        else:
            first_reply = next((m for m in replies if m["role"] == "assistant"), {})
            user_thinking = bool(first_reply.get("think", "").strip())
        turns = [*exchange[:u], {"role": "user", "content": add_think_switch(user["content"], user_thinking)}]
        for reply in replies:
            turns.append(reply if reply["role"] == "system" else
                         {"role": "assistant", "content": reply["content"], "think": reply.get("think") or " "})
        templated.append(turns)
    return templated


# --- replies -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplyPiece:
    kind: str  # "thinking" or "answer"
    text: str


class ReplyDecoder:
    """Engine token events -> text pieces of thinking or answer, never half a UTF-8 character. Control tokens
    (<answer>, </answer>, </think>, </s>, ...) are not shown."""

    def __init__(self, tokenizer: Tokenizer):
        self.control_ids = tokenizer.control_ids
        self.decoder = tokenizer.stream_decoder()
        self.kind: str | None = None

    def push(self, event: TokenEvent) -> list[ReplyPiece]:
        kind = "thinking" if event.phase == THINKING else "answer"
        pieces = self.flush() if kind != self.kind else []
        self.kind = kind
        if event.token_id not in self.control_ids:
            text = self.decoder.push(event.token_id)
            if text:
                pieces.append(ReplyPiece(kind, text))
        return pieces

    def flush(self) -> list[ReplyPiece]:
        text = self.decoder.flush()
        return [ReplyPiece(self.kind, text)] if text else []


def stream_reply(request: GenerationRequest, tokenizer: Tokenizer,
                 check_client: Callable[[], None] = lambda: None) -> Iterator[ReplyPiece | Finished]:
    """Text pieces of a submitted request as they come, then its Finished. The first piece goes out at once; after that
    whatever arrived within FLUSH_INTERVAL_S goes out together, one piece per kind (fewer wakeups and writes when the
    server is busy, no visible difference to a reader). The request is cancelled when the caller stops iterating.
    check_client: called before each wait (at least every EVENT_POLL_S; the server checks its connection there)."""
    decoder = ReplyDecoder(tokenizer)
    next_flush = 0.0
    try:
        while True:
            time.sleep(max(0.0, next_flush - time.monotonic()))
            check_client()
            try:
                events = [request.events.get(timeout=EVENT_POLL_S)]
            except queue.Empty:  # still queued, or the engine is busy prefilling
                continue
            while not isinstance(events[-1], Finished) and not request.events.empty():
                events.append(request.events.get_nowait())
            pieces = [piece for event in events if isinstance(event, TokenEvent) for piece in decoder.push(event)]
            if isinstance(events[-1], Finished):
                yield from _merge(pieces + decoder.flush())
                yield events[-1]
                return
            yield from _merge(pieces)
            next_flush = time.monotonic() + FLUSH_INTERVAL_S
    finally:
        request.cancel()


def _merge(pieces: list[ReplyPiece]) -> list[ReplyPiece]:
    merged: list[ReplyPiece] = []
    for piece in pieces:
        if merged and merged[-1].kind == piece.kind:
            merged[-1] = ReplyPiece(piece.kind, merged[-1].text + piece.text)
        else:
            merged.append(piece)
    return merged
