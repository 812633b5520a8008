"""The OpenAI chat fields through the real openai client: seed, top_p 0, presence/frequency penalties, stop strings,
model names, and the messages OpenAI allows (a later system message, a trailing assistant prefill)."""

import json
import threading

import pytest
import torch

from serving.chat import build_prompt
from serving.engine import GenerationRequest, SamplingParams
from serving.openai_api import parse_openai_request
from test_app_engine import collect
from test_app_server import client, model, post, server, single_torch_thread, tokenizer  # noqa: F401  (fixtures: the autouse one, tokenizer, model, server, client)

openai = pytest.importorskip("openai", reason="the openai package is not installed (pip install openai)")

NO_THINK = {"thinking": False}


def reply(client, content: str = "Tell me a story.", **kwargs) -> str:
    kwargs = {"max_tokens": 24, "extra_body": NO_THINK, **kwargs}
    response = client.chat.completions.create(model="cortex-tiny", messages=[{"role": "user", "content": content}],
                                              **kwargs)
    return response.choices[0].message.content


def test_a_seed_gives_the_same_reply_alone_and_beside_other_requests(client):
    alone = reply(client, seed=11, temperature=1.0)
    assert reply(client, seed=11, temperature=1.0) == alone != reply(client, seed=12, temperature=1.0)

    def noise(i):  # unseeded sampling in the same batch
        reply(client, f"Something else {i}", temperature=1.5, top_p=0.9, max_tokens=40)

    threads = [threading.Thread(target=noise, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    together = reply(client, seed=11, temperature=1.0)
    for thread in threads:
        thread.join(60)
    assert together == alone


def test_top_p_zero_is_greedy(client):
    assert reply(client, temperature=1.0, top_p=0) == reply(client, temperature=0)


def test_penalties_follow_openais_formula_on_the_replys_token_counts(server, model, tokenizer, client):
    _, engine = server
    prompt = tokenizer.encode("the the the the the")  # greedy repeats tokens here, so the penalties change the reply
    presence, frequency = 0.5, 1.5
    events, _ = collect(engine.submit(GenerationRequest(
        prompt, SamplingParams(temperature=0.0, presence_penalty=presence, frequency_penalty=frequency,
                               max_new_tokens=16), thinking=False)))
    expected, counts = [], torch.zeros(model.config.vocab_size)
    with torch.inference_mode():
        for _ in range(16):
            logits = model(torch.tensor([prompt + expected]))["logits"][0, -1].float()
            token = int((logits - presence * (counts > 0) - frequency * counts).argmax())
            expected.append(token)
            counts[token] += 1
            if token == tokenizer.eos_id:
                break
    plain, _ = collect(engine.submit(GenerationRequest(prompt, SamplingParams(temperature=0.0, max_new_tokens=16),
                                                       thinking=False)))
    assert [e.token_id for e in events] == expected != [e.token_id for e in plain]
    assert reply(client, temperature=0, presence_penalty=-2, frequency_penalty=2) != reply(client, temperature=0)
    for name, value in (("presence_penalty", 2.5), ("frequency_penalty", -2.01)):
        with pytest.raises(openai.BadRequestError, match=f"'{name}' must be between -2.0 and 2.0"):
            reply(client, **{name: value})


def test_stop_strings_end_the_answer_streamed_or_not(client):
    # a long reply, so that the few tokens the engine decodes before the reader's cancel lands are far from its end
    kwargs = dict(model="cortex-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=256, temperature=0,
                  extra_body=NO_THINK)
    greedy = client.chat.completions.create(**kwargs)
    assert greedy.choices[0].finish_reason == "length"
    text = greedy.choices[0].message.content
    stop = text[6:9]
    whole = client.chat.completions.create(stop=stop, **kwargs)
    assert whole.choices[0].message.content == text[:text.index(stop)] and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens < greedy.usage.completion_tokens / 2  # the slot was freed early
    chunks = list(client.chat.completions.create(stop=["never in the reply", stop], stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text[:text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    unstopped = client.chat.completions.create(stop=[], **kwargs)
    assert unstopped.choices[0].message.content == text
    assert unstopped.choices[0].finish_reason == greedy.choices[0].finish_reason
    with pytest.raises(openai.BadRequestError, match="at most 4"):
        client.chat.completions.create(stop=list("abcde"), **kwargs)
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.chat.completions.create(stop=[""], **kwargs)


def test_unknown_models_are_404_model_not_found(client, server):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert err.value.code == "model_not_found" and "cortex-tiny" in err.value.message
    assert client.models.retrieve("cortex-tiny").id == "cortex-tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_later_system_messages_and_a_trailing_assistant_prefill(client, server, tokenizer):
    def prompt_text(messages):
        chat, _, _ = parse_openai_request({"messages": messages}, 256)
        return tokenizer.decode(build_prompt(tokenizer, chat.messages, chat.thinking, 256)[0]), chat

    history = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q /no think"},
               {"role": "assistant", "content": "A"}, {"role": "system", "content": "S2"},
               {"role": "user", "content": "Q2"}]
    text, chat = prompt_text([*history, {"role": "assistant", "content": "The answer is"}])
    assert text == ("<system>S</s><user>Q /no think</s><assistant><think> </think><answer>A</answer></s>"
                    "<system>S2</s><user>Q2 /no think</s><assistant><think> </think><answer>The answer is")
    assert not chat.thinking
    text, chat = prompt_text([*history, {"role": "assistant", "content": None, "reasoning_content": "Let me see"}])
    assert text.endswith("<system>S2</s><user>Q2 /think</s><assistant><think>Let me see") and chat.thinking
    text, chat = prompt_text([*history, {"role": "assistant", "content": ""}])  # an empty prefill: the usual prompt
    assert text.endswith("<system>S2</s><user>Q2 /think</s><assistant><think>") and chat.thinking

    # the model continues the prefill: the reply is the continuation alone, as a raw completion of the same prompt
    messages = [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "The answer is"}]
    continued = client.chat.completions.create(model="cortex-tiny", messages=messages, temperature=0, max_tokens=12)
    chat, _, _ = parse_openai_request({"messages": messages}, 256)
    ids = build_prompt(tokenizer, chat.messages, chat.thinking, 256)[0]
    status, _, raw = post(server[0], "/v1/completions", {"prompt": ids, "temperature": 0, "max_tokens": 12})
    assert status == 200 and continued.choices[0].message.content == json.loads(raw)["choices"][0]["text"]


def test_the_next_turn_of_a_chat_reports_the_prompt_tokens_it_reused(client):
    first_turn = [{"role": "user", "content": "Tell me a story about a fox and a crow, please."}]
    first = client.chat.completions.create(model="cortex-tiny", messages=first_turn, max_tokens=16, temperature=0,
                                           extra_body=NO_THINK)
    answer = first.choices[0].message.content
    second = client.chat.completions.create(
        model="cortex-tiny", messages=[*first_turn, {"role": "assistant", "content": answer},
                                       {"role": "user", "content": "And then?"}],
        max_tokens=4, temperature=0, extra_body=NO_THINK)
    # the whole first prompt, up to the template's "<answer>" that opens the reply in the history (the tiny
    # untrained model's first token was another)
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens
