"""The remote engine: the served model, the request body, and how the reply's token ids come back.

How the ids come back (:data:`MODES`), tried in this order on the first reply
(the answer is remembered for the rest of the process):

* ``ids``: ``"return_token_ids": true`` (vLLM >= 0.10.2, ``rinna serve``): every
  streamed choice carries the ``token_ids`` generated since the last chunk.
* ``logprobs``: ``"logprobs": 0, "return_tokens_as_token_ids": true``: the tokens of
  the logprobs are written ``token_id:N`` (older vLLM started with
  ``--return-tokens-as-token-ids``, or a vLLM that takes the request field).
* ``text``: used as it comes, with a one-time warning (the server's detokenizer
  decides spacing and byte-fallback characters).

The ids are decoded with ``--model``'s tokenizer, which must be the served model's.
What betrays another tokenizer is warned about once: a ``vocab_size`` in the model
list (``rinna serve`` sends it) that differs, or a reply of ids that decode to no text
(the warning names the served model when its name differs from ``--model``'s, which
alone proves nothing); an id outside the tokenizer cannot be shown and fails.
"""

from __future__ import annotations

import http.client
import re
from dataclasses import dataclass
from threading import Event
from typing import Callable, Iterable

from rinna_cli.contract import OnStep, Reply, Sampling, Step, Timing, check_fits, ignore_step
from rinna_cli.errors import UsageError
from rinna_cli.prompt import SYSTEM, encode_newlines, utterance
from rinna_cli.remote.transport import DEFAULT_TIMEOUT, DONE, Closer, EndpointError, Transport, one_line
from rinna_cli.render import warn as stderr_warning
from rinna_cli.streamer import ReplyDecoder, TextDecoder
from rinna_cli.tokenizer import Tokenizer

_TOKEN_ID = re.compile(r"token_id:(\d+)")


def _token_ids(choice: dict) -> object:
    return choice.get("token_ids")


def _logprob_ids(choice: dict) -> object:
    logprobs = choice.get("logprobs")
    tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
    if not isinstance(tokens, list):
        return None
    matches = [_TOKEN_ID.fullmatch(token) if isinstance(token, str) else None for token in tokens]
    return None if None in matches else [int(match.group(1)) for match in matches if match]


@dataclass(frozen=True)
class Mode:
    """One way of asking for the reply's token ids: the request fields, and where a streamed choice has them."""

    name: str
    fields: dict
    ids: Callable[[dict], object] | None  # None: text only
    fallback: str | None  # what to try next when the server ignores or refuses the fields
    same_stream: bool = False  # the fallback reads this very stream (its choices hold the text)


MODES = {
    mode.name: mode
    for mode in (
        Mode("ids", {"return_token_ids": True}, _token_ids, "logprobs"),
        Mode("logprobs", {"logprobs": 0, "return_tokens_as_token_ids": True}, _logprob_ids, "text", same_stream=True),
        Mode("text", {}, None, None),
    )
}


def _choice_ids(choice: dict, mode: Mode) -> list[int] | None:
    """The token ids a streamed choice carries in ``mode``, or None if it carries none that way."""
    ids = mode.ids(choice) if mode.ids else None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return None
    return ids


class _Reading:
    """What one streamed reply has brought so far."""

    def __init__(self, tokenizer: Tokenizer, mode: Mode, on_step: OnStep):
        self.mode = mode
        self.on_step = on_step
        self.decoder = ReplyDecoder(tokenizer)
        self.text_decoder = TextDecoder()
        self.received: list[int] = []
        self.finish: str | None = None
        self.usage: dict = {}
        self.done = False
        self.timing = Timing()

    def take_ids(self, ids: list[int]) -> None:
        if ids:
            self.timing.token()
        self.received.extend(ids)
        text = self.decoder.push(ids)
        if text or ids:
            self.on_step(Step(text, ids))

    def take_text(self, text: str) -> None:
        if text:
            self.timing.token()
        shown = self.text_decoder.push(text)
        if shown:
            self.on_step(Step(shown, []))

    def end(self) -> None:
        self.timing.end()
        shown = self.text_decoder.finish() if self.mode.ids is None else self.decoder.finish()
        if shown:
            self.on_step(Step(shown, []))

    def reply(self, tokenizer: Tokenizer, prompt_ids: list[int], interrupted: bool) -> Reply:
        """The reply as the local engine would count it."""
        eos = tokenizer.special.eos
        usage, finish, received = self.usage, self.finish, self.received
        if self.mode.ids is None:
            text = self.text_decoder.text
            ids = tokenizer.encode(utterance(SYSTEM, text))
            prefix = tokenizer.encode(f"{SYSTEM}: ")
            reply_ids = ids[len(prefix) :] if ids[: len(prefix)] == prefix else tokenizer.encode(encode_newlines(text))
            stopped = finish == "stop"
            completion = usage.get("completion_tokens")
            if not isinstance(completion, int) or isinstance(completion, bool):
                completion = len(reply_ids) + (1 if stopped else 0)
        else:
            text, reply_ids = self.decoder.text, self.decoder.ids
            stopped = eos in received or finish == "stop"
            # Counted as the local engine counts: the generated ids with the </s> that ended them.
            completion = received.index(eos) + 1 if eos in received else len(received) + (1 if stopped else 0)
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None  # what the server did not prefill
        prefilled = (
            len(prompt_ids) - cached if isinstance(cached, int) and 0 <= cached <= len(prompt_ids) else len(prompt_ids)
        )
        return Reply(
            text=text,
            ids=reply_ids,
            finish_reason="stop" if stopped else "interrupted" if interrupted else "length",
            prompt_tokens=len(prompt_ids),
            prefilled_tokens=prefilled,
            completion_tokens=completion,
            ttft_s=self.timing.ttft_s,
            tokens_per_s=self.timing.tokens_per_s(completion),
        )


TEXT_ONLY = (
    "returns replies as text only, not as token ids, so the server's detokenizer decides spaces and byte-fallback "
    "characters; vLLM >= 0.10.2 returns token ids (return_token_ids), older vLLM when started with "
    "--return-tokens-as-token-ids"
)


BUSY = (429, 503)  # a server whose queue is full (rinna serve, vLLM behind a proxy)
BUSY_WAIT_S = 120.0  # how long a request is asked again while the server is busy (backing off 0.25 s to 4 s)


class RemoteEngine:
    """Generates on an OpenAI-compatible server; prompt and reply stay token ids (see :mod:`rinna_cli.remote`)."""

    device = "remote"

    def __init__(
        self,
        endpoint: str,
        tokenizer: Tokenizer,
        name: str,
        window: int,
        api_key: str | None = None,
        api_key_env: str = "RINNA_API_KEY",
        timeout: float = DEFAULT_TIMEOUT,
        warn: Callable[[str], None] | None = None,
        busy_wait_s: float = BUSY_WAIT_S,
    ):
        self.http = Transport(endpoint, api_key, api_key_env, timeout)
        self.busy_wait_s = busy_wait_s
        self.endpoint = self.http.endpoint
        self.tokenizer = tokenizer
        self.name = name
        self.window = window
        self.dtype = self.endpoint  # shown as "<model> on remote (<endpoint>)"
        self._warn = warn or stderr_warning
        self.served_model: str | None = None
        self.mode: str | None = None  # how the reply's ids come back, once known
        self._mismatch_warned = False
        self._names = ""  # how the served model's name differs from --model, for the warnings

    def check(self) -> None:
        """Ask ``GET /v1/models`` which model the server serves (and its window); fail early if it cannot be used."""
        from rinna_cli.hub import expand

        wanted = expand(self.name)
        try:
            data = self.http.get_json("/models")
        except EndpointError as err:
            if err.status == 404:  # not every server lists its models; send the name as given
                self.served_model = wanted
                return
            raise
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list):
            raise self.http.not_openai(f"GET {self.http.path}/models did not answer with a model list")
        cards = {m["id"]: m for m in models if isinstance(m, dict) and isinstance(m.get("id"), str)}
        if not cards:
            raise self.http.fail("the server serves no model")
        tail = wanted.rstrip("/").rsplit("/", 1)[-1]
        same_tail = [mid for mid in cards if mid.rstrip("/").rsplit("/", 1)[-1] == tail]
        if wanted in cards:
            chosen = wanted
        elif len(same_tail) == 1:
            chosen = same_tail[0]
        elif len(cards) == 1:
            chosen = next(iter(cards))
        else:
            raise self.http.fail(f"the server serves {', '.join(sorted(cards))}; pass the one to use with --model")
        self.served_model = chosen
        limit = cards[chosen].get("max_model_len")
        if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < self.window:
            self.window = limit
        self._check_tokenizer(chosen, wanted, cards[chosen].get("vocab_size"))

    def _check_tokenizer(self, served: str, wanted: str, vocab: object) -> None:
        """Warn when the served model's card says its tokenizer is not ``--model``'s (``rinna serve`` sends
        ``vocab_size``). A name alone proves nothing (``--served-model-name``): it only goes into later warnings."""
        size = self.tokenizer.vocab_size
        if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab != size:
            self._warn_mismatch(f"the served model has {vocab} token ids, the tokenizer of --model {self.name} {size}")
        if served.rstrip("/").rsplit("/", 1)[-1] != wanted.rstrip("/").rsplit("/", 1)[-1]:
            self._names = f"the server serves {served!r}, not --model {self.name}; "

    def _warn_mismatch(self, what: str) -> None:
        if not self._mismatch_warned:
            self._mismatch_warned = True
            self._warn(
                f"{self.endpoint}: {what}; {self._names}replies are decoded with --model's tokenizer, so if it "
                "is not the served model's they come out wrong: pass the served model's hub id or folder as --model"
            )

    def _body(self, prompt_ids: list[int], sampling: Sampling, mode: Mode) -> dict:
        body = {
            "model": self.served_model,
            "prompt": list(prompt_ids),
            "max_tokens": sampling.max_new_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,  # 0 = off, as in vLLM
            "repetition_penalty": sampling.repetition_penalty,
            # </s> ends the reply; as an id, not a stop string: the server's text never holds it (special
            # tokens are skipped), and vLLM refuses stop strings when started with --skip-tokenizer-init.
            "stop_token_ids": [self.tokenizer.special.eos],
            **mode.fields,
        }
        if sampling.seed >= 0:
            body["seed"] = sampling.seed
        return body

    def generate(
        self, prompt_ids: list[int], sampling: Sampling, on_step: OnStep = ignore_step, stop: Event | None = None
    ) -> Reply:
        """Generate a reply on the server; setting ``stop`` (Ctrl-C) closes the stream (the reply is interrupted)."""
        if not prompt_ids:
            raise UsageError("empty prompt")
        check_fits(len(prompt_ids), sampling.max_new_tokens, self.window)
        stop = stop or Event()
        if self.served_model is None:
            self.check()
        outcome: Reply | Mode = MODES[self.mode or "ids"]
        waited, pause = 0.0, 0.25
        while isinstance(outcome, Mode):  # the next way to ask, while the server's way is not known yet
            try:
                outcome = self._attempt(prompt_ids, sampling, on_step, stop, outcome)
            except EndpointError as err:  # a full queue (429, 503) is asked again, as openai's client does
                if err.status not in BUSY or waited + pause > self.busy_wait_s:
                    raise
                stop.wait(pause)  # Ctrl-C: the next attempt answers "interrupted" at once
                waited, pause = waited + pause, min(2 * pause, 4.0)
        return outcome

    def _attempt(
        self, prompt_ids: list[int], sampling: Sampling, on_step: OnStep, stop: Event, mode: Mode
    ) -> Reply | Mode:
        """One request: the reply, or (while learning) the mode to ask with next."""
        learning = self.mode is None
        reading = _Reading(self.tokenizer, mode, on_step)
        conn = self.http.connection()
        closer = Closer(stop, conn)
        try:
            response = self.http.open(conn, "POST", "/completions", self._body(prompt_ids, sampling, mode), True)
        except EndpointError as err:
            closer.finish()
            if stop.is_set():  # Ctrl-C before the server answered
                reading.end()
                return reading.reply(self.tokenizer, prompt_ids, interrupted=True)
            if learning and err.status in (400, 422) and mode.fallback:  # a strict server refused the fields
                return MODES[mode.fallback]
            raise
        except BaseException:
            closer.finish()
            raise
        try:
            request = f"POST {self.http.path}/completions"
            following = self._read(self.http.payloads(response, request), reading, request, stop)
            if following is not None:
                return following
        except (OSError, http.client.HTTPException) as err:
            if not stop.is_set():
                raise self.http.network_error(err) from None
        finally:
            closer.finish()
            conn.close()
        interrupted = stop.is_set() and reading.finish is None
        if not interrupted and reading.finish is None and not reading.done:
            raise self.http.fail("the connection closed before the reply was complete")
        if reading.finish == "abort":
            raise self.http.fail("the server aborted the reply")
        reading.end()
        reply = reading.reply(self.tokenizer, prompt_ids, interrupted)
        if reply.ids and not reply.text:
            self._warn_mismatch(f"the reply's {len(reply.ids)} token ids decode to no text")
        return reply

    def _read(self, events: Iterable[object], reading: _Reading, request: str, stop: Event) -> Mode | None:
        """Take the events of one reply; a mode to ask with next if the server ignored the current one."""
        for event in events:
            if event is DONE:
                reading.done = True
                return None
            if not isinstance(event, dict):
                raise self.http.not_openai(f"{request} streamed {type(event).__name__}, not an object")
            if event.get("error"):
                error = event["error"]
                message = error.get("message") if isinstance(error, dict) else error
                raise self.http.fail(f"the server failed while generating: {one_line(str(message))}")
            if isinstance(event.get("usage"), dict):
                reading.usage = event["usage"]
            choices = event.get("choices")
            if not isinstance(choices, list):
                raise self.http.not_openai(f"{request} streamed an object without choices")
            for choice in choices:
                if isinstance(choice, dict) and choice.get("index", 0) == 0:
                    following = self._choice(choice, reading, request)
                    if following is not None:
                        return following
            if stop.is_set():
                break
        return None

    def _choice(self, choice: dict, reading: _Reading, request: str) -> Mode | None:
        learning = self.mode is None
        mode = reading.mode
        if mode.ids is not None:
            ids = _choice_ids(choice, mode)
            if ids is None and not learning and not choice.get("text"):
                ids = []  # e.g. a closing chunk with the finish reason only
            if ids is None:
                if not learning:
                    raise self.http.fail(f"the server stopped returning token ids ({mode.name})")
                assert mode.fallback is not None
                if not mode.same_stream:
                    return MODES[mode.fallback]  # nothing has been shown yet: ask again
                mode = reading.mode = MODES[mode.fallback]  # the choices hold text: read this stream as text
            else:
                self.mode = mode.name
                _check_vocabulary(self, ids)
                reading.take_ids(ids)
        if mode.ids is None:
            if learning:
                self.mode = mode.name
                self._warn(f"{self.endpoint} {TEXT_ONLY}")
            text = choice.get("text")
            if not isinstance(text, str):
                raise self.http.not_openai(f"{request} streamed a choice without text")
            reading.take_text(text)
        if choice.get("finish_reason"):
            reading.finish = str(choice["finish_reason"])
        return None


def connect(
    settings, tokenizer: Tokenizer, window: int, environ=None, warn: Callable[[str], None] | None = None
) -> RemoteEngine:
    """A :class:`RemoteEngine` for ``settings.endpoint``, checked to answer; the API key is read from the environment."""
    import os

    environ = os.environ if environ is None else environ
    key = environ.get(settings.api_key_env) or None
    engine = RemoteEngine(
        settings.endpoint, tokenizer, settings.model, window, api_key=key, api_key_env=settings.api_key_env, warn=warn
    )
    engine.check()
    return engine


def _check_vocabulary(engine: RemoteEngine, ids: list[int]) -> None:
    """An id outside the tokenizer's vocabulary: the served model's tokenizer is another (one line, exit 1)."""
    size = engine.tokenizer.vocab_size
    outside = next((i for i in ids if not 0 <= i < size), None)
    if outside is not None:
        raise engine.http.fail(
            f"the server returned token id {outside}, outside the {size} ids of --model {engine.name}'s "
            f"tokenizer: {engine._names}the served model's tokenizer is another; pass the served model's hub id "
            "or folder as --model"
        )
