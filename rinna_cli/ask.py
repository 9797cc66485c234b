"""``rinna ask`` and ``rinna tokenize``: one question, one reply (or one split into tokens)."""

from __future__ import annotations

import json
import threading

from rinna_cli import config
from rinna_cli.contract import Reply, Step, check_fits, stats_line
from rinna_cli.environment import Environment, model_files, tokenizer_of
from rinna_cli.errors import UsageError
from rinna_cli.inputs import InputTooLong, compose_question, read_stdin
from rinna_cli.prompt import encode_newlines
from rinna_cli.render import ReplyView, escape_controls
from rinna_cli.session import Conversation
from rinna_cli.tokenizer import Tokenizer


def _piped_text(env: Environment, limit: int) -> str:
    """Standard input as text (``""`` when it is closed)."""
    return "" if env.stdin is None else read_stdin(limit, env.stdin.buffer)


def tokenize(env: Environment, settings: config.Settings, text: str | None, json_: bool, count: bool) -> None:
    """Print how the tokenizer splits ``text`` (``None`` or ``-``: standard input)."""
    if text in (None, "-"):
        if env.stdin_isatty:
            raise UsageError("no text: pass it as an argument or on standard input")
        text = _piped_text(env, 1 << 24)
        text = text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
    _, tokenizer = tokenizer_of(settings, generating=False)
    text = encode_newlines(text)
    ids = tokenizer.encode(text)
    pieces = tokenizer.pieces(ids)
    out = env.stdout
    if json_:
        fields = {"count": len(ids)} if count else {"text": text, "tokens": pieces, "ids": ids, "count": len(ids)}
        print(json.dumps(fields, ensure_ascii=False), file=out)
    elif count:
        print(len(ids), file=out)
    elif env.stdout_isatty:
        from rich.console import Console
        from rich.table import Table

        table = Table("#", "piece", "id", caption=f"{len(ids)} tokens", highlight=False)
        for index, (piece, pid) in enumerate(zip(pieces, ids)):
            table.add_row(str(index), escape_controls(piece), str(pid))
        Console(file=out, highlight=False, markup=False).print(table)
    else:
        out.write("".join(f"{i}\t{p}\t{pid}\n" for i, (p, pid) in enumerate(zip(pieces, ids))))


def _json_line(reply: Reply, model: str) -> str:
    fields = {
        "reply": reply.text,
        "model": model,
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "finish_reason": reply.finish_reason,
        "ttft_s": round(reply.ttft_s, 4),
        "tokens_per_s": round(reply.tokens_per_s, 2),
    }
    if reply.kernels:  # the local quantized engine: which kernels ran
        fields["kernels"] = reply.kernels
    return json.dumps(fields, ensure_ascii=False)


def _prompt_ids(tokenizer: Tokenizer, question: str) -> list[int]:
    conversation = Conversation(tokenizer)
    conversation.add_user(question)
    return conversation.prompt_ids()


def _stdin_too_long(
    err: InputTooLong, tokenizer: Tokenizer, question: str | None, settings: config.Settings, window: int
) -> UsageError:
    """The refusal of a pipe too long for the window, saying how many of its tokens would fit."""
    instruction = question.strip() + "\n\n" if question and question.strip() else ""
    room = max(0, window - settings.max_new_tokens - len(_prompt_ids(tokenizer, instruction)))
    return UsageError(
        f"standard input is over {err.limit:,} bytes, more than the model's {window}-token window holds; "
        f"with max_new_tokens = {settings.max_new_tokens} at most {room:,} tokens of it fit: pass a shorter text"
    )


def _fit_problem(prompt_tokens: int, max_new_tokens: int, window: int) -> str | None:
    """What the window rule says of this prompt, or None when it fits."""
    try:
        check_fits(prompt_tokens, max_new_tokens, window)
    except UsageError as err:
        return str(err)
    return None


def _show_prompt(
    env: Environment, conversation: Conversation, settings: config.Settings, window: int, json_: bool
) -> int:
    """``--show-prompt``: the prompt on stdout (or one JSON object), its size and whether it fits on stderr."""
    ids = conversation.prompt_ids()
    problem = _fit_problem(len(ids), settings.max_new_tokens, window)
    if json_:
        fields = {
            "prompt": conversation.prompt_text(), "ids": ids, "prompt_tokens": len(ids), "window": window,
            "max_new_tokens": settings.max_new_tokens, "fits": problem is None,
        }  # fmt: skip
        print(json.dumps(fields, ensure_ascii=False), file=env.stdout)
        return 0
    print(conversation.prompt_text(), file=env.stdout)
    env.errors().print(f"{len(ids)} tokens", markup=False)
    if problem:
        env.warn(f"{problem}: rinna ask would refuse it")
    return 0


def ask(
    env: Environment, settings: config.Settings, question: str | None, json_: bool, stats: bool, show_prompt: bool
) -> int:
    """Answer one question; the reply streams to stdout (plain text when piped). Returns the exit code."""
    tokenizer, window = model_files(settings, generating=not show_prompt)  # --show-prompt loads no weights
    piped = None
    if question in (None, "-") or not env.stdin_isatty:
        if env.stdin_isatty:
            raise UsageError("no question: pass it as an argument or on standard input")
        question = None if question == "-" else question
        try:
            piped = _piped_text(env, window * tokenizer.max_piece_bytes)
        except InputTooLong as err:
            raise _stdin_too_long(err, tokenizer, question, settings, window) from None
    conversation = Conversation(tokenizer)
    conversation.add_user(compose_question(question, piped))
    if show_prompt:
        return _show_prompt(env, conversation, settings, window, json_)
    prompt_ids = conversation.prompt_ids()
    sampling = settings.sampling()
    check_fits(len(prompt_ids), sampling.max_new_tokens, window)
    engine = env.open_engine(env, settings, tokenizer, window)
    view = ReplyView(env.stdout, env.stdout_isatty)
    stop = threading.Event()
    gone = threading.Event()  # the reader of stdout went away: generating stops as at Ctrl-C, and that is success
    from rinna_cli.interrupt import sigint_sets

    def on_step(step: Step) -> None:
        if not json_ and not gone.is_set():
            try:
                view.write(step.text)
            except BrokenPipeError:
                gone.set()
                stop.set()

    with sigint_sets(stop):
        reply = engine.generate(prompt_ids, sampling, on_step, stop)
    interrupted = reply.finish_reason == "interrupted" and not gone.is_set()
    try:
        if json_:  # after Ctrl-C too: the partial reply, finish_reason "interrupted"
            print(_json_line(reply, settings.model), file=env.stdout)
        elif not gone.is_set():
            view.end("interrupted" if interrupted else None)
    except BrokenPipeError:
        gone.set()
    if stats:  # on stderr, which is still there when stdout's reader has gone
        env.errors().print(stats_line(reply), markup=False, style="dim", soft_wrap=True)  # one line, any width
    return 130 if interrupted else 0
