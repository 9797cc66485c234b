"""The ``rinna`` command: declares the commands and their shared options, and hands over to
:mod:`.ask`, :mod:`.chat`, :mod:`.batch` and :mod:`.serve.command` (``--version``: :mod:`.about`).
Arguments that are not UTF-8 are refused here, by option name, before any command sees them.

torch and transformers are imported only by commands that load the weights. Every command
runs in an :class:`~rinna_cli.environment.Environment` (``ctx.obj``): :func:`run` takes one,
so tests run commands in-process with their own streams and engine.
"""

import atexit
import errno
import functools
import inspect
import os
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping, NoReturn, Optional, get_type_hints

import typer

from rinna_cli import config
from rinna_cli.environment import Environment
from rinna_cli.errors import RinnaError
from rinna_cli.inputs import check_text, dropped_mark

HELP_OPTIONS = ["-h", "--help"]
app = typer.Typer(
    name="rinna",
    help="Chat with rinna's Japanese GPT-NeoX instruction models (rinna/japanese-gpt-neox-3.6b-instruction-*).",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": HELP_OPTIONS},
)
# Under each command's options: where the defaults shown come from.
DEFAULTS_EPILOG = (
    "Defaults shown are the shipped ones; your config.toml and RINNA_* variables override them "
    "(rinna --version shows where the config is)."
)

# Shared option groups: each becomes a settings flag of the same name. Its default in --help is the
# shipped one; only an option given on the command line overrides the config (see settings_from).
SHIPPED = config.shipped_defaults()
MODEL_OPTIONS: dict[str, Any] = {
    "model": Annotated[str, typer.Option("--model", "-m", help="Hub id, local folder, or alias sft / sft-v2 / ppo.")],
}
LOAD_OPTIONS: dict[str, Any] = {
    "device": Annotated[str, typer.Option(help="auto | cpu | cuda | mps; auto = cuda, then mps, then cpu.")],
    "dtype": Annotated[
        str,
        typer.Option(
            help="auto | float32 | bfloat16 | float16; auto = float16 on a GPU; on the CPU what the quantized kernels "
            "measured fastest (float32 or bfloat16), bfloat16 with --quantize none."
        ),
    ],
    "quantize": Annotated[
        str,
        typer.Option(
            help="auto | int8 | int4 | none; auto = int8 weights on the CPU (cached, kernels measured, on the first start)."
        ),
    ],
}
SAMPLING_OPTIONS: dict[str, Any] = {
    "temperature": Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")],
    "top_p": Annotated[float, typer.Option(help="Nucleus sampling, 0 < p <= 1 (1 = off).")],
    "top_k": Annotated[int, typer.Option(help="Top-k sampling, 0 = off.")],
    "repetition_penalty": Annotated[float, typer.Option(help="1 = off.")],
    "max_new_tokens": Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate.")],
    "seed": Annotated[int, typer.Option(help="Same seed + same options = same reply; -1 = random.")],
}
ENDPOINT_OPTIONS: dict[str, Any] = {
    "endpoint": Annotated[
        str,
        typer.Option(
            help="Generate on this OpenAI-compatible server (vLLM, `rinna serve`), e.g. http://host:8000/v1; "
            "the prompt is still tokenized here. '' (the default) = the local model."
        ),
    ],
    "api_key_env": Annotated[
        str,
        typer.Option(help="The environment variable holding the endpoint's API key (sent as a Bearer token)."),
    ],
}
GENERATE_OPTIONS = (MODEL_OPTIONS, LOAD_OPTIONS, SAMPLING_OPTIONS, ENDPOINT_OPTIONS)


def _check_arguments(ctx: typer.Context, environ: Mapping[str, str]) -> None:
    """Refuses arguments (and RINNA_* settings) that are not UTF-8, by the option's name, before any use."""
    for param in ctx.command.params:
        values = ctx.params.get(param.name or "")
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if isinstance(value, (str, Path)):
                is_option = param.param_type_name == "option"
                option = max(param.opts, key=len) if is_option else f"the {param.name} argument"
                check_text(option, str(value))
    for key in config.KEYS:
        name = f"RINNA_{key.upper()}"
        check_text(name, environ.get(name, ""))


def settings_from(*groups: dict[str, Any]) -> Callable:
    """Adds the options of ``groups`` to a command; it receives them merged into ``settings`` and ``env`` from ``ctx``.

    In ``--help`` the shared options come first, in the groups' order, then the command's own.
    """
    names = [name for group in groups for name in group]

    def decorate(command: Callable) -> Callable:
        hints = get_type_hints(command, include_extras=True)
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(command).parameters.values()
            if p.name not in ("env", "settings", "given")
        ]
        shared = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=SHIPPED.get(name), annotation=annotation)
            for group in groups
            for name, annotation in group.items()
        ]
        context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        wants_given = "given" in inspect.signature(command).parameters

        @functools.wraps(command)
        def wrapper(ctx: typer.Context, **values: Any) -> Any:
            _check_arguments(ctx, ctx.obj.environ)
            values = {name: dropped_mark(value) for name, value in values.items()}
            given = {name: values.pop(name) for name in names}
            flags = {name: value for name, value in given.items() if _on_command_line(ctx, name)}
            if wants_given:  # the command restores stored settings except those given as flags
                values["given"] = frozenset(flags)
            return command(ctx.obj, config.load(flags, ctx.obj.environ, ctx.obj.warn), **values)

        own_hints = {p.name: hints[p.name] for p in own if p.name in hints}
        wrapper.__annotations__ = {**own_hints, **{p.name: p.annotation for p in shared}, "ctx": typer.Context}
        wrapper.__signature__ = inspect.Signature([*shared, *own, context])  # type: ignore[attr-defined]
        return wrapper

    return decorate


def _on_command_line(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was given (not its default: the config, environment and defaults decide then)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


@app.callback(invoke_without_command=True)
def rinna(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            is_eager=True,
            help="Print the versions of rinna-cli, Python, torch, transformers and sentencepiece, "
            "and where the config, sessions and caches are.",
        ),
    ] = False,
) -> None:
    """``rinna --version``; ``rinna`` alone prints the help (exit 0)."""
    if version:
        from rinna_cli.about import version_text

        print(version_text(), file=ctx.obj.stdout)
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())  # as --help does (typer's Rich help writes to the process's stdout)
        raise typer.Exit(0)


@app.command(epilog=DEFAULTS_EPILOG)
@settings_from(MODEL_OPTIONS)
def tokenize(
    env: Environment,
    settings: config.Settings,
    text: Annotated[Optional[str], typer.Argument(help="Text to tokenize; '-' or none reads standard input.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="One JSON object: text, tokens, ids, count.")] = False,
    count: Annotated[
        bool, typer.Option("--count", help="Print only the number of tokens (with --json: an object with count).")
    ] = False,
) -> None:
    """Show how rinna's sentencepiece tokenizer splits TEXT (newlines become <NL>, as in every prompt)."""
    from rinna_cli.ask import tokenize

    tokenize(env, settings, text, json_, count)


@app.command(epilog=DEFAULTS_EPILOG)
@settings_from(*GENERATE_OPTIONS)
def ask(
    env: Environment,
    settings: config.Settings,
    question: Annotated[
        Optional[str],
        typer.Argument(
            help="The question. With text on standard input too, this is the instruction and stdin the material."
        ),
    ] = None,
    json_: Annotated[
        bool, typer.Option("--json", help="Print one JSON object after generation (also after Ctrl-C).")
    ] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Tokens, time to first token and tokens/s on stderr.")] = False,
    show_prompt: Annotated[
        bool,
        typer.Option(
            "--show-prompt",
            help="Print the exact prompt and its token count, and whether it fits the window; load no weights.",
        ),
    ] = False,
) -> int:
    """Ask one question; the reply streams to stdout (plain text when piped)."""
    from rinna_cli.ask import ask

    return ask(env, settings, question, json_, stats, show_prompt)


@app.command(epilog=DEFAULTS_EPILOG)
@settings_from(*GENERATE_OPTIONS)
def chat(
    env: Environment,
    settings: config.Settings,
    session: Annotated[
        Optional[str],
        typer.Argument(
            metavar="N|ID",  # shown as [N|ID], optional
            show_default=False,
            help="With --resume: the N-th of `rinna sessions`, or a session id (or its start).",
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue a saved session: the last chat on a terminal, or [N|ID].")
    ] = False,
    load: Annotated[Optional[Path], typer.Option("--load", help="Continue a transcript saved with /save.")] = None,
    given: frozenset = frozenset(),
) -> int:
    """Chat in a multi-turn conversation. Piped standard input: one user turn per line."""
    from rinna_cli.chat import chat, resume_target

    return chat(env, settings, resume_target(resume, session), load, given)


@app.command()
def sessions(ctx: typer.Context, limit: Annotated[int, typer.Option(help="How many to list.")] = 20) -> int:
    """List the saved chat sessions, newest first, numbered as `rinna chat --resume N` takes them."""
    from rinna_cli.chat import list_sessions

    return list_sessions(ctx.obj, limit)


@app.command(epilog=DEFAULTS_EPILOG)
@settings_from(*GENERATE_OPTIONS)
def batch(
    env: Environment,
    settings: config.Settings,
    source: Annotated[
        Optional[str], typer.Argument(help="Prompts, one a line (text or JSON); '-' or none reads standard input.")
    ] = None,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="Write the rows to this file; a rerun skips the ids it already holds."),
    ] = None,
    parallel: Annotated[
        int,
        typer.Option(help="Prompts generated at once (batched on local weights; concurrent requests with --endpoint)."),
    ] = 8,
) -> int:
    """Run a file of prompts through the model: one JSON row out per line in."""
    from rinna_cli.batch import batch

    return batch(env, settings, source, output, parallel)


@app.command(epilog=DEFAULTS_EPILOG)
@settings_from(MODEL_OPTIONS, LOAD_OPTIONS, SAMPLING_OPTIONS)
def serve(
    env: Environment,
    settings: config.Settings,
    host: Annotated[
        str, typer.Option(help="Address to listen on; any but a loopback one (127.0.0.1, ::1) needs --api-key-env.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on; 0 = a free one (the address is printed).")] = 8000,
    api_key_env: Annotated[
        Optional[str],
        typer.Option(help="Require the key held in this environment variable (clients send it as a Bearer token)."),
    ] = None,
    queue_size: Annotated[
        int, typer.Option(help="Requests that may wait while --parallel replies are generated; more get HTTP 429.")
    ] = 4,
    parallel: Annotated[
        Optional[int],
        typer.Option(
            help="Replies generated at once (batched); 1 = one at a time, byte-identical to rinna ask. "
            "\\[default: 4 on local weights]",
            show_default=False,
        ),
    ] = None,
    served_model_name: Annotated[
        Optional[str],
        typer.Option(
            help="The model's name in /v1/models and answers; requests may name any model. \\[default: the --model given]"
        ),
    ] = None,
    system_messages: Annotated[
        Optional[str],
        typer.Option(
            help="reject | merge: a system message gets HTTP 400, or its text (then a blank line) starts the next "
            "user message. \\[default: the config's system_messages, reject]"
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No access-log line per request on stderr.")] = False,
) -> int:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."""
    from rinna_cli.serve.command import serve

    return serve(
        env,
        settings,
        host=host,
        port=port,
        api_key_env=api_key_env,
        queue_size=queue_size,
        served_model_name=served_model_name,
        quiet=quiet,
        system_messages=system_messages,
        parallel=parallel,
    )


def _unwritten(err: OSError) -> str:
    """What failed, in one line: the file named, or the output (standard output, a file) that could not be written."""
    reason = err.strerror or str(err)
    if err.filename:
        return f"{err.filename}: {reason}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
        return f"cannot write the output ({reason})"
    return reason


def _quiet_broken_pipe() -> None:
    """stdout's reader went away: silence the final flush."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _plain_switches(command: Any) -> Any:
    """``command`` (and its subcommands) with boolean flags shown as switches in --help, not as ``--json <bool>``."""
    context = typer.Context(command, help_option_names=HELP_OPTIONS)
    for param in command.get_params(context):  # the help option too
        if getattr(param, "is_flag", False):
            param.metavar = ""
    for subcommand in getattr(command, "commands", {}).values():
        _plain_switches(subcommand)
    return command


def run(args: list[str], env: Environment) -> int:
    """Run ``rinna ARGS`` in ``env``; every failure becomes one line on stderr and an exit code."""
    try:
        command = _plain_switches(typer.main.get_command(app))
        code = command.main(args, prog_name="rinna", standalone_mode=False, obj=env)
        env.stdout.flush()  # a reader that went away shows here, not as "Exception ignored" at exit
    except typer.Abort:
        code = 130
    except typer.TyperException as err:  # typer's own click errors: bad option, missing value, unknown command
        context = getattr(err, "ctx", None)
        hint = f" (see '{context.command_path} --help')" if context else ""
        env.error(f"{getattr(err, 'format_message', err.__str__)()}{hint}")
        code = getattr(err, "exit_code", 2)
    except RinnaError as err:
        env.error(str(err))
        code = err.exit_code
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        _quiet_broken_pipe()
        code = 0
    except OSError as err:  # a full disk, a closed standard output, a folder of -o that is not there
        env.error(_unwritten(err))
        code = 1
    except SystemExit as exit_:
        # typer answers a closed stdout (EPIPE) with a quiet exit 1; the reader going away is success here
        if not isinstance(exit_.__context__, BrokenPipeError):
            raise
        _quiet_broken_pipe()
        code = 0
    return code if isinstance(code, int) else 0


def main() -> NoReturn:
    """Entry point of the ``rinna`` executable."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8")
    exit_now(run(sys.argv[1:], Environment()))


def exit_now(code: int) -> NoReturn:
    """Exit as the interpreter would, but without tearing down every module and object it holds.

    With torch and transformers imported, that teardown took 1.2 s after the reply was printed
    (Zen 5). What an exit must still do is done here: non-daemon threads are joined, atexit
    functions (logging, temporary files) run and the standard streams are flushed.
    """
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: closed (``>&-``)
                stream.flush()
        except (OSError, ValueError):  # a reader that went away was answered in run()
            pass
    os._exit(code)
