"""Continuous batching: one decode loop owns the model and serves every request in one batch.

The KV cache is allocated once: `slots` sequences of up to `max_context` positions. A request waits in a bounded queue
until a slot is free, is prefilled into that slot between two decode steps, then advances one token per step together
with the other slots (each with its own length, position and sampling parameters, presence/frequency penalties and,
for a request with a seed, its own random generator, so its reply does not depend on the rest of the batch). A
finished, cancelled or disconnected request frees its slot before the next step. Requests get token ids back, tagged
with their phase (thinking or answer); turning them into text is the caller's business (serving/chat.py,
serving/completions.py).

Prefix reuse: a freed slot keeps the keys and values of its tokens (prompt and reply), and a request whose prompt starts
with tokens a slot holds prefills only the rest, as llama.cpp's server and vLLM's prefix caching do. The request takes
the lowest free slot all the same (the batch stays compact): a free slot's cache holding its start trades places with
that slot's, a running request's start (a shared system prompt or few-shot examples) is copied (4 ms for 1,000 tokens of
the full model on a 2-core CPU, where their prefill takes seconds). A chat's next turn (the whole conversation again,
plus a new message) so prefills just the new message: on a 2-core CPU the full model's first token of a 640-token next
turn came after 0.45 s instead of 2.3 s (README, "The full model on a CPU"). `Finished.cached_tokens` says how many
prompt tokens were reused (the API's usage.prompt_tokens_details).

Log-probabilities (on request) are the model's own: log-softmax of the fp32 logits before temperature, top-p and
penalties, for the prompt's tokens (a forward over the whole prompt at prefill) and for each generated token.

Thinking budget: a request that starts inside `<think>` may produce at most `think_budget` thinking tokens. When the
model has not closed the thinking by itself, a closing sentence and `</think>` are forced in (fed through the model
like sampled tokens), so the answer follows from a closed thought and the count is exact. The sentence is the original
Cortex one when the thinking so far is Chinese, else its English translation; the language is judged once, when the
room left first reaches the longest closing, so whichever is chosen still fits the budget exactly. A budget of 0 forces
`</think>` as the first token: no thinking at all.

Threads: run the decode loop in the thread that loaded the model (`run`, or `run_beside` with the clients in another
thread), as app.py and eval.py do. Torch's CPU worker threads (OpenMP) belong to the thread that first used them; a
second thread doing torch work starts a second set, more workers than cores, and libgomp then stops its workers from
spin-waiting between operations: on 2 cores a decode step of the full int8 model took 80-88 ms in a second thread
against 47-52 ms in the loading thread. `start` (a background decode thread) suits tests and GPUs.
"""

import logging
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model import CortexModel
from model.compiled_decode import attention_bias, compiled_decode_step
from serving.sampling import sample_tokens
from trainer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

THINKING, ANSWER = "thinking", "answer"
# What the original app appended when the budget ran out (serving.md 13.1), followed by </think>; and in English
THINK_BUDGET_CLOSINGS = {
    "zh": "。考虑到用户的时间限制，我现在必须根据思考直接给出解决方案\n",
    "en": "... Considering the user's time limit, I must now answer directly from my thinking so far.\n",
}
CJK_CHARACTER = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
LATIN_WORD = re.compile(r"[A-Za-z]+")


def closing_language(thinking: str) -> str:
    """"zh" when the text has more CJK characters than Latin words (one character carries about a word), else "en"."""
    return "zh" if len(CJK_CHARACTER.findall(thinking)) > len(LATIN_WORD.findall(thinking)) else "en"


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


class QueueFullError(RuntimeError):
    """Every slot is busy and the waiting queue is at its limit."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 (or 0) = no nucleus cut
    max_new_tokens: int | None = None  # None = until </s> or the end of the context; 0 = prefill only
    seed: int | None = None  # a generator of the request's own: same seed and request, same reply
    presence_penalty: float = 0.0  # OpenAI's: logit -= presence * (count > 0) + frequency * count,
    frequency_penalty: float = 0.0  # count = times the token was generated so far in this reply
    stop: tuple[str, ...] = ()  # stop strings: matched on the text by the reader (serving/openai_api.py), not here

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass(frozen=True)
class TokenLogprobs:
    logprob: float  # of the token itself
    top: tuple[tuple[int, float], ...]  # (token id, logprob) of the most likely tokens, most likely first


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    phase: str  # THINKING or ANSWER: the part of the reply the token belongs to (</think> still belongs to THINKING)
    logprobs: TokenLogprobs | None = None  # when the request asked for them


@dataclass(frozen=True)
class PromptLogprobs:
    """Sent before any TokenEvent to a request that asked for prompt log-probabilities: one entry per prompt token,
    None for the first (nothing predicts it)."""
    entries: list[TokenLogprobs | None]


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (</s>, or a stop string the reader found), "length" (max_new_tokens or context full),
    # "cancelled", "error"
    prompt_tokens: int
    completion_tokens: int  # every generated token, forced ones and </s> included
    thinking_tokens: int  # tokens between <think> and </think>
    cached_tokens: int = 0  # of the prompt's, reused from a slot's cache (prefix reuse): not prefilled again


class GenerationRequest:
    """One generation: the caller submits it to an Engine and reads `events` (TokenEvent..., then one Finished)."""

    def __init__(self, prompt_ids: list[int], sampling: SamplingParams, thinking: bool, think_budget: int | None = None,
                 client_gone: Callable[[], bool] | None = None, *, logprobs: int | None = None,
                 prompt_logprobs: bool = False):
        """logprobs: None, or how many of the most likely tokens to report with each token's log-probability (0 = just
        the token's own); prompt_logprobs: report them for the prompt's tokens too (needs logprobs)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if think_budget is not None and think_budget < 0:
            raise ValueError(f"think_budget must be >= 0 (0: the thinking is closed at once), got {think_budget}")
        if prompt_logprobs and logprobs is None:
            raise ValueError("prompt_logprobs needs logprobs (the number of top tokens to report)")
        self.prompt_ids = list(prompt_ids)
        self.sampling = sampling
        self.thinking = thinking  # the prompt ends inside an open <think>
        self.think_budget = think_budget if thinking else None
        self.logprobs, self.prompt_logprobs = logprobs, prompt_logprobs
        self.events: queue.Queue = queue.Queue()
        self.submitted_at = time.monotonic()
        self._cancelled = threading.Event()
        self.cancel_reason = "cancelled"
        self._client_gone = client_gone  # asked before every step, so a disconnect frees the slot at the next token

    def cancel(self, reason: str = "cancelled"):
        """Stop generating; the engine frees the slot before its next step. Harmless after the request finished.
        reason "stop": the caller found a stop string (the request counts as completed, not cancelled)."""
        if not self._cancelled.is_set():
            self.cancel_reason = reason
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        if not self._cancelled.is_set() and self._client_gone is not None and self._client_gone():
            self._cancelled.set()
        return self._cancelled.is_set()


class SlotKVCache:
    """Keys/values of `slots` independent sequences, preallocated: per layer (slots, kv_heads, max_length, head_dim).

    The model talks to a cache through `get_seq_len()` and `update(key, value, layer_idx)` (model.KVCache's interface);
    `prefill` and `decode` return views that implement them for one slot, or for every slot at its own position."""

    def __init__(self, model: CortexModel, slots: int, max_length: int):
        config = model.config
        weight = model.embed_tokens.weight  # never quantized: the model's dtype and device
        shape = (slots, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = [weight.new_zeros(shape) for _ in range(config.num_hidden_layers)]
        self.values = [weight.new_zeros(shape) for _ in range(config.num_hidden_layers)]
        self.max_length = max_length

    def prefill(self, slot: int, start: int = 0) -> "_PrefillView":
        return _PrefillView(self, slot, start)

    def decode(self, positions: torch.Tensor) -> "_DecodeView":
        return _DecodeView(self, positions)

    def copy(self, source: int, dest: int, length: int):
        """The first `length` positions of slot `source` into slot `dest`, every layer."""
        for layer in (*self.keys, *self.values):
            layer[dest, :, :length] = layer[source, :, :length]

    def swap(self, a: int, b: int, length_a: int, length_b: int):
        """Slot a's first length_a positions and slot b's first length_b trade places, every layer."""
        for layer in (*self.keys, *self.values):
            held_a = layer[a, :, :length_a].clone()
            layer[a, :, :length_b] = layer[b, :, :length_b]
            layer[b, :, :length_a] = held_a


class _PrefillView:
    """A prompt's tokens into one slot after the `start` positions it already holds (a reused prefix; 0: the whole
    prompt, plain causal attention)."""

    def __init__(self, cache: SlotKVCache, slot: int, start: int):
        self.cache, self.slot, self.start = cache, slot, start

    def get_seq_len(self, layer_idx: int = 0) -> int:
        return self.start

    def update(self, key, value, layer_idx):
        end = self.start + key.shape[-2]
        rows = slice(self.slot, self.slot + 1)
        self.cache.keys[layer_idx][rows, :, self.start:end] = key
        self.cache.values[layer_idx][rows, :, self.start:end] = value
        return self.cache.keys[layer_idx][rows, :, :end], self.cache.values[layer_idx][rows, :, :end]


class _DecodeView:
    """One new token for each of the first B slots, written at that slot's own position; attention reads the first
    max(position) + 1 positions of every slot (the caller's attention mask hides what is not that slot's)."""

    def __init__(self, cache: SlotKVCache, positions: torch.Tensor):
        self.cache, self.positions = cache, positions
        self.rows = torch.arange(len(positions), device=positions.device)
        self.width = int(positions.max()) + 1

    def get_seq_len(self, layer_idx: int = 0) -> int:
        return self.width - 1

    def update(self, key, value, layer_idx):
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        keys[self.rows, :, self.positions] = key[:, :, 0]
        values[self.rows, :, self.positions] = value[:, :, 0]
        batch = len(self.rows)
        return keys[:batch, :, : self.width], values[:batch, :, : self.width]


@dataclass
class _Slot:
    request: GenerationRequest
    max_new_tokens: int
    phase: str
    ids: list[int] = field(default_factory=list)  # the prompt, then each token emitted
    length: int = 0  # positions of this slot filled in the cache (by ids[:length])
    cached_tokens: int = 0  # of the prompt, already in the slot's cache when it was admitted (prefix reuse)
    next_input: int = -1  # the last generated token, fed at the next step
    generated: int = 0
    thinking_ids: list[int] = field(default_factory=list)  # the thought so far (</think> excluded)
    closing: list[int] | None = None  # the budget's closing, chosen once its language is judged
    forced: deque = field(default_factory=deque)  # tokens to emit instead of sampling (the budget's closing)
    generator: torch.Generator | None = None  # the request's own, when it has a seed
    counts: torch.Tensor | None = None  # (V,) times each token was generated, when the request has penalties

    @property
    def thinking_tokens(self) -> int:
        return len(self.thinking_ids)


class Engine:
    """The decode loop. `run` (or `run_beside`, or `start`) runs it; `submit` from any thread; `stats` for monitoring;
    `stop` ends it."""

    def __init__(self, model: CortexModel, tokenizer: Tokenizer, *, slots: int = 8, max_queue: int = 32,
                 max_context: int | None = None, seed: int | None = None, compile: bool = False,
                 reuse_prefixes: bool = True):
        """compile: decode with one torch.compile'd graph per step (model/compiled_decode.py); it is compiled here,
        before serving, which takes seconds to minutes for the full model on a CPU. reuse_prefixes: prefix reuse (see
        the module's docstring); off, every prompt is prefilled whole."""
        if slots < 1 or max_queue < 0:
            raise ValueError(f"need slots >= 1 and max_queue >= 0, got slots={slots}, max_queue={max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_context = max_context or model.config.max_position_embeddings
        self.slots: list[_Slot | None] = [None] * slots
        self.reuse_prefixes = reuse_prefixes
        self.kept: list[list[int]] = [[] for _ in range(slots)]  # a free slot's tokens whose keys/values it holds
        self.max_queue = max_queue
        # A compiled step reads views of the cache up to some width: one spare position keeps every such view
        # non-contiguous alike, or the full-width view would be compiled again for its different strides.
        self.cache = SlotKVCache(model, slots, self.max_context + (1 if compile else 0))
        self.device = model.embed_tokens.weight.device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed if seed is not None else torch.seed())
        self.closing_ids = {language: tokenizer.encode(text) for language, text in THINK_BUDGET_CLOSINGS.items()}
        self.longest_closing = max(len(ids) for ids in self.closing_ids.values()) + 1  # with </think>
        self.compiled_step = compiled_decode_step(self.model) if compile else None
        if self.compiled_step is not None:
            self._warm_up_compiled_step()

        self._waiting: deque[GenerationRequest] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._running = False  # the decode loop is on (or about to be: start() sets it before its thread runs)
        self._thread: threading.Thread | None = None  # start()'s
        # monitoring (under _cond)
        self._started_at = time.monotonic()
        self._counts = {"requests": 0, "rejected": 0, "completed": 0, "cancelled": 0, "failed": 0, "tokens": 0,
                        "prompt_tokens": 0, "cached_prompt_tokens": 0}
        self._token_times: deque[tuple[float, int]] = deque()  # (time, tokens) per step, last STATS_WINDOW_S seconds
        self._ttft: deque[float] = deque(maxlen=200)

    STATS_WINDOW_S = 10.0
    # An idle loop wakes this often: Python runs signal handlers (Ctrl-C's KeyboardInterrupt) in the main thread only,
    # and a SIGINT that the OS delivers to another thread (the HTTP server's, OpenMP's) does not interrupt the main
    # thread's wait, so an untimed wait left `app.py` running after Ctrl-C until the next request.
    IDLE_WAKE_S = 0.5

    # --- public, any thread ----------------------------------------------------------------------------------------

    def run(self):
        """The decode loop, in the calling thread, until `stop` (from another thread) or an exception such as
        KeyboardInterrupt. Call it from the thread that loaded the model (see the module's docstring)."""
        self._running = True
        try:
            self._run()
        finally:
            self._running = False

    def run_beside(self, client: Callable[[], object]):
        """Runs client() in a new thread while this thread decodes; when it returns, stops the loop and returns what it
        returned (or raises what it raised)."""
        outcome = {}

        def call_client():
            try:
                outcome["result"] = client()
            except BaseException as err:  # re-raised in the decoding thread
                outcome["error"] = err
            finally:
                self.stop(timeout=0)

        thread = threading.Thread(target=call_client, name="cortex-client", daemon=True)
        thread.start()
        self.run()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def start(self) -> "Engine":
        """The decode loop in a background thread (tests, GPUs; on a CPU prefer `run`, see the module's docstring)."""
        self._running = True
        self._thread = threading.Thread(target=self.run, name="cortex-decode", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0):
        """Ends the loop (its requests in flight and waiting end "cancelled"); waits for start()'s thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        if len(request.prompt_ids) >= self.max_context:
            raise ValueError(f"the prompt has {len(request.prompt_ids)} tokens; the context holds {self.max_context}")
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            free = self.slots.count(None)
            if len(self._waiting) >= self.max_queue + free:  # free slots are about to take waiting requests
                self._counts["rejected"] += 1
                raise QueueFullError(f"the server is busy: {len(self.slots)} requests running and "
                                     f"{len(self._waiting) - free} waiting (at most {self.max_queue} may wait); "
                                     f"try again shortly")
            self._counts["requests"] += 1
            self._waiting.append(request)
            self._cond.notify_all()
        return request

    def stats(self) -> dict:
        now = time.monotonic()
        with self._cond:
            self._forget_old_steps(now)
            window = min(self.STATS_WINDOW_S, now - self._started_at) or 1e-9
            ttft = sorted(self._ttft)
            return {
                "slots": len(self.slots),
                "active": sum(s is not None for s in self.slots),
                "queued": len(self._waiting),
                "max_queue": self.max_queue,
                "max_context": self.max_context,
                **{f"{k}_total": v for k, v in self._counts.items()},
                "tokens_per_s": round(sum(n for _, n in self._token_times) / window, 2),
                "ttft_ms_mean": round(1000 * sum(ttft) / len(ttft), 1) if ttft else None,
                "ttft_ms_p50": round(1000 * ttft[len(ttft) // 2], 1) if ttft else None,
                "uptime_s": round(now - self._started_at, 1),
            }

    @property
    def alive(self) -> bool:
        return self._running

    # --- the decode loop -----------------------------------------------------------------------------------------

    def _run(self):
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and all(s is None for s in self.slots):
                        self._cond.wait(timeout=self.IDLE_WAKE_S)
                    if self._stopping:
                        break
                    admitted = self._admit()
                try:
                    self._free_cancelled()
                    for slot_idx in admitted:
                        if self.slots[slot_idx] is not None:  # (not cancelled since its admission)
                            self._prefill(slot_idx)
                    if any(s is not None for s in self.slots):
                        self._decode_step()
                except Exception:  # a failed step must not kill the server: fail the requests in flight, keep serving
                    log.exception("decode step failed; ending the %d requests in flight",
                                  sum(s is not None for s in self.slots))
                    for slot_idx, slot in enumerate(self.slots):
                        if slot is not None:
                            self._finish(slot_idx, "error")
        for slot_idx, slot in enumerate(self.slots):
            if slot is not None:
                self._finish(slot_idx, "cancelled")
        with self._cond:
            while self._waiting:
                self._waiting.popleft().events.put(Finished("cancelled", 0, 0, 0))

    def _admit(self) -> list[int]:
        """Moves waiting requests into free slots (the lowest first, with the prompt's start brought in:
        _free_slot_for), after dropping the cancelled ones (a client that left frees its queue place at the next step).
        Holds _cond."""
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            self._counts["cancelled"] += 1
            request.events.put(Finished("cancelled", len(request.prompt_ids), 0, 0))
        admitted = []
        while self._waiting and None in self.slots:
            request = self._waiting.popleft()
            room = self.max_context - len(request.prompt_ids)
            sampling = request.sampling
            max_new = room if sampling.max_new_tokens is None else min(room, sampling.max_new_tokens)
            slot_idx, cached = self._free_slot_for(request)
            slot = _Slot(request, max_new, THINKING if request.thinking else ANSWER, ids=list(request.prompt_ids),
                         length=cached, cached_tokens=cached)
            self.kept[slot_idx] = []  # the cache is the slot's now
            self._counts["prompt_tokens"] += len(request.prompt_ids)
            self._counts["cached_prompt_tokens"] += cached
            if sampling.seed is not None:
                slot.generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
            if sampling.penalised:
                slot.counts = torch.zeros(self.model.config.vocab_size, device=self.device)
            self.slots[slot_idx] = slot
            admitted.append(slot_idx)
        return admitted

    def _free_slot_for(self, request: GenerationRequest) -> tuple[int, int]:
        """(the free slot a request takes: the lowest, so the active slots stay the first ones (_compact); how many
        of its prompt's positions that slot holds). The longest start of the prompt that any slot holds (a free slot's
        kept tokens, an active one's filled positions) is brought into it first: a free slot's cache trades places
        with the lowest's (both stay kept), an active one's start is copied. Here, before any prefill or step can
        write to either slot. At least the prompt's last token is prefilled (its logits start the reply); a request
        for prompt log-probabilities is prefilled whole."""
        lowest = self.slots.index(None)
        if not self.reuse_prefixes or request.prompt_logprobs:
            return lowest, 0
        prompt = request.prompt_ids[:-1]
        held = {slot_idx: common_prefix_length(self.kept[slot_idx] if slot is None else slot.ids[:slot.length], prompt)
                for slot_idx, slot in enumerate(self.slots)}
        best = max(held, key=held.get)  # the lowest of equals
        if held[best] <= held[lowest]:
            return lowest, held[lowest]
        if self.slots[best] is None:
            self._trade_places(lowest, best)
        else:
            self.cache.copy(best, lowest, held[best])
        return lowest, held[best]

    def _free_cancelled(self):
        for slot_idx, slot in enumerate(self.slots):
            if slot is not None and slot.request.cancelled:
                self._finish(slot_idx, slot.request.cancel_reason)

    def _prefill(self, slot_idx: int):
        slot = self.slots[slot_idx]
        request = slot.request
        new_ids = torch.tensor([request.prompt_ids[slot.length:]], device=self.device)  # after a reused prefix
        logits = self.model(new_ids, past_key_values=self.cache.prefill(slot_idx, start=slot.length),
                            logits_to_keep=0 if request.prompt_logprobs else 1)["logits"][0]
        slot.length = len(request.prompt_ids)
        if request.prompt_logprobs:  # (prefilled whole)
            scored = self._logprobs(logits[:-1], request.prompt_ids[1:], request.logprobs)
            request.events.put(PromptLogprobs([None, *scored]))
        if slot.max_new_tokens == 0:
            self._finish(slot_idx, "length")
            return
        token, = self._choose_tokens([slot], logits[-1:])
        self._emit(slot_idx, token, self._token_logprobs(slot, logits[-1:], token))

    def _compact(self):
        """Moves the highest active slot into the lowest free one below it, until the active slots are the first ones:
        a free slot below an active one would ride along (masked) in every decode step, and a second row doubles a
        CPU step in the stored formats (34 -> 69 ms, the default format of the full model on a 2-core CPU). Their
        caches trade places, so the free slot's kept tokens stay kept (a few ms for 1,000 positions)."""
        while True:
            active = [slot_idx for slot_idx, slot in enumerate(self.slots) if slot is not None]
            if not active or active[-1] == len(active) - 1:
                return
            self._trade_places(self.slots.index(None), active[-1])

    def _trade_places(self, a: int, b: int):
        """Slots a and b trade their caches' filled positions and what they hold: a request, or a free slot's kept
        tokens (an active slot keeps none)."""
        def filled(slot_idx: int) -> int:
            slot = self.slots[slot_idx]
            return len(self.kept[slot_idx]) if slot is None else slot.length

        self.cache.swap(a, b, filled(a), filled(b))
        self.slots[a], self.slots[b] = self.slots[b], self.slots[a]
        self.kept[a], self.kept[b] = self.kept[b], self.kept[a]

    def _decode_step(self):
        self._compact()
        rows = [s for s in self.slots if s is not None]  # the first len(rows) slots
        inputs = torch.tensor([[s.next_input] for s in rows], device=self.device)
        positions = torch.tensor([s.length for s in rows], device=self.device)
        if self.compiled_step is not None:
            logits = self._compiled_logits(inputs[:, 0], positions)
        else:
            view = self.cache.decode(positions)
            mask = torch.arange(view.width, device=self.device)[None, :] <= positions[:, None]
            logits = self.model(inputs, attention_mask=mask, position_ids=positions[:, None],
                                past_key_values=view)["logits"][:, -1]
        for slot in rows:
            slot.length += 1
        tokens = self._choose_tokens(rows, logits)
        for slot_idx, (slot, token) in enumerate(zip(rows, tokens)):
            self._emit(slot_idx, token, self._token_logprobs(slot, logits[slot_idx:slot_idx + 1], token))
        with self._cond:
            self._counts["tokens"] += len(rows)
            self._token_times.append((time.monotonic(), len(rows)))

    COMPILED_WIDTH_STEP = 64  # the compiled step reads the cache up to a multiple of this: few distinct shapes

    def _compiled_logits(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token for each of the first B slots at its own position -> (B, V)."""
        batch, step = len(tokens), self.COMPILED_WIDTH_STEP
        width = min(self.max_context, (int(positions.max()) // step + 1) * step)
        allowed = torch.arange(width, device=self.device)[None, :] <= positions[:, None]
        bias = attention_bias(allowed, self.cache.keys[0].dtype)
        keys = [k[:batch, :, :width] for k in self.cache.keys]
        values = [v[:batch, :, :width] for v in self.cache.values]
        return self.compiled_step(tokens, positions[:, None], positions, bias, keys, values)

    def _warm_up_compiled_step(self):
        """Compile before serving every graph torch.compile will want: the first call makes a graph for its exact
        shape, a second shape makes it dynamic, and a batch of one row always gets graphs of its own (sizes 0 and 1
        are never dynamic). So: one row at two widths, then two rows. Writes at positions 0 and one step in, of two
        slots, which a prefill overwrites before use."""
        step = self.COMPILED_WIDTH_STEP
        with torch.inference_mode():
            for batch, position in ((1, 0), (1, step), (min(2, len(self.slots)), 0)):
                tokens = torch.zeros(batch, dtype=torch.long, device=self.device)
                positions = torch.full((batch,), min(position, self.max_context - 1), device=self.device)
                self._compiled_logits(tokens, positions)

    def _choose_tokens(self, slots: list[_Slot], logits: torch.Tensor) -> list[int]:
        """Forced tokens where a thinking budget is closing, else drawn with each request's own penalties, temperature,
        top-p and generator."""
        penalised = [row for row, s in enumerate(slots) if s.counts is not None]
        if penalised:  # a new tensor: the raw logits stay for log-probabilities
            counts = torch.stack([slots[row].counts for row in penalised])
            penalties = torch.tensor([[s.sampling.presence_penalty, s.sampling.frequency_penalty]
                                      for s in (slots[row].request for row in penalised)], device=logits.device)
            logits = logits.float().index_add(0, torch.tensor(penalised, device=logits.device),
                                              -(penalties[:, :1] * (counts > 0) + penalties[:, 1:] * counts))
        params = torch.tensor([[s.request.sampling.temperature, s.request.sampling.top_p] for s in slots])
        if all(s.generator is None for s in slots):
            uniform = torch.rand(len(slots), generator=self.generator, device=self.device)
        else:  # one number per row, each from its request's generator (or the engine's): rows never share a stream
            uniform = torch.stack([torch.rand((), generator=s.generator or self.generator, device=self.device)
                                   for s in slots])
        sampled = sample_tokens(logits, *params.to(logits.device).unbind(dim=1), uniform).tolist()
        chosen = []
        for slot, token in zip(slots, sampled):
            if not slot.forced and self._budget_spent(slot):
                slot.forced.extend(slot.closing)
            chosen.append(slot.forced.popleft() if slot.forced else token)
        return chosen

    def _token_logprobs(self, slot: _Slot, logits: torch.Tensor, token: int) -> TokenLogprobs | None:
        top = slot.request.logprobs
        return None if top is None else self._logprobs(logits, [token], top)[0]

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprobs]:
        """logits (N, V) predicting tokens (N ids) -> each token's log-probability and the `top` most likely."""
        logprobs = logits.float().log_softmax(dim=-1)
        chosen = logprobs.gather(-1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
        best_values, best_ids = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], logprobs[:, :0].long())
        return [TokenLogprobs(value, tuple(zip(ids, values)))
                for value, ids, values in zip(chosen, best_ids.tolist(), best_values.tolist())]

    def closing_for(self, budget: int, thinking_ids: list[int]) -> list[int]:
        """The tokens forced to end a thought (`thinking_ids` so far) that spent its budget: the closing sentence in the
        thought's language, which counts as thinking, and </think>; with a budget too small for the sentence, only
        </think>."""
        closing = self.closing_ids[closing_language(self.tokenizer.decode(thinking_ids))]
        return [*closing, self.tokenizer.think_end_id] if budget > len(closing) else [self.tokenizer.think_end_id]

    def _budget_spent(self, slot: _Slot) -> bool:
        budget = slot.request.think_budget
        if slot.phase != THINKING or budget is None:
            return False
        if slot.closing is None:
            if budget - slot.thinking_tokens > self.longest_closing:
                return False  # any closing still fits: its language can wait for more thought
            slot.closing = self.closing_for(budget, slot.thinking_ids)
        free_tokens = budget - len(slot.closing) + 1  # what the model may think before the closing
        return slot.thinking_tokens >= free_tokens

    def _emit(self, slot_idx: int, token: int, logprobs: TokenLogprobs | None = None):
        slot = self.slots[slot_idx]
        request = slot.request
        if slot.generated == 0:
            with self._cond:
                self._ttft.append(time.monotonic() - request.submitted_at)
        slot.generated += 1
        slot.next_input = token
        slot.ids.append(token)
        if slot.counts is not None:
            slot.counts[token] += 1
        request.events.put(TokenEvent(token, slot.phase, logprobs))
        if slot.phase == THINKING:
            if token == self.tokenizer.think_end_id:
                slot.phase = ANSWER
            else:
                slot.thinking_ids.append(token)
        if token == self.tokenizer.eos_id:
            self._finish(slot_idx, "stop")
        elif slot.generated >= slot.max_new_tokens or slot.length + 1 >= self.max_context:
            self._finish(slot_idx, "length")

    def _finish(self, slot_idx: int, reason: str):
        slot = self.slots[slot_idx]
        self.slots[slot_idx] = None
        # after an error the cache may hold part of a failed step: nothing of it is reused
        self.kept[slot_idx] = [] if reason == "error" else slot.ids[:slot.length]
        slot.request.events.put(Finished(reason, len(slot.request.prompt_ids), slot.generated, slot.thinking_tokens,
                                         slot.cached_tokens))
        with self._cond:
            self._counts[{"stop": "completed", "length": "completed"}.get(reason, "failed" if reason == "error"
                                                                            else "cancelled")] += 1

    def _forget_old_steps(self, now: float):
        while self._token_times and self._token_times[0][0] < now - self.STATS_WINDOW_S:
            self._token_times.popleft()
