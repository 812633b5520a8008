"""Reward functions for GSPO/GRPO: a rollout's completions in, one float per completion out.

A reward function is any callable

    reward_fn(samples: Sequence[Sample]) -> list[float]       # len(result) == len(samples)

where each Sample holds the decoded prompt, the decoded completion (special tokens kept, so the <think>/<answer> tags
are visible; padding removed), the gold answer string of the prompt and whether the completion was cut off at
max_new_tokens without its </s>. It is called once per rollout, on every rank, for that rank's completions.
GRPOConfig.reward names it: a key of REWARDS, or "package.module:function" for one of your own.
"""
from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Sample:
    prompt: str
    completion: str
    answer: str       # the gold answer of the prompt ("42", "3.5")
    truncated: bool   # no </s>: the completion ran into max_new_tokens


RewardFn = Callable[[Sequence[Sample]], list[float]]

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
# A completion that is not well-formed (cut off before its </s>, its think block left open, an extra tag) keeps this
# share of its reward: it gets no full credit, but a long correct answer still beats a long wrong one.
TRUNCATED_FACTOR = 0.5


def think_and_answer(completion: str) -> tuple[str, str]:
    """The stripped text inside the first <think>...</think> and the first <answer>...</answer> ('' when absent)."""
    think, answer = _THINK.search(completion), _ANSWER.search(completion)
    return (think.group(1).strip() if think else ""), (answer.group(1).strip() if answer else "")


_PLAIN_TEXT = r"((?:(?!</?(?:think|answer|s|user|assistant|system)>|<pad>|<unk>).)*)"  # no special token inside
_REPLY = re.compile(rf"<think>{_PLAIN_TEXT}</think><answer>{_PLAIN_TEXT}</answer></s>", re.DOTALL)


def well_formed(reply: str, thinking: bool | None = None) -> bool:
    """Whether a whole assistant reply (from its <think>, special tokens kept) is <think>T</think><answer>A</answer></s>
    and nothing more, with a non-empty answer A and, in think mode, a non-empty thought T; in no-think mode T is blank
    (the empty think block of no-think training data); thinking=None accepts either."""
    match = _REPLY.fullmatch(reply)
    return (bool(match) and bool(match.group(2).strip())
            and (thinking is None or bool(match.group(1).strip()) == thinking))


def _number(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:
        return None


def answer_closeness(answer: str, gold: str) -> float:
    """exp(-0.1 |n - n*|) for n the last number in the answer part and n* the gold number; 0 without a number.
    A gold answer that is not a number must be matched exactly (1 or 0)."""
    target = _number(gold)
    if target is None:
        return float(answer == gold.strip())
    numbers = _NUMBER.findall(answer)
    if not numbers:
        return 0.0
    return math.exp(-0.1 * abs(float(numbers[-1]) - target))


def cortex_score(sample: Sample) -> float:
    """The Cortex 2.5 reward ("v3", training.md 7.3), range [0, 11]:

        7 * closeness + 2 * min(1, ln(1 + len(think)) / ln(501)) + 1 * [think and answer present] + 1 * [exact]

    Fixed against the original: the number is taken from the <answer> part only (the original took the last number of
    the whole completion, so a number in the reasoning counted as the answer), and a completion that is truncated or
    otherwise not well_formed keeps only TRUNCATED_FACTOR of its reward (the original gave it full credit)."""
    think, answer = think_and_answer(sample.completion)
    closeness = answer_closeness(answer, sample.answer)
    reward = (7.0 * closeness + 2.0 * min(1.0, math.log1p(len(think)) / math.log(501))
              + float(bool(think) and bool(answer)) + float(closeness > 0.999))
    return reward if not sample.truncated and well_formed(sample.completion) else reward * TRUNCATED_FACTOR


def cortex_reward(samples: Sequence[Sample]) -> list[float]:
    return [cortex_score(s) for s in samples]


def exact_match_reward(samples: Sequence[Sample]) -> list[float]:
    """1 when the <answer> part's last number equals the gold answer and the completion finished, else 0."""
    return [float(not s.truncated and answer_closeness(think_and_answer(s.completion)[1], s.answer) > 0.999)
            for s in samples]


REWARDS: dict[str, RewardFn] = {"cortex": cortex_reward, "exact_match": exact_match_reward}


def resolve_reward(name: str) -> RewardFn:
    """A key of REWARDS, or "package.module:function" (imported)."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r}: use one of {', '.join(REWARDS)} or 'package.module:function'")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {name!r}: cannot import module {module_name!r} ({err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {name!r}: module {module_name!r} has no function {attr!r}")
    return fn
