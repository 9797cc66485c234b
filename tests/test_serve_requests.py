"""``rinna serve``'s request validation as pure functions: JSON in, ``(prompt_ids, Sampling)`` out, no FastAPI."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from rinna_cli.contract import Sampling
from rinna_cli.prompt import encode_newlines
from rinna_cli.serve.requests import UNSUPPORTED, ApiError, Requests
from rinna_cli.session import Conversation

DEFAULTS = Sampling(temperature=0.7, top_p=1.0, top_k=50, repetition_penalty=1.0, max_new_tokens=128, seed=-1)


@pytest.fixture
def requests(memorized_tokenizer) -> Requests:
    return Requests(memorized_tokenizer, "rinna-test", 2048, DEFAULTS)


def refused(parse, body: dict) -> ApiError:
    with pytest.raises(ApiError) as err:
        parse(body)
    return err.value


def test_a_text_prompt_with_the_defaults(requests, memorized_tokenizer):
    parsed = requests.completion({"prompt": "ユーザー: 猫\nシステム: "})
    assert parsed.prompt_ids == memorized_tokenizer.encode(encode_newlines("ユーザー: 猫\nシステム: "))
    assert parsed.sampling == DEFAULTS
    assert (parsed.stream, parsed.with_ids, parsed.include_usage) == (False, False, False)


def test_ids_options_and_flags(requests):
    body = {
        "prompt": [[5, 6, 7]], "temperature": 0, "top_k": -1, "seed": 9, "max_tokens": 10,
        "stream": True, "return_token_ids": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    parsed = requests.completion(body)
    assert parsed.prompt_ids == [5, 6, 7]
    assert parsed.sampling == replace(DEFAULTS, temperature=0.0, top_k=0, seed=9, max_new_tokens=10)
    assert (parsed.stream, parsed.with_ids, parsed.include_usage) == (True, True, True)


def test_the_default_max_tokens_shrinks_to_the_window(requests):
    assert requests.completion({"prompt": [5] * 2000}).sampling.max_new_tokens == 48


def test_chat_messages_make_the_model_cards_prompt(requests, memorized_tokenizer):
    messages = [
        {"role": "user", "content": "こんにちは"},
        {"role": "assistant", "content": "はい。"},
        {"role": "user", "content": [{"type": "text", "text": "猫"}, {"type": "text", "text": "です"}]},
    ]
    parsed = requests.chat({"messages": messages, "max_completion_tokens": 7})
    conversation = Conversation(memorized_tokenizer)
    conversation.add_user("こんにちは")
    conversation.add_reply("はい。")
    conversation.add_user("猫です")
    assert parsed.prompt_ids == conversation.prompt_ids() and parsed.sampling.max_new_tokens == 7


@pytest.mark.parametrize("field", sorted(UNSUPPORTED))
def test_every_unsupported_field_is_refused_by_name(requests, field):
    kind, _, message, where = UNSUPPORTED[field]
    value = {int: 2, float: 0.5, bool: True, str: "x", dict: {"1": 2}, object: [{"type": "function"}]}[kind]
    parse = requests.chat if where == "chat" else requests.completion
    body = {"messages": [{"role": "user", "content": "猫"}]} if where == "chat" else {"prompt": "猫"}
    err = refused(parse, {**body, field: value})
    assert (err.status, err.message, err.param) == (400, message, field)


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        ({"prompt": "x", "max_tokens": 5000}, "max_tokens = 5000 is out of range; allowed: 1 <= max_tokens < 2048", "max_tokens"),
        ({"prompt": [5] * 2000, "max_tokens": 100}, "the prompt is 2000 tokens; with max_tokens = 100 at most 1948 fit in the model's 2048-token window", "max_tokens"),
        ({"prompt": [5] * 2048}, "the prompt is 2048 tokens; at most 2047 fit in the model's 2048-token window, leaving one for the reply", "prompt"),  # no max_tokens sent: none named
        ({"prompt": "x", "max_tokens": 0}, "max_tokens = 0 is out of range; allowed: max_tokens >= 1", "max_tokens"),
        ({"prompt": "x", "temperature": "hot"}, 'temperature must be a number, not string "hot"', "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p = 0 is out of range; allowed: 0.0 < top_p <= 1.0 (1 = off)", "top_p"),
        ({"prompt": "x", "model": 4}, "model must be a string, not integer 4", "model"),
        ({"prompt": "x", "stop": ["\n"]}, "stop strings are not supported; generation always ends at </s>", "stop"),
        ({"prompt": [99999]}, "prompt token id 99999 is outside the tokenizer's 482 ids", "prompt"),
        ({"prompt": ["a", "b"]}, "one prompt per request: send the others separately", "prompt"),
        ({}, "prompt is required: text, or an array of token ids", "prompt"),
    ],
)  # fmt: skip
def test_refusals_name_the_field(requests, body, message, param):
    err = refused(requests.completion, body)
    assert (err.message, err.param) == (message, param) and err.status in (400, 404)


def test_any_model_name_means_the_served_model(requests):
    assert requests.completion({"prompt": "x", "model": "gpt-4o"}).prompt_ids == requests.completion({"prompt": "x"}).prompt_ids


@pytest.mark.parametrize(
    ("body", "field", "param"),
    [
        ('{"prompt": "\\ud800"}', "prompt", "prompt"),
        ('{"prompt": ["a\\udc80b"]}', "prompt[0]", "prompt"),
        ('{"prompt": "x", "model": "\\udfff"}', "model", "model"),
        ('{"prompt": "x", "stop": ["</s>", "\\ud83d"]}', "stop[1]", "stop"),
        ('{"prompt": "x", "\\ud800": 1}', "a field name", None),
        ('{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content", "messages"),
        ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}', "messages[0].content[0].text", "messages"),
        ('{"messages": [{"role": "\\ud800", "content": "x"}]}', "messages[0].role", "messages"),
    ],
)  # fmt: skip
def test_a_lone_surrogate_is_a_400_naming_the_field(requests, body, field, param):
    data = json.loads(body)  # JSON's \ud800 escape: valid JSON, not valid Unicode
    parse = requests.chat if "messages" in data else requests.completion
    err = refused(parse, data)
    code = re.search(r"\\u(d[89a-f][0-9a-f]{2})", body).group(1)
    assert (err.status, err.param) == (400, param)
    assert err.message == f"{field} holds a lone surrogate (\\u{code}), which is not a Unicode character; send UTF-8 text"


def test_system_messages_merge_into_the_next_user_message(memorized_tokenizer):
    merging = Requests(memorized_tokenizer, "rinna-test", 2048, DEFAULTS, system_messages="merge")
    messages = [
        {"role": "system", "content": "短く答えて。"},
        {"role": "developer", "content": "丁寧に。\n敬語で。"},
        {"role": "user", "content": "猫は?"},
        {"role": "assistant", "content": "動物です。"},
        {"role": "system", "content": ""},  # empty: nothing added
        {"role": "user", "content": "犬は?"},
    ]
    parsed = merging.chat({"messages": messages})
    expected = "ユーザー: 短く答えて。<NL><NL>丁寧に。<NL>敬語で。<NL><NL>猫は?<NL>システム: 動物です。<NL>ユーザー: 犬は?<NL>システム: "
    assert memorized_tokenizer.decode(parsed.prompt_ids) == expected
    conversation = Conversation(memorized_tokenizer)
    conversation.add_user("短く答えて。\n\n丁寧に。\n敬語で。\n\n猫は?")
    conversation.add_reply("動物です。")
    conversation.add_user("犬は?")
    assert parsed.prompt_ids == conversation.prompt_ids()
    last = refused(merging.chat, {"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]})
    assert (last.message, last.param) == ("a system message must be followed by a user message", "messages")


def test_chat_refusals(requests):
    system = refused(requests.chat, {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]})
    assert (system.status, system.param) == (400, "messages")
    assert system.message == (
        "messages[0]: rinna has no system turn (its format knows only ユーザー and システム); start the server "
        "with --system-messages merge to put system text at the start of the next user message, or put the "
        "instructions in the first user message"
    )
    last = refused(
        requests.chat, {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    )
    assert last.message == "the last message must be the user's: rinna answers it as システム"
