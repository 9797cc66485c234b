"""The ``rinna`` command: wires input, session, engine and output together.

torch and transformers are imported only by commands that load the weights.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer

from rinna_cli import config, hub
from rinna_cli.errors import RinnaError, UsageError
from rinna_cli.inputs import compose_question, read_stdin
from rinna_cli.prompt import encode_newlines
from rinna_cli.render import ReplyView, err_console, escape_controls, is_tty
from rinna_cli.session import Conversation, Reply
from rinna_cli.tokenizer import Tokenizer

app = typer.Typer(
    name="rinna",
    help="Chat with rinna's Japanese GPT-NeoX instruction models (rinna/japanese-gpt-neox-3.6b-instruction-*).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Hub id, local folder, or alias sft / sft-v2 / ppo. [default: from config]"),
]
DeviceOpt = Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | mps")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="auto | float32 | bfloat16 | float16")]
QuantizeOpt = Annotated[
    Optional[str], typer.Option(help="auto | int8 | none; auto = int8 weights on the CPU (cached after the first start)")
]
TemperatureOpt = Annotated[Optional[float], typer.Option("--temperature", "-t", help="0 = greedy. [default: 0.7]")]
TopPOpt = Annotated[Optional[float], typer.Option(help="Nucleus sampling, 0 < p <= 1. [default: 1.0]")]
TopKOpt = Annotated[Optional[int], typer.Option(help="Top-k sampling, 0 = off. [default: 50]")]
RepetitionOpt = Annotated[Optional[float], typer.Option(help="1 = off. [default: 1.0]")]
MaxNewOpt = Annotated[Optional[int], typer.Option("--max-new-tokens", "-n", help="[default: 128]")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Same seed + same options = same reply; -1 = random.")]
EndpointOpt = Annotated[
    Optional[str],
    typer.Option(
        help="Generate on this OpenAI-compatible server (vLLM, `rinna serve`), e.g. http://host:8000/v1; "
        "the prompt is still tokenized here. '' = the local model. [env: RINNA_ENDPOINT]"
    ),
]
ApiKeyEnvOpt = Annotated[
    Optional[str],
    typer.Option(help="The environment variable holding the endpoint's API key (sent as a Bearer token). [default: RINNA_API_KEY]"),
]


def _settings(**flags) -> config.Settings:
    return config.load(flags)


def _tokenizer(settings: config.Settings) -> tuple[Path, Tokenizer]:
    folder = hub.locate(settings.model)
    return folder, Tokenizer.from_folder(folder)


def _stdin_piped() -> bool:
    return not is_tty(sys.stdin)


@app.command()
def tokenize(
    text: Annotated[Optional[str], typer.Argument(help="Text to tokenize; '-' or none reads standard input.")] = None,
    model: ModelOpt = None,
    json_: Annotated[bool, typer.Option("--json", help="One JSON object: text, tokens, ids, count.")] = False,
    count: Annotated[bool, typer.Option("--count", help="Print only the number of tokens.")] = False,
) -> None:
    """Show how rinna's sentencepiece tokenizer splits TEXT (newlines become <NL>, as in every prompt)."""
    settings = _settings(model=model)
    if text in (None, "-"):
        if not _stdin_piped():
            raise UsageError("no text: pass it as an argument or on standard input")
        text = read_stdin(1 << 24)
        text = text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
    _, tokenizer = _tokenizer(settings)
    text = encode_newlines(text)
    ids = tokenizer.encode(text)
    pieces = tokenizer.pieces(ids)
    if count:
        print(len(ids))
    elif json_:
        print(json.dumps({"text": text, "tokens": pieces, "ids": ids, "count": len(ids)}, ensure_ascii=False))
    elif is_tty(sys.stdout):
        from rich.console import Console
        from rich.table import Table

        table = Table("#", "piece", "id", caption=f"{len(ids)} tokens", highlight=False)
        for index, (piece, pid) in enumerate(zip(pieces, ids)):
            table.add_row(str(index), escape_controls(piece), str(pid))
        Console(highlight=False, markup=False).print(table)
    else:
        sys.stdout.write("".join(f"{i}\t{p}\t{pid}\n" for i, (p, pid) in enumerate(zip(pieces, ids))))


def load_engine(settings: config.Settings, tokenizer: Tokenizer):
    """Fetch the weights if needed and load them, with a spinner on a terminal's stderr."""
    status = err_console().status(f"Loading {settings.model} …") if is_tty(sys.stderr) else None
    with status or nullcontext():
        folder = hub.locate(settings.model, weights=True)
        from rinna_cli.engine import Engine

        return Engine.load(
            folder,
            settings.model,
            tokenizer,
            settings.device,
            settings.dtype,
            settings.quantize,
            progress=lambda step: status and status.update(f"Loading {settings.model}: {step} …"),
        )


def check_fits(prompt_tokens: int, max_new_tokens: int, window: int) -> None:
    """Refuse a prompt that cannot fit in the window together with the reply."""
    if max_new_tokens >= window:
        raise UsageError(f"max_new_tokens = {max_new_tokens} is out of range; allowed: 1 <= max_new_tokens < {window}")
    room = window - max_new_tokens
    if prompt_tokens > room:
        raise UsageError(
            f"the prompt is {prompt_tokens} tokens; with max_new_tokens = {max_new_tokens} at most {room} "
            f"fit in the model's {window}-token window"
        )


def open_engine(settings: config.Settings, tokenizer: Tokenizer, window: int):
    """The local engine, or with ``endpoint`` set a remote one (checked to answer) that takes the same calls."""
    if not settings.endpoint:
        return load_engine(settings, tokenizer)
    from rinna_cli.remote import connect

    return connect(settings, tokenizer, window)


def _stats_line(reply: Reply) -> str:
    return (
        f"{reply.completion_tokens} tokens, prompt {reply.prompt_tokens} "
        f"({reply.prefilled_tokens} prefilled), first token {reply.ttft_s:.2f} s, {reply.tokens_per_s:.1f} tokens/s"
    )


@app.command()
def ask(
    question: Annotated[
        Optional[str],
        typer.Argument(help="The question. With text on standard input too, this is the instruction and stdin the material."),
    ] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    repetition_penalty: RepetitionOpt = None,
    max_new_tokens: MaxNewOpt = None,
    seed: SeedOpt = None,
    endpoint: EndpointOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object after generation.")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Tokens, time to first token and tokens/s on stderr.")] = False,
    show_prompt: Annotated[
        bool, typer.Option("--show-prompt", help="Print the exact prompt and its token count; load no weights.")
    ] = False,
) -> int:
    """Ask one question; the reply streams to stdout (plain text when piped)."""
    settings = _settings(
        model=model, device=device, dtype=dtype, quantize=quantize, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, seed=seed,
        endpoint=endpoint, api_key_env=api_key_env,
    )  # fmt: skip
    folder, tokenizer = _tokenizer(settings)
    window = hub.context_window(hub.read_config(folder))
    piped = None
    if question in (None, "-") or _stdin_piped():
        if not _stdin_piped():
            raise UsageError("no question: pass it as an argument or on standard input")
        piped = read_stdin(window * tokenizer.max_piece_bytes)
        question = None if question == "-" else question
    conversation = Conversation(tokenizer)
    conversation.add_user(compose_question(question, piped))
    prompt_ids = conversation.prompt_ids()
    if show_prompt:
        print(conversation.prompt_text())
        err_console().print(f"{len(prompt_ids)} tokens", markup=False)
        return 0
    check_fits(len(prompt_ids), settings.max_new_tokens, window)
    engine = open_engine(settings, tokenizer, window)
    view = ReplyView()
    stop = threading.Event()
    from rinna_cli.interrupt import sigint_sets

    with sigint_sets(stop):
        reply = engine.generate(prompt_ids, settings.generation(), on_text=view.write if not json_ else lambda _: None, stop=stop)
    if json_ and reply.finish_reason != "interrupted":
        fields = {
            "reply": reply.text,
            "model": settings.model,
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "finish_reason": reply.finish_reason,
            "ttft_s": round(reply.ttft_s, 4),
            "tokens_per_s": round(reply.tokens_per_s, 2),
        }
        print(json.dumps(fields, ensure_ascii=False))
    elif not json_:
        view.end("interrupted" if reply.finish_reason == "interrupted" else None)
    if stats:
        err_console().print(_stats_line(reply), markup=False, style="dim")
    return 130 if reply.finish_reason == "interrupted" else 0


def _writable(path: Path) -> bool:
    """Whether ``path`` can be appended to (created, private to the user, if missing)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
        return True
    except OSError:
        return False


@app.command()
def chat(
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    repetition_penalty: RepetitionOpt = None,
    max_new_tokens: MaxNewOpt = None,
    seed: SeedOpt = None,
    endpoint: EndpointOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the last chat session.")] = False,
    load: Annotated[Optional[Path], typer.Option("--load", help="Continue a transcript saved with /save.")] = None,
) -> int:
    """Chat in a multi-turn conversation. Piped standard input: one user turn per line."""
    import signal

    from rinna_cli import store
    from rinna_cli.repl import Chat, run_piped, run_terminal

    settings = _settings(
        model=model, device=device, dtype=dtype, quantize=quantize, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, seed=seed,
        endpoint=endpoint, api_key_env=api_key_env,
    )  # fmt: skip
    if resume and load:
        raise UsageError("--resume and --load cannot be used together")
    folder, tokenizer = _tokenizer(settings)
    window = hub.context_window(hub.read_config(folder))
    check_fits(0, settings.max_new_tokens, window)
    sessions = config.app_dir() / "sessions"
    resumed = store.latest_log(sessions) if resume else None
    loaded = store.replay_log(resumed) if resumed else store.load_transcript(load) if load else None
    engine = open_engine(settings, tokenizer, window)

    errors = err_console()

    def warn(message: str) -> None:
        errors.print(f"rinna: warning: {message}", markup=False, highlight=False, soft_wrap=True, style="yellow")

    # A resumed or loaded conversation continues in a new session file of its own (its turns
    # copied first), so two chats never append to the same file.
    header = {"model": settings.model, "created": time.time()}
    if resumed or load:
        header["continues"] = str(resumed or load)
    log = store.SessionLog.create(sessions, warn, header)
    interactive = is_tty(sys.stdin)
    view = ReplyView()
    if interactive and view.tty:
        notice = lambda text: view.console.print(text, markup=False, style="dim", highlight=False)  # noqa: E731
    else:
        notice = lambda text: errors.print(text, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    session = Chat(engine, settings, view, notice, log=log)
    if loaded:
        session.replace(loaded)
        notice(f"continuing {len(loaded.turns)} turns from {resumed or load}")
    # SIGTERM ends the chat like Ctrl-D would: the terminal is restored on the way out
    # (every completed turn is already in the session file).
    def exit_on_sigterm(signum, frame) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_on_sigterm)
    if not interactive:
        return run_piped(session, sys.stdin.buffer)
    notice(f"{settings.model} on {engine.device} ({engine.dtype}) · /help for commands · Ctrl-D to quit")
    history = config.app_dir() / "history"
    if not _writable(history):
        warn(f"cannot write the input history {history}; it is kept in memory only")
        history = None
    return run_terminal(session, history, warn)


@app.command()
def serve(
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; any but a loopback one (127.0.0.1, ::1) needs --api-key-env.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on; 0 = a free one (the address is printed).")] = 8000,
    api_key_env: Annotated[
        Optional[str],
        typer.Option(help="Require the key held in this environment variable (clients send it as a Bearer token)."),
    ] = None,
    queue_size: Annotated[
        int, typer.Option(help="Requests that may wait while one reply is generated; more get HTTP 429.")
    ] = 4,
) -> int:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."""
    settings = _settings(model=model, device=device, dtype=dtype, quantize=quantize)
    api_key = None
    if api_key_env is not None:
        name = config.check("api_key_env", api_key_env, "--api-key-env")
        api_key = os.environ.get(name, "").strip()
        if not api_key:
            raise UsageError(f"--api-key-env {name}: the variable is unset or empty; set it to the key clients must send")
    else:
        from rinna_cli.server import is_loopback

        if not is_loopback(host):
            raise UsageError(
                f"--host {host} takes connections from other machines; require an API key with "
                "--api-key-env NAME (the environment variable holding it), or bind 127.0.0.1"
            )
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is out of range; allowed: 0 <= port <= 65535 (0 = a free one)")
    if not 0 <= queue_size <= 1000:
        raise UsageError(f"--queue-size {queue_size} is out of range; allowed: 0 <= queue_size <= 1000")
    try:
        from rinna_cli import server
    except ImportError as err:
        raise UsageError(f"rinna serve needs FastAPI and uvicorn ({err}); install them: pip install 'rinna-cli[serve]'") from None
    sock = server.listen(host, port)  # before loading: a taken port fails at once
    folder, tokenizer = _tokenizer(settings)
    engine = load_engine(settings, tokenizer)
    name = hub.expand(settings.model)
    url = server.url_of(sock)

    def ready() -> None:
        auth = f"; clients send the key in ${api_key_env}" if api_key else ""
        err_console().print(
            f"rinna serve: {name} on {engine.device} ({engine.dtype}) at {url}{auth} · Ctrl-C to stop",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip

    defaults = settings.generation()
    defaults["max_new_tokens"] = min(defaults["max_new_tokens"], engine.window - 1)
    application = server.create_app(engine, name, defaults, api_key=api_key, queue_size=queue_size, on_ready=ready)
    server.run(application, sock)
    return 0


def _quiet_broken_pipe() -> None:
    """stdout's reader went away: silence the final flush."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _error_line(message: str) -> None:
    err_console().print(f"rinna: error: {escape_controls(message)}", markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point: every failure becomes one line on stderr and an exit code."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8")
    try:
        code = typer.main.get_command(app).main(prog_name="rinna", standalone_mode=False)
        if sys.stdout is not None:
            sys.stdout.flush()  # a reader that went away shows here, not as "Exception ignored" at exit
    except typer.Abort:
        code = 130
    except typer.TyperException as err:  # typer's own click errors: bad option, missing value, unknown command
        context = getattr(err, "ctx", None)
        hint = f" (see '{context.command_path} --help')" if context else ""
        _error_line(f"{getattr(err, 'format_message', err.__str__)()}{hint}")
        code = getattr(err, "exit_code", 2)
    except RinnaError as err:
        _error_line(str(err))
        code = err.exit_code
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        _quiet_broken_pipe()
        code = 0
    except SystemExit as exit_:
        # typer answers a closed stdout (EPIPE) with a quiet exit 1; the reader going away is success here
        if not isinstance(exit_.__context__, BrokenPipeError):
            raise
        _quiet_broken_pipe()
        code = 0
    sys.exit(code if isinstance(code, int) else 0)
