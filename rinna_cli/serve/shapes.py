"""The OpenAI shapes of answers, built in one place for ``/v1/completions`` and ``/v1/chat/completions``."""

from __future__ import annotations

import json
import time
import uuid

from rinna_cli.contract import Reply
from rinna_cli.serve.requests import Parsed


def sse(data: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def usage(reply: Reply) -> dict:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": reply.prompt_tokens - reply.prefilled_tokens},
    }


def finish_reason(reply: Reply) -> str:
    return {"stop": "stop", "length": "length"}.get(reply.finish_reason, "abort")


def failure(error: str | None) -> dict:
    """The event a stream ends with when generation failed (or the server shut down)."""
    message = f"generation failed: {error or 'the server is shutting down'}"
    return {"error": {"message": message, "type": "server_error", "code": 500}}


class Shapes:
    """The bodies of one answer: whole (:meth:`response`) or streamed (:meth:`opening`, :meth:`chunk`, :meth:`closing`)."""

    def __init__(self, chat: bool, model: str, request: Parsed, eos: int):
        self.chat = chat
        self.model = model
        self.request = request
        self.eos = eos
        self.ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._first = True

    def _body(self, kind: str, choices: list, **extra) -> dict:
        return {
            "id": self.ident,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _reply_ids(self, reply: Reply) -> list[int]:
        return list(reply.ids) + ([self.eos] if reply.finish_reason == "stop" else [])

    def response(self, reply: Reply) -> dict:
        """The whole answer of a request without ``stream``."""
        with_ids, prompt_ids = self.request.with_ids, self.request.prompt_ids
        choice: dict = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": reply.text}
        else:
            choice["text"] = reply.text
        choice.update(logprobs=None, finish_reason=finish_reason(reply))
        extra: dict = {"usage": usage(reply)}
        if with_ids and self.chat:
            choice["token_ids"] = self._reply_ids(reply)
            extra["prompt_token_ids"] = prompt_ids
        elif with_ids:
            choice.update(prompt_token_ids=prompt_ids, token_ids=self._reply_ids(reply))
        return self._body("chat.completion" if self.chat else "text_completion", [choice], **extra)

    def opening(self) -> list[dict]:
        """What a stream starts with: the assistant's role (chat only)."""
        if not self.chat:
            return []
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        extra = {"prompt_token_ids": self.request.prompt_ids} if self.request.with_ids else {}
        self._first = False
        return [self._body(self._chunk_kind(), [choice], **extra)]

    def chunk(self, text: str, ids: list[int]) -> dict:
        """One streamed piece of the reply."""
        choice: dict = {"index": 0, **({"delta": {"content": text}} if self.chat else {"text": text})}
        choice.update(logprobs=None, finish_reason=None)
        if self.request.with_ids:
            choice["token_ids"] = ids
            if self._first:
                choice["prompt_token_ids"] = self.request.prompt_ids
        self._first = False
        return self._body(self._chunk_kind(), [choice])

    def closing(self, reply: Reply) -> list[dict]:
        """What a stream ends with: the finish reason, then the usage if asked for."""
        if self.chat:
            choice: dict = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason(reply)}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason(reply)}
            if self.request.with_ids:
                choice["token_ids"] = []
        bodies = [self._body(self._chunk_kind(), [choice])]
        if self.request.include_usage:
            bodies.append(self._body(self._chunk_kind(), [], usage=usage(reply)))
        return bodies
