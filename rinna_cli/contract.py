"""The engine contract: what ``ask``, ``chat``, ``batch`` and ``serve`` need from a model.

Torch-free, so the ``--endpoint`` path and the commands never import torch. The
local engine (:mod:`rinna_cli.engine`) and the remote one (:mod:`rinna_cli.remote`)
both implement :class:`Engine`; a type checker proves it. One rule lives here once:
the window rule (:func:`check_fits`), the stats line (:func:`stats_line`) and the
timing of a reply (:class:`Timing`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from threading import Event
from typing import Callable, Protocol

from rinna_cli.errors import UsageError
from rinna_cli.tokenizer import Tokenizer


@dataclass(frozen=True)
class Sampling:
    """How to generate one reply; the values are checked by :func:`rinna_cli.config.check`."""

    temperature: float  # 0 = greedy
    top_p: float  # 1 = off
    top_k: int  # 0 = off
    repetition_penalty: float  # 1 = off
    max_new_tokens: int
    seed: int  # -1 = random

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Step:
    """What one generation step produced: newly printable text (may be empty) and the new ids (``</s>`` included)."""

    text: str
    ids: list[int]


@dataclass
class Reply:
    """One generated reply and how it was made."""

    text: str
    ids: list[int]
    finish_reason: str  # "stop" (</s>), "length" (max_new_tokens) or "interrupted"
    prompt_tokens: int
    prefilled_tokens: int  # prompt tokens not already in the KV cache
    completion_tokens: int  # generated tokens, </s> included
    ttft_s: float
    tokens_per_s: float
    kernels: str = ""  # which kernels ran (local engine), e.g. "decode int8pack/bfloat16, prefill int_mm"


OnStep = Callable[[Step], None]


def ignore_step(step: Step) -> None:
    """The default ``on_step``."""


class Engine(Protocol):
    """A model that turns prompt ids into a reply; safe to call from several threads when it says so."""

    name: str
    window: int  # the model's context window in tokens
    tokenizer: Tokenizer

    def generate(
        self, prompt_ids: list[int], sampling: Sampling, on_step: OnStep = ignore_step, stop: Event | None = None
    ) -> Reply:
        """Generate a reply to ``prompt_ids``; ``on_step`` gets each step; setting ``stop`` ends after the current token."""
        ...


def check_fits(prompt_tokens: int, max_new_tokens: int, window: int, name: str = "max_new_tokens") -> None:
    """The window rule: the prompt and ``max_new_tokens`` together fit in the window (one message everywhere).

    ``name`` is what the caller calls the limit (the server's ``max_tokens``).
    """
    if not 1 <= max_new_tokens < window:
        raise UsageError(f"{name} = {max_new_tokens} is out of range; allowed: 1 <= {name} < {window}")
    room = window - max_new_tokens
    if prompt_tokens > room:
        raise UsageError(
            f"the prompt is {prompt_tokens} tokens; with {name} = {max_new_tokens} at most {room} "
            f"fit in the model's {window}-token window"
        )


def placement(engine: Engine) -> str:
    """Where an engine runs, as the banners show it: ``cpu (int8)``, ``remote (http://host:8000/v1)``."""
    return f"{getattr(engine, 'device', '?')} ({getattr(engine, 'dtype', '?')})"


def stats_line(reply: Reply) -> str:
    """The one-line summary of ``--stats`` and ``/stats``."""
    line = (
        f"{reply.completion_tokens} tokens, prompt {reply.prompt_tokens} "
        f"({reply.prefilled_tokens} prefilled), first token {reply.ttft_s:.2f} s, {reply.tokens_per_s:.1f} tokens/s"
    )
    return f"{line}, {reply.kernels}" if reply.kernels else line


@dataclass
class Timing:
    """Time to first token and decode rate (tokens after the first), measured the same way by every engine."""

    started: float = field(default_factory=time.perf_counter)
    first_at: float | None = None
    ended: float | None = None

    def token(self) -> None:
        """Call when a step produced ids."""
        if self.first_at is None:
            self.first_at = time.perf_counter()

    def end(self) -> None:
        self.ended = time.perf_counter()

    @property
    def ttft_s(self) -> float:
        ended = self.ended if self.ended is not None else time.perf_counter()
        return (self.first_at or ended) - self.started

    def tokens_per_s(self, generated: int) -> float:
        ended = self.ended if self.ended is not None else time.perf_counter()
        if generated <= 1 or self.first_at is None or ended <= self.first_at:
            return 0.0
        return (generated - 1) / (ended - self.first_at)
