"""The bundled sample data: regenerates byte-identically, follows training.md section 3, arithmetic is exact."""

import ast
import json
import operator
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_data"
FILES = ["pretrain", "cot", "grpo", "mix", "dpo"]
THINK_SUFFIX, NO_THINK_SUFFIX = " /think", " /no think"
# "a op b = c" with whole numbers only (not the tail of a longer number)
EQUATION = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?) ([+\-×÷]) (\d+(?:\.\d+)?) = (\d+(?:\.\d+)?)(?!\.?\d)")
ANSWER_SENTENCE = re.compile(r"(?:The answer is |答案是)(\d+(?:\.\d+)?)[.。]$")
CANONICAL_NUMBER = re.compile(r"(0|[1-9]\d*)(\.\d*[1-9])?")
SOLVED_PROBLEM = re.compile(r"(?:Problem: |题目：)(.+?)(?: Solution: |解答：)")  # worked examples in pretrain text
CJK = re.compile(r"[\u4e00-\u9fff]")


def read_lines(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return {name: read_lines(SAMPLE_DIR / f"{name}.jsonl") for name in FILES}


def user_text(message: dict) -> str:
    """A user turn without its think switch."""
    return message["content"].removesuffix(THINK_SUFFIX).removesuffix(NO_THINK_SUFFIX)


def evaluate(expression: str) -> Fraction:
    """Exact value of an arithmetic expression of numbers, + - * / and parentheses (nothing else is accepted)."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return Fraction(str(node.value))
        raise ValueError(f"unexpected {ast.dump(node)} in {expression!r}")

    return walk(ast.parse(expression, mode="eval").body)


def check_equations(text: str) -> int:
    """Asserts every "a op b = c" in text is exact; returns how many there were."""
    ops = {"+": operator.add, "-": operator.sub, "×": operator.mul, "÷": operator.truediv}
    matches = EQUATION.findall(text)
    for a, op, b, c in matches:
        assert ops[op](Fraction(a), Fraction(b)) == Fraction(c), f"wrong arithmetic {a} {op} {b} = {c} in {text!r}"
    return len(matches)


def check_answer_follows(working: str, content: str) -> None:
    """An answer sentence must state the result of the last equation worked out before it."""
    answer = ANSWER_SENTENCE.search(content)
    if answer:
        last = EQUATION.findall(working)[-1]
        assert Fraction(answer.group(1)) == Fraction(last[3]), f"answer does not follow from {working!r}"


def check_assistant(message: dict, thinking: bool) -> int:
    assert message["role"] == "assistant" and set(message) == {"role", "think", "content"}, message
    assert message["content"].strip(), message
    if thinking:
        assert message["think"].strip(), message
    else:
        assert message["think"] == " ", message
    check_answer_follows(message["think"] + " " + message["content"], message["content"])
    return check_equations(message["think"]) + check_equations(message["content"])


def test_regenerates_byte_identically(tmp_path):
    subprocess.run([sys.executable, str(SAMPLE_DIR / "make_sample_data.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True, timeout=60)
    for name in FILES:
        committed, regenerated = (SAMPLE_DIR / f"{name}.jsonl").read_bytes(), (tmp_path / f"{name}.jsonl").read_bytes()
        assert regenerated == committed, f"sample_data/{name}.jsonl differs from the generator's output; rerun it"


def test_sizes_splits_languages(data):
    total = sum((SAMPLE_DIR / f"{name}.jsonl").stat().st_size for name in FILES)
    assert 1e6 <= total <= 4e6, total
    for name, (low, high) in {"pretrain": (2000, 5000), "cot": (1500, 3000), "grpo": (1000, 2000),
                              "mix": (1200, 2000), "dpo": (1000, 2000)}.items():
        lines = data[name]
        assert low <= len(lines) <= high, (name, len(lines))
        assert all(line["split"] in ("train", "eval") for line in lines), name
        assert 0.07 <= sum(line["split"] == "eval" for line in lines) / len(lines) <= 0.13, name
        chinese = sum(bool(CJK.search(json.dumps(line, ensure_ascii=False))) for line in lines) / len(lines)
        assert 0.35 <= chinese <= 0.65, (name, chinese)
        texts = [json.dumps({k: v for k, v in line.items() if k != "split"}, sort_keys=True) for line in lines]
        assert len(set(texts)) == len(texts), f"{name} has repeated lines"


def test_pretrain(data):
    equations = 0
    for line in data["pretrain"]:
        assert set(line) == {"text", "split"} and line["text"].strip(), line
        equations += check_equations(line["text"])
    assert equations > 1000


def test_cot(data):
    equations = self_cognition = 0
    for line in data["cot"]:
        assert set(line) == {"messages", "split"}
        system, question, answer = line["messages"]
        assert system == {"role": "system", "content": " "}
        assert question["role"] == "user" and set(question) == {"role", "content"}
        assert not question["content"].endswith((THINK_SUFFIX, NO_THINK_SUFFIX)), "COT has no think switch"
        equations += check_assistant(answer, thinking=True)
        self_cognition += "Cortex" in answer["content"]
    assert equations > len(data["cot"]) and 10 <= self_cognition <= 0.1 * len(data["cot"])


def test_grpo(data):
    for line in data["grpo"]:
        assert set(line) == {"prompt", "answer", "expression", "split"}
        assert line["prompt"][0] == {"role": "system", "content": " "}
        assert line["prompt"][1]["role"] == "user" and len(line["prompt"]) == 2, "a prompt has no assistant turn"
        assert CANONICAL_NUMBER.fullmatch(line["answer"]), line["answer"]
        assert evaluate(line["expression"]) == Fraction(line["answer"]), line
        a, op, b = line["expression"].split()  # one operation of the tables up to 10 (make_sample_data.table_problem)
        assert op in "+-*/" and int(b) <= 10 and int(a) <= 100 and int(line["answer"]) <= 100, line
    assert {line["expression"].split()[1] for line in data["grpo"]} == set("+-*/")


def test_grpo_questions_are_new(data):
    """GRPO questions are distinct and never trained on by another stage's file."""
    questions = [line["prompt"][1]["content"] for line in data["grpo"]]
    assert len(set(questions)) == len(questions)
    elsewhere = {user_text(m) for name in ("cot", "mix") for line in data[name] for m in line["messages"]
                 if m["role"] == "user"}
    elsewhere |= {user_text(m) for line in data["dpo"] for m in line["chosen"] if m["role"] == "user"}
    assert not set(questions) & elsewhere
    solved = {q for line in data["pretrain"] for q in SOLVED_PROBLEM.findall(line["text"])}
    assert len(solved) > 1000 and not set(questions) & solved


def test_mix(data):
    thinking = two_turns = 0
    for line in data["mix"]:
        messages = line["messages"]
        assert set(line) == {"messages", "split"} and messages[0] == {"role": "system", "content": " "}
        assert len(messages) in (3, 5)
        two_turns += len(messages) == 5
        for question, answer in zip(messages[1::2], messages[2::2]):
            assert question["role"] == "user" and question["content"].endswith((THINK_SUFFIX, NO_THINK_SUFFIX))
            think = question["content"].endswith(THINK_SUFFIX)
            thinking += think
            check_assistant(answer, thinking=think)
    turns = sum((len(line["messages"]) - 1) // 2 for line in data["mix"])
    assert 0.4 <= thinking / turns <= 0.6 and two_turns >= 0.1 * len(data["mix"])


def test_dpo(data):
    for line in data["dpo"]:
        assert set(line) == {"chosen", "rejected", "split"}
        chosen, rejected = line["chosen"], line["rejected"]
        assert chosen[:-1] == rejected[:-1], "chosen and rejected share the prompt"
        assert chosen[-1]["content"] != rejected[-1]["content"]
        assert chosen[0] == {"role": "system", "content": " "} and len(chosen) in (3, 5)
        for question in chosen[1::2]:
            assert question["role"] == "user" and question["content"].endswith(NO_THINK_SUFFIX)
        for answer in chosen[2::2]:
            check_assistant(answer, thinking=False)
        assert rejected[-1]["role"] == "assistant" and rejected[-1]["think"] == " "
