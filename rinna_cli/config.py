"""Settings: shipped defaults < user config < ``RINNA_*`` environment < flags.

Every value is checked by one function, :func:`check`, whether it comes from a
file, the environment, a flag or the chat's ``/set``.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import urllib.parse
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from rinna_cli.contract import Sampling
from rinna_cli.errors import UsageError
from rinna_cli.inputs import decode

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

APP_NAME = "rinna-cli"
HOME_ENV = "RINNA_CLI_HOME"
CHOICES = {
    "device": ("auto", "cpu", "cuda", "mps"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "quantize": ("auto", "int8", "int4", "none"),
    # rinna serve: what a chat request's system message does (rinna's format has no system turn)
    "system_messages": ("reject", "merge"),
}
# key -> (type, lowest, highest, lowest is exclusive, what the range means)
RANGES = {
    "temperature": (float, 0.0, 5.0, False, "0 = greedy"),
    "top_p": (float, 0.0, 1.0, True, "1 = off"),
    "top_k": (int, 0, 100_000, False, "0 = off"),
    "repetition_penalty": (float, 0.0, 10.0, True, "1 = off"),
    "max_new_tokens": (int, 1, 2047, False, "less than the model's 2048-token window"),
    "seed": (int, -1, 2**32 - 1, False, "-1 = random"),
}
SAMPLING_KEYS = tuple(RANGES)
# Free-form strings: the OpenAI-compatible server to use instead of local weights ("" = local),
# and the name of the environment variable holding its API key (the key itself is never stored).
STRINGS = ("endpoint", "api_key_env")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Settings:
    model: str
    device: str
    dtype: str
    quantize: str
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    max_new_tokens: int
    seed: int
    endpoint: str
    api_key_env: str
    system_messages: str

    def sampling(self) -> Sampling:
        """The sampling options only."""
        return Sampling(**{key: getattr(self, key) for key in SAMPLING_KEYS})

    def with_value(self, key: str, raw: object, where: str = "") -> Settings:
        """A copy with ``key`` set to the checked ``raw`` value."""
        return replace(self, **{key: check(key, raw, where)})


KEYS = tuple(Settings.__dataclass_fields__)


def _range_text(key: str) -> str:
    kind, low, high, open_low, meaning = RANGES[key]
    left = f"{low} < {key}" if open_low else f"{low} <= {key}"
    return f"{left} <= {high} ({meaning})"


def check(key: str, raw: object, where: str = "") -> Any:
    """``raw`` as a valid value of ``key``, or a :class:`UsageError` naming the key, the place and the rule.

    Strings (from the environment or ``/set``) are parsed; other values must have the right type.
    """
    at = f"{where}: " if where else ""
    if key not in KEYS:
        raise UsageError(f"{at}unknown setting {key!r}; known: {', '.join(KEYS)}")
    if key in STRINGS:
        return _check_string(key, raw, at)
    if key in CHOICES or key == "model":
        if not isinstance(raw, str) or not raw.strip():
            raise UsageError(f"{at}{key} must be a non-empty string")
        if key in CHOICES and raw not in CHOICES[key]:
            raise UsageError(f"{at}{key} must be one of {', '.join(CHOICES[key])} (got {raw!r})")
        return raw
    kind, low, high, open_low, _ = RANGES[key]
    value = raw
    if isinstance(raw, str):
        try:
            value = kind(raw.strip())
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise UsageError(f"{at}{key} must be {expected} (got {raw!r}); allowed: {_range_text(key)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        expected = "an integer" if kind is int else "a number"
        raise UsageError(f"{at}{key} must be {expected} (got {type(raw).__name__} {raw!r})")
    value = kind(value)
    if value != value or value > high or value < low or (open_low and value == low):
        raise UsageError(f"{at}{key} = {raw} is out of range; allowed: {_range_text(key)}")
    return value


def _check_string(key: str, raw: object, at: str) -> str:
    if not isinstance(raw, str):
        raise UsageError(f"{at}{key} must be a string (got {type(raw).__name__} {raw!r})")
    value = raw.strip()
    if key == "endpoint":
        if not value:
            return ""  # the local engine
        parsed = urllib.parse.urlsplit(value)
        if "@" in parsed.netloc:  # checked first: no message may repeat a password
            raise UsageError(
                f"{at}endpoint must not hold credentials; put the API key in the environment variable "
                "named by api_key_env (RINNA_API_KEY by default)"
            )
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query or parsed.fragment:
            raise UsageError(
                f"{at}endpoint must be an http:// or https:// URL such as http://127.0.0.1:8000/v1, "
                f"or empty for the local model (got {raw!r})"
            )
        try:
            parsed.port
        except ValueError:
            raise UsageError(f"{at}endpoint has an invalid port (got {raw!r})") from None
        return value
    if not _ENV_NAME.fullmatch(value):
        raise UsageError(f"{at}{key} must name an environment variable, e.g. RINNA_API_KEY (got {raw!r})")
    return value


def app_dir() -> Path:
    """Where the user config, input history and saved sessions live."""
    home = os.environ.get(HOME_ENV)
    if home:
        return Path(home).expanduser()
    import typer

    return Path(typer.get_app_dir(APP_NAME))


def cache_dir() -> Path:
    """Where derived files (the int8 weights) are cached: ``$RINNA_CLI_HOME/cache`` or the user cache dir."""
    home = os.environ.get(HOME_ENV)
    if home:
        return Path(home).expanduser() / "cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / APP_NAME


def user_config_path() -> Path:
    return app_dir() / "config.toml"


def shipped_defaults() -> dict:
    """``config/defaults.toml``, the one place defaults are written (the flags' help reads them too)."""
    text = resources.files("rinna_cli.defaults").joinpath("defaults.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def _user_config(path: Path, warn) -> dict:
    try:
        text = decode(path.read_bytes(), f"the config file {path}")  # as stdin: a BOM dropped, else strict UTF-8
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as err:
        raise UsageError(f"{path}: cannot read the config file ({err})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"{path}: invalid TOML: {err}") from None
    known = {}
    for key, value in data.items():
        if key in KEYS:
            known[key] = check(key, value, str(path))
        else:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            warn(f"{path}: unknown key {key!r} ignored{hint}")
    return known


def load(flags: dict | None = None, environ: Mapping[str, str] | None = None, warn=None) -> Settings:
    """Merge the layers; ``flags`` holds only the options the user gave (None = not given)."""
    env = os.environ if environ is None else environ
    if warn is None:
        from rinna_cli.render import warn
    values = {key: check(key, value, "shipped defaults") for key, value in shipped_defaults().items()}
    values.update(_user_config(user_config_path(), warn))
    names = {f"RINNA_{key.upper()}": key for key in KEYS}
    for name, key in names.items():
        if env.get(name):
            values[key] = check(key, env[name], name)
    others = {*names, HOME_ENV, values["api_key_env"]}  # rinna-cli's variables that are no setting
    for name in env:  # a misspelt setting (RINNA_TEMPRATURE), as a config file's unknown key is told
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.85) if name.startswith("RINNA_") else []
        if close and name not in others:
            warn(f"unknown variable {name} ignored (did you mean {close[0]}?)")
    for key, value in (flags or {}).items():
        if value is not None:
            values[key] = check(key, value, f"--{key.replace('_', '-')}")
    return Settings(**values)
