"""``rinna serve``: checks the options, listens, loads the model, then runs the app (FastAPI imported only here)."""

from __future__ import annotations

import signal
import socket
import sys
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from rinna_cli import config, hub
from rinna_cli.contract import Engine, placement
from rinna_cli.environment import Environment, model_files
from rinna_cli.errors import RinnaError, UsageError

if TYPE_CHECKING:
    import uvicorn

    from rinna_cli.serve.jobs import State

MAX_PARALLEL = 64  # generate calls the server runs at once at most
# --parallel's default on local weights: 4 concurrent clients got x2.6-3.1 the aggregate tokens/s of one
# at a time at full size with 128-token replies (AMD EPYC Zen 5, int8dot; docs/benchmarks.md), each
# stream slower than one alone; at 8 each stream slows further. Other engines take one at a time.
DEFAULT_PARALLEL = 4


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0 = a free one), or a one-line error."""
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UsageError(f"--host {host}: cannot resolve it ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise RinnaError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    sock.setblocking(False)
    return sock


def addresses(sock: socket.socket) -> tuple[str, str]:
    """The URL to print for a bound socket, and a note when it listens on every interface.

    ``0.0.0.0`` and ``::`` are not addresses one can connect to: the URL then names loopback, and the
    note says how other machines reach it (by this host's name).
    """
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        local = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
        note = f"listening on all interfaces ({host}); from other machines: http://{socket.gethostname()}:{port}/v1"
        return f"http://{local}:{port}/v1", note
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1", ""


def _api_key(env: Environment, host: str, api_key_env: str | None) -> str | None:
    """The key clients must send; without one only a loopback address may be bound."""
    if api_key_env is None:
        if not is_loopback(host):
            raise UsageError(
                f"--host {host} takes connections from other machines; require an API key with "
                "--api-key-env NAME (the environment variable holding it), or bind 127.0.0.1"
            )
        return None
    name = config.check("api_key_env", api_key_env, "--api-key-env")
    key = env.environ.get(name, "").strip()
    if not key:
        raise UsageError(f"--api-key-env {name}: the variable is unset or empty; set it to the key clients must send")
    return key


def batching(engine: Engine, parallel: int | None) -> tuple[Engine, int]:
    """An engine that takes ``parallel`` concurrent ``generate`` calls (None: :data:`DEFAULT_PARALLEL` for
    local weights, else 1), and that number: the local one behind a batching engine.

    Prompts are prefilled in chunks while others decode, so that a long prompt stalls the running
    replies for about a second at most. Any other engine (remote, scripted) is used as it is.
    """
    local = sys.modules.get("rinna_cli.engine")
    is_local = local is not None and isinstance(engine, local.Engine)
    parallel = parallel or (DEFAULT_PARALLEL if is_local else 1)
    if parallel > 1 and is_local:
        from rinna_cli.batching import BatchingEngine

        return BatchingEngine.wrap(engine, parallel), parallel
    return engine, parallel


@dataclass
class Serving:
    """A server ready to run: the listening socket, the app, and what to say when it starts and stops."""

    env: Environment
    sock: socket.socket
    server: uvicorn.Server
    state: State
    engine: Engine

    def run(self) -> int:
        """Serve until SIGINT or SIGTERM (or :meth:`stop`); returns the exit code, 0 after either signal.

        uvicorn shuts down gracefully on those signals, then raises them again under the handlers it found, which
        by default would end the process there (130 or 143, without the summary): the handlers here do nothing.
        """
        handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
        previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in handled}
        try:
            self.server.run(sockets=[self.sock])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            close = getattr(self.engine, "close", None)
            if callable(close):
                close()
        state = self.state
        tokens = f"{state.generated_tokens} token{'s' * (state.generated_tokens != 1)}"
        self.env.errors().print(
            f"rinna serve: stopped after {state.completions} completion{'s' * (state.completions != 1)} ({tokens})",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip
        return 0

    def stop(self) -> None:
        self.server.should_exit = True


def prepare(
    env: Environment,
    settings: config.Settings,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key_env: str | None = None,
    queue_size: int = 4,
    served_model_name: str | None = None,
    quiet: bool = False,
    system_messages: str | None = None,
    parallel: int | None = None,
) -> Serving:
    """Check the options, listen, load the model: a :class:`Serving` to run."""
    api_key = _api_key(env, host, api_key_env)
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is out of range; allowed: 0 <= port <= 65535 (0 = a free one)")
    if not 0 <= queue_size <= 1000:
        raise UsageError(f"--queue-size {queue_size} is out of range; allowed: 0 <= queue_size <= 1000")
    if parallel is not None and not 1 <= parallel <= MAX_PARALLEL:
        raise UsageError(f"--parallel {parallel} is out of range; allowed: 1 <= parallel <= {MAX_PARALLEL}")
    if served_model_name is not None and (
        not served_model_name.strip() or served_model_name != served_model_name.strip()
    ):
        raise UsageError(f"--served-model-name {served_model_name!r}: give a name without surrounding spaces")
    if system_messages is not None:
        settings = settings.with_value("system_messages", system_messages, "--system-messages")
    try:
        import uvicorn

        from rinna_cli.serve.app import create_app
    except ImportError as err:
        raise UsageError(
            f"rinna serve needs FastAPI and uvicorn ({err}); install them: pip install 'rinna-cli[serve]'"
        ) from None
    sock = listen(host, port)  # before loading: a taken port fails at once
    try:
        tokenizer, window = model_files(settings)
        loaded = env.open_engine(env, replace(settings, endpoint=""), tokenizer, window)
        engine, parallel = batching(loaded, parallel)
    except BaseException:
        sock.close()
        raise
    name = served_model_name or hub.expand(settings.model)
    url, note = addresses(sock)
    errors = env.errors()

    def ready() -> None:
        served = f"{hub.expand(settings.model)} as {name!r}" if served_model_name else name
        parts = [f"rinna serve: {served} on {placement(loaded)} at {url}"]  # the batching engine runs its model
        parts += [note] if note else []
        parts += [f"up to {parallel} replies at once"] if parallel > 1 else []
        parts += [f"clients send the key in ${api_key_env}"] if api_key else []
        errors.print(f"{'; '.join(parts)} · Ctrl-C to stop", markup=False, highlight=False, soft_wrap=True)

    def log(line: str) -> None:
        errors.print(line, markup=False, highlight=False, soft_wrap=True)

    sampling = settings.sampling()
    defaults = replace(sampling, max_new_tokens=min(sampling.max_new_tokens, engine.window - 1))
    app = create_app(
        engine, defaults, queue_size, name=name, api_key=api_key, on_ready=ready, parallel=parallel,
        system_messages=settings.system_messages, log=None if quiet else log,
    )  # fmt: skip
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=3)
    )
    return Serving(env, sock, server, app.state.rinna, engine)


def serve(env: Environment, settings: config.Settings, **options: Any) -> int:
    """``rinna serve`` (``options`` as :func:`prepare` takes them): serves until SIGINT or SIGTERM; the exit code."""
    return prepare(env, settings, **options).run()
