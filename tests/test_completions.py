"""/v1/completions and the tokenizer endpoints (serving/completions.py) over HTTP, and lm-evaluation-harness's
`local-completions` model scoring the live server on the local task in tests/data/lm_eval_task."""

import json
import math
from pathlib import Path

import pytest
import torch

from model import generate
from test_app_server import model, post, server, single_torch_thread, tokenizer  # noqa: F401  (fixtures: the autouse one, tokenizer, model, server)

REPO_ROOT = Path(__file__).resolve().parents[1]
LM_EVAL_TASK_DIR = REPO_ROOT / "tests" / "data" / "lm_eval_task"


def complete(base: str, body: dict) -> dict:
    status, _, text = post(base, "/v1/completions", body)
    assert status == 200, text
    return json.loads(text)


def own_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, V): the model's log-probabilities of each next token, computed directly."""
    with torch.inference_mode():
        return model(torch.tensor([ids]))["logits"][0, :-1].float().log_softmax(dim=-1)


def test_echo_logprobs_are_the_models_own_and_generation_follows_greedy(server, model, tokenizer):
    base, _ = server
    ids = tokenizer.encode("Tom has 3 apples and buys 2 more.")
    reply = complete(base, {"prompt": ids, "echo": True, "logprobs": 3, "max_tokens": 0})
    choice = reply["choices"][0]
    logprobs, expected = choice["logprobs"], own_logprobs(model, ids)
    assert choice["text"] == tokenizer.decode(ids) and choice["finish_reason"] == "length"
    assert reply["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids),
                              "prompt_tokens_details": {"cached_tokens": 0}}  # prompt logprobs: prefilled whole
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert len(logprobs["tokens"]) == len(ids) and "".join(logprobs["tokens"]) == choice["text"]
    got = torch.tensor(logprobs["token_logprobs"][1:])
    assert torch.allclose(got, expected.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0], atol=1e-5)
    for position, top in enumerate(logprobs["top_logprobs"][1:]):
        best = expected[position].topk(3).values.tolist()  # tokens of the same text share a key, so <= 3 entries
        assert max(top.values()) == pytest.approx(best[0], abs=1e-5)
        assert all(any(abs(value - b) < 1e-5 for b in best) for value in top.values())
    tokens = logprobs["tokens"]
    assert logprobs["text_offset"][:3] == [0, len(tokens[0]), len(tokens[0] + tokens[1])]

    # text prompts, a list of them, greedy generation: what model.generate makes
    prompts = ["Once upon a time", "The cat"]
    reply = complete(base, {"prompt": prompts, "max_tokens": 6, "temperature": 0, "logprobs": 0})
    for index, (prompt, choice) in enumerate(zip(prompts, reply["choices"])):
        greedy = generate(model, tokenizer.encode(prompt), max_new_tokens=6, stop_token_ids=[tokenizer.eos_id])
        assert choice["index"] == index and choice["text"] == tokenizer.decode(greedy, skip_special_tokens=True)
        assert len(choice["logprobs"]["tokens"]) == len(greedy)
        assert all(top == {} for top in choice["logprobs"]["top_logprobs"])  # logprobs 0: the token's own only
    assert reply["usage"]["completion_tokens"] == 12


def test_stop_strings_and_seeds(server, tokenizer):
    base, _ = server
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    whole = complete(base, body)["choices"][0]["text"]
    stop = whole[4:7]
    cut = complete(base, {**body, "stop": [stop, "never appears"]})["choices"][0]
    assert cut["text"] == whole[:whole.index(stop)] and cut["finish_reason"] == "stop"
    sampled = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0}
    first, second = (complete(base, {**sampled, "seed": 7})["choices"][0]["text"] for _ in range(2))
    assert first == second != complete(base, {**sampled, "seed": 8})["choices"][0]["text"]


def test_tokenizer_endpoints_and_bad_requests(server, tokenizer):
    base, _ = server
    status, _, text = post(base, "/tokenize", {"prompt": "Hello world", "add_special_tokens": False})
    tokens = json.loads(text)["tokens"]
    assert status == 200 and tokens == tokenizer.encode("Hello world")
    status, _, text = post(base, "/detokenize", {"tokens": tokens})
    assert status == 200 and json.loads(text) == {"prompt": "Hello world"}
    status, _, text = post(base, "/tokenizer_info", method="GET")
    assert status == 200 and json.loads(text)["eos_token"] == "</s>"
    for body, status, message in [
        ({}, 400, "'prompt' is missing"),
        ({"prompt": [5, 99999]}, 400, "must be a token id"),
        ({"prompt": ""}, 400, "is empty"),
        ({"prompt": "x", "logprobs": 21}, 400, "between 0 and 20"),
        ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"prompt": "x", "stream": True}, 400, "'stream' is not supported"),
        ({"prompt": "word " * 300}, 400, "the context holds 256"),
        ({"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
    ]:
        got, _, text = post(base, "/v1/completions", body)
        assert got == status and message in json.loads(text)["error"]["message"], (body, text)
    got, _, text = post(base, "/detokenize", {"tokens": [-1]})
    assert got == 400 and "token ids" in json.loads(text)["data"]


def test_lm_eval_local_completions_scores_the_server_with_the_models_own_logprobs(server, model, tokenizer,
                                                                                 monkeypatch):
    """A loglikelihood task (each choice scored: the model's own log-probabilities) and a generation task (greedy
    text up to the end of the line)."""
    base, _ = server
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm-eval[api])")
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(REPO_ROOT)  # the task's data_files path is relative to the repository root
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={base}/v1/completions,model=cortex-tiny,tokenizer_backend=remote,max_length=256",
        tasks=["cortex_mini_mc", "cortex_mini_gen"], log_samples=True,
        task_manager=TaskManager(include_path=str(LM_EVAL_TASK_DIR), include_defaults=False))
    samples = results["samples"]["cortex_mini_mc"]
    docs = [json.loads(line) for line in (LM_EVAL_TASK_DIR / "cortex_mini_mc.jsonl").read_text().splitlines()]
    assert len(samples) == len(docs)
    correct = 0
    for sample in samples:
        scores = []
        for (context, continuation), (loglikelihood, _) in zip(sample["arguments"], sample["filtered_resps"]):
            context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
            expected = own_logprobs(model, context_ids + continuation_ids)[len(context_ids) - 1:]
            expected = expected.gather(-1, torch.tensor(continuation_ids)[:, None]).sum().item()
            assert loglikelihood == pytest.approx(expected, abs=1e-4)
            scores.append(expected)
        correct += max(range(len(scores)), key=scores.__getitem__) == sample["target"]
    assert results["results"]["cortex_mini_mc"]["acc,none"] == pytest.approx(correct / len(docs))
    assert not math.isnan(results["results"]["cortex_mini_mc"]["acc_norm,none"])

    generations = results["samples"]["cortex_mini_gen"]
    assert len(generations) == len(docs)
    for sample in generations:
        context, settings = sample["arguments"][0]
        greedy = generate(model, tokenizer.encode(context), max_new_tokens=settings["max_gen_toks"],
                          stop_token_ids=[tokenizer.eos_id])
        assert sample["resps"][0][0] == tokenizer.decode(greedy, skip_special_tokens=True).split("\n")[0]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a request into token ids (TemplateLM._encode_pair): trailing spaces of the context move to
    the continuation, and the continuation is what encoding the whole adds to the context's ids."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, context_ids = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]
