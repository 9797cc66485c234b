"""Test doubles shared by the suite: one scripted engine and in-process runs of ``rinna``.

:class:`ScriptedEngine` implements :class:`rinna_cli.contract.Engine` (as simonw/llm's
``MockModel``): ``enqueue`` the replies, and each ``generate`` streams the next one as
text steps, then one step with its ids and ``</s>``. :func:`run_cli` runs a command in
this process with in-memory streams (as httpie's ``MockEnvironment``); signals, pipes and
the pty still need the real process (``test_ask``, ``test_chat_pty``).
"""

from __future__ import annotations

import io
import signal
from dataclasses import dataclass
from threading import Event

from rinna_cli.contract import OnStep, Reply, Sampling, Step, ignore_step
from rinna_cli.environment import Environment
from rinna_cli.prompt import encode_newlines
from rinna_cli.tokenizer import Tokenizer


class ScriptedEngine:
    """Scripted replies (``"はい。"`` when none is queued); records every prompt and sampling it is given.

    ``pieces``: the reply streams in that many text steps (``chunk``: or in steps of that many
    characters). ``interrupt_at``: before that step a real SIGINT is raised (as a Ctrl-C would), so
    the caller's handler sets ``stop`` and the reply ends there; ``hard_interrupt``: the second
    Ctrl-C, a KeyboardInterrupt out of generate. ``error``: raised instead of replying.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        replies=(),
        window: int = 2048,
        name: str = "fake/model",
        pieces: int = 3,
        chunk: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.window = window
        self.name = name
        self.device = "cpu"
        self.dtype = "float32"
        self.replies = list(replies)
        self.pieces = pieces
        self.chunk = chunk
        self.prompts: list[list[int]] = []
        self.samplings: list[Sampling] = []
        self.interrupt_at: int | None = None
        self.hard_interrupt = False
        self.error: Exception | None = None

    def enqueue(self, *replies: str) -> ScriptedEngine:
        self.replies.extend(replies)
        return self

    def _chunks(self, text: str) -> list[str]:
        if self.chunk:
            return [text[start : start + self.chunk] for start in range(0, len(text), self.chunk)]
        size = max(1, len(text) // self.pieces)
        return [text[i * size : (i + 1) * size] for i in range(self.pieces - 1)] + [text[(self.pieces - 1) * size :]]

    def generate(
        self, prompt_ids: list[int], sampling: Sampling, on_step: OnStep = ignore_step, stop: Event | None = None
    ) -> Reply:
        self.prompts.append(list(prompt_ids))
        self.samplings.append(sampling)
        if self.error:
            raise self.error
        text = self.replies.pop(0) if self.replies else "はい。"
        shown = []
        for index, chunk in enumerate(self._chunks(text)):
            if index == self.interrupt_at:
                signal.raise_signal(signal.SIGINT)
                if self.hard_interrupt:
                    signal.raise_signal(signal.SIGINT)  # the second press raises KeyboardInterrupt
            if stop is not None and stop.is_set():
                break
            if chunk:
                on_step(Step(chunk, []))
                shown.append(chunk)
        reply_text = "".join(shown)
        interrupted = stop is not None and stop.is_set()
        ids = self.tokenizer.encode(encode_newlines(reply_text))
        on_step(Step("", ids if interrupted else ids + [self.tokenizer.special.eos]))
        return Reply(
            text=reply_text, ids=ids, finish_reason="interrupted" if interrupted else "stop",
            prompt_tokens=len(prompt_ids), prefilled_tokens=len(prompt_ids), completion_tokens=len(ids) + (0 if interrupted else 1),
            ttft_s=0.01, tokens_per_s=123.4,
        )  # fmt: skip

    def prompt_text(self, index: int = -1) -> str:
        return self.tokenizer.decode(self.prompts[index])


@dataclass
class Ran:
    """What an in-process run of ``rinna`` did."""

    code: int
    stdout: str
    stderr: str


def make_env(stdin: bytes | None = b"", engine=None, environ: dict | None = None, **flags) -> Environment:
    """An :class:`Environment` of in-memory streams (pipes unless ``*_isatty`` flags say otherwise).

    ``engine``: what every command gets as its model (else pass ``open_engine=``, or get the real one).
    """
    stream = None if stdin is None else io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    opened = {} if engine is None else {"open_engine": lambda env, settings, tokenizer, window: engine}
    ttys = {"stdin_isatty": False, "stdout_isatty": False, "stderr_isatty": False, **flags}
    return Environment(
        stdin=stream, stdout=io.StringIO(), stderr=io.StringIO(), environ=environ or {}, **opened, **ttys
    )


def run_cli(*args: str, stdin: bytes | None = b"", engine=None, environ: dict | None = None, **flags) -> Ran:
    """Run ``rinna ARGS`` in this process with :func:`make_env`'s streams and ``engine`` as the model."""
    from rinna_cli import cli

    env = make_env(stdin, engine, environ, **flags)
    code = cli.run(list(args), env)
    assert isinstance(env.stdout, io.StringIO) and isinstance(env.stderr, io.StringIO)
    return Ran(code, env.stdout.getvalue(), env.stderr.getvalue())
