"""Request validation for ``rinna serve``, as pure functions: JSON in, ``(prompt_ids, Sampling)`` out.

No FastAPI here, so every rule is testable on a dict. Fields rinna cannot honour
are refused with a 400 naming them (:data:`UNSUPPORTED`), never silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Callable

from rinna_cli import config
from rinna_cli.contract import Sampling, check_fits
from rinna_cli.errors import UsageError
from rinna_cli.prompt import USER, encode_newlines
from rinna_cli.session import Conversation
from rinna_cli.tokenizer import Tokenizer


class ApiError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param


_JSON_TYPES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
}
# request field -> (Sampling field, JSON type)
SAMPLING_FIELDS = {
    "temperature": ("temperature", float),
    "top_p": ("top_p", float),
    "top_k": ("top_k", int),
    "repetition_penalty": ("repetition_penalty", float),
    "seed": ("seed", int),
    "max_tokens": ("max_new_tokens", int),
}


def _no_tools(value: object) -> bool:
    return value in (None, [], {}, "none", "auto")


# field -> (JSON type, whether a value is one rinna can honour, the message, endpoints: "" both, or the one)
UNSUPPORTED: dict[str, tuple[type, Callable[[object], bool], str, str]] = {
    "n": (int, lambda v: v in (None, 1), "n must be 1: one reply per request", ""),
    "best_of": (int, lambda v: v in (None, 1), "best_of must be 1", "completions"),
    "echo": (bool, lambda v: not v, "echo is not supported", "completions"),
    "suffix": (str, lambda v: not v, "suffix is not supported", "completions"),
    "logprobs": (
        object,
        lambda v: v in (None, False),
        'logprobs are not supported; send "return_token_ids": true for the token ids',
        "",
    ),
    "presence_penalty": (
        float,
        lambda v: not v,
        "presence_penalty is not supported; use repetition_penalty (1 = off)",
        "",
    ),
    "frequency_penalty": (
        float,
        lambda v: not v,
        "frequency_penalty is not supported; use repetition_penalty (1 = off)",
        "",
    ),
    "logit_bias": (dict, lambda v: not v, "logit_bias is not supported", ""),
    "tools": (object, _no_tools, "tools is not supported by rinna", "chat"),
    "functions": (object, _no_tools, "functions is not supported by rinna", "chat"),
    "tool_choice": (object, _no_tools, "tool_choice is not supported by rinna", "chat"),
    "function_call": (object, _no_tools, "function_call is not supported by rinna", "chat"),
    "response_format": (
        object,
        lambda v: _no_tools(v) or v == {"type": "text"},
        "response_format is not supported by rinna",
        "chat",
    ),
}


def check_unicode(data: object, where: str = "") -> None:
    """Refuse strings that are not Unicode text, naming the field (``messages[0].content``).

    JSON's ``"\\ud800"`` escape decodes to a lone surrogate, which neither UTF-8 nor the tokenizer can take.
    """
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError as err:
            top = where.split(".")[0].split("[")[0]
            raise ApiError(
                400,
                f"{where or 'a field name'} holds a lone surrogate (\\u{ord(data[err.start]):04x}), "
                "which is not a Unicode character; send UTF-8 text",
                param=top or None,
            ) from None
    elif isinstance(data, list):
        for index, item in enumerate(data):
            check_unicode(item, f"{where}[{index}]")
    elif isinstance(data, dict):
        for key, value in data.items():
            check_unicode(key, "")
            check_unicode(value, f"{where}.{key}" if where else key)


def type_name(value: object) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _is(value: object, kind: type) -> bool:
    if kind is object:
        return True
    if kind is bool:
        return isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def typed(data: dict, key: str, kind: type, default=None):
    """``data[key]`` checked to be of JSON type ``kind`` (null or missing = ``default``)."""
    value = data.get(key)
    if value is None:
        return default
    if not _is(value, kind):
        shown = json.dumps(value, ensure_ascii=False)
        shown = shown if len(shown) <= 60 else shown[:59] + "…"
        raise ApiError(400, f"{key} must be {_JSON_TYPES[kind]}, not {type_name(value)} {shown}", param=key)
    return value


@dataclass(frozen=True)
class Parsed:
    """A checked request: what to generate, how, and how to answer."""

    prompt_ids: list[int]
    sampling: Sampling
    stream: bool
    with_ids: bool  # "return_token_ids": the prompt's and the reply's ids in the answer
    include_usage: bool  # stream_options.include_usage


@dataclass(frozen=True)
class Requests:
    """Turns request bodies into :class:`Parsed` for one served model."""

    tokenizer: Tokenizer
    name: str  # the served model's name (any name in a request means it: one model is served)
    window: int
    defaults: Sampling  # for the options a request leaves out
    system_messages: str = "reject"  # or "merge": see :meth:`conversation`

    @property
    def eos(self) -> int:
        return self.tokenizer.special.eos

    def completion(self, data: dict) -> Parsed:
        """A ``POST /v1/completions`` body."""
        self._common(data, "completions")
        flags = _flags(data)
        prompt_ids = self.prompt_ids(data)
        return Parsed(prompt_ids, self.sampling(data, len(prompt_ids), chat=False), *flags)

    def chat(self, data: dict) -> Parsed:
        """A ``POST /v1/chat/completions`` body."""
        self._common(data, "chat")
        flags = _flags(data)
        prompt_ids = self.conversation(data).prompt_ids()
        return Parsed(prompt_ids, self.sampling(data, len(prompt_ids), chat=True), *flags)

    def _common(self, data: dict, endpoint: str) -> None:
        check_unicode(data)
        typed(data, "model", str)  # any name: the one model served answers (clients send their own names)
        for key, (kind, honoured, message, where) in UNSUPPORTED.items():
            if where in ("", endpoint) and not honoured(typed(data, key, kind)):
                raise ApiError(400, message, param=key)
        self._check_stops(data)

    def _check_stops(self, data: dict) -> None:
        eos_piece = self.tokenizer.sp.id_to_piece(self.eos)
        stop = data.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else [] if stop is None else None
        if stops is None or not all(isinstance(s, str) for s in stops):
            raise ApiError(400, "stop must be a string or an array of strings", param="stop")
        if any(s not in ("", eos_piece) for s in stops):
            raise ApiError(400, f"stop strings are not supported; generation always ends at {eos_piece}", param="stop")
        if any(i != self.eos for i in typed(data, "stop_token_ids", list, [])):
            raise ApiError(
                400,
                f"stop_token_ids may only hold {self.eos} ({eos_piece}), where generation always ends",
                param="stop_token_ids",
            )

    def sampling(self, data: dict, prompt_tokens: int, chat: bool) -> Sampling:
        """The request's sampling options over the server's defaults, checked (the window rule included)."""
        fields = dict(SAMPLING_FIELDS)
        if chat and data.get("max_completion_tokens") is not None:
            fields["max_completion_tokens"] = fields.pop("max_tokens")
        given: dict = {}
        limit_name = "max_tokens"
        for field, (key, kind) in fields.items():
            value = typed(data, field, kind)
            if value is None:
                continue
            if key == "top_k" and value == -1:
                value = 0  # vLLM's "off"
            if key == "max_new_tokens":
                if value < 1:
                    raise ApiError(400, f"{field} = {value} is out of range; allowed: {field} >= 1", param=field)
                limit_name = field  # the model's window bounds it (below), not rinna's configured range
            else:
                try:
                    value = config.check(key, value)
                except UsageError as err:  # the message names rinna's setting: the request's field too where it differs
                    message = str(err) if key == field else f"{field}: {err}"
                    raise ApiError(400, message, param=field) from None
            given[key] = value
        sampling = replace(self.defaults, **given)
        if "max_new_tokens" not in given:  # the default shrinks to what the window leaves
            if prompt_tokens >= self.window:  # told without a limit the client never sent
                raise ApiError(
                    400,
                    f"the prompt is {prompt_tokens} tokens; at most {self.window - 1} fit in the model's "
                    f"{self.window}-token window, leaving one for the reply",
                    param="prompt",
                )
            sampling = replace(sampling, max_new_tokens=min(sampling.max_new_tokens, self.window - prompt_tokens))
        try:
            check_fits(prompt_tokens, sampling.max_new_tokens, self.window, limit_name)
        except UsageError as err:
            raise ApiError(400, str(err), param=limit_name if "max_new_tokens" in given else "prompt") from None
        return sampling

    def prompt_ids(self, data: dict) -> list[int]:
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        tokenizer = self.tokenizer
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "prompt is empty", param="prompt")
            return tokenizer.encode(encode_newlines(prompt))
        if isinstance(prompt, list) and prompt and all(_is(i, int) for i in prompt):
            bad = next((i for i in prompt if not 0 <= i < tokenizer.vocab_size), None)
            if bad is not None:
                raise ApiError(
                    400, f"prompt token id {bad} is outside the tokenizer's {tokenizer.vocab_size} ids", param="prompt"
                )
            return list(prompt)
        if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
            raise ApiError(400, "one prompt per request: send the others separately", param="prompt")
        if prompt is None:
            raise ApiError(400, "prompt is required: text, or an array of token ids", param="prompt")
        raise ApiError(
            400, f"prompt must be a string or an array of token ids, not {type_name(prompt)}", param="prompt"
        )

    def conversation(self, data: dict) -> Conversation:
        """The messages as the card's turns. rinna has no system turn: with ``system_messages = "merge"`` the
        text of system (and developer) messages goes at the start of the next user message, followed by a
        blank line (``system + "\\n\\n" + user``, so ``<NL><NL>`` in the prompt); with ``"reject"`` they get a 400."""
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty array", param="messages")
        conversation = Conversation(self.tokenizer)
        system: list[str] = []  # system text waiting for the next user message
        for index, message in enumerate(messages):
            where = f"messages[{index}]"
            role, content = _message(message, where)
            if role in SYSTEM_ROLES:
                if self.system_messages != "merge":
                    raise ApiError(
                        400,
                        f"{where}: rinna has no {role} turn (its format knows only ユーザー and システム); "
                        "start the server with --system-messages merge to put system text at the start of the "
                        "next user message, or put the instructions in the first user message",
                        param="messages",
                    )
                if content:
                    system.append(content)
            elif role == "user":
                conversation.add_user("\n\n".join([*system, content]))
                system = []
            else:
                if system:
                    raise ApiError(
                        400, f"{where}: a system message must be followed by a user message", param="messages"
                    )
                conversation.add_reply(content)
        if system:
            raise ApiError(400, "a system message must be followed by a user message", param="messages")
        if conversation.turns[-1].speaker != USER:
            raise ApiError(400, "the last message must be the user's: rinna answers it as システム", param="messages")
        return conversation


SYSTEM_ROLES = ("system", "developer")
SYSTEM_MESSAGES = ("reject", "merge")  # what --system-messages may say


def _flags(data: dict) -> tuple[bool, bool, bool]:
    """``stream``, ``return_token_ids`` and ``stream_options.include_usage``."""
    stream = typed(data, "stream", bool, False)
    with_ids = typed(data, "return_token_ids", bool, False)
    include_usage = bool(typed(typed(data, "stream_options", dict, {}), "include_usage", bool, False))
    return stream, with_ids, include_usage


def _message(message: object, where: str) -> tuple[str, str]:
    """A chat message's role and text, checked."""
    if not isinstance(message, dict):
        raise ApiError(400, f"{where} must be an object with role and content", param="messages")
    role = message.get("role")
    if role not in ("user", "assistant", *SYSTEM_ROLES):
        raise ApiError(400, f"{where}: role must be user, assistant or system, not {role!r}", param="messages")
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"{where}: only text content is supported", param="messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"{where}: content must be a string, not {type_name(content)}", param="messages")
    return role, content
