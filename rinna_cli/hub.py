"""Where a model lives: a local folder, or a hub id fetched into the Hugging Face cache.

Only the files a command needs are fetched: ``tokenize``, ``--show-prompt`` and
``--endpoint`` take the tokenizer files and ``config.json``, never the 7 GB of
weights. The weights are the repo's safetensors when it has any, its
``pytorch_model*.bin`` only when it has none: never both. Before weights are
downloaded, one line on stderr says how much, where to, what the first start
then does, and that Ctrl-C is safe: files already fetched stay in the cache, and a
file cut short (a dropped connection, Ctrl-C, a kill) is continued where it stopped.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterator

from rinna_cli.errors import ModelError, UsageError
from rinna_cli.tokenizer import TOKENIZER_FILES

DEFAULT_MODEL = "rinna/japanese-gpt-neox-3.6b-instruction-sft"
ALIASES = {
    "sft": DEFAULT_MODEL,
    "sft-v2": "rinna/japanese-gpt-neox-3.6b-instruction-sft-v2",
    "ppo": "rinna/japanese-gpt-neox-3.6b-instruction-ppo",
}
CONFIG = "config.json"
SAFETENSORS = ("*.safetensors", "*.safetensors.index.json")
PICKLE = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
# The committed model that answers a few fixed prompts (README: "Try it without downloading").
DEMO_MODEL = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "memorized"
# The first start on a CPU quantizes the weights to int8: 31.7 s for 7.21 GB of float16 safetensors
# on a 2-core AMD EPYC (docs/benchmarks.md), about 4.4 s per GB.
_INT8_SECONDS_PER_GB = 4.4


def expand(name: str) -> str:
    """A model alias (``sft``, ``sft-v2``, ``ppo``) as its hub id; anything else unchanged."""
    return ALIASES.get(name, name)


def canonical(name: str) -> str:
    """One spelling per model: aliases expanded, folders as resolved absolute paths."""
    name = expand(name)
    return str(Path(name).expanduser().resolve()) if _is_path(name) else name


def _is_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).exists() or name.count("/") > 1


def locate(name: str, weights: bool = False, generating: bool = True) -> Path:
    """The local folder holding ``name``'s tokenizer and config (and weights if asked); ``generating`` False where
    only the tokenizer is the point (``rinna tokenize``, a server generating), for the advice when it is missing."""
    name = expand(name)
    if _is_path(name):
        folder = Path(name).expanduser()
        if folder.exists() and not folder.is_dir():  # named as given (./x, ~/x), not as Path prints it
            raise ModelError(
                f"{name}: a file, not a model folder (--model takes a folder holding config.json, spiece.model "
                "and the weights, a hub id or an alias)"
            )
        if not folder.is_dir():
            raise ModelError(f"{name}: no such model folder")
        return folder
    if "/" not in name:
        close = difflib.get_close_matches(name, ALIASES, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UsageError(
            f"unknown model {name!r}; {hint}--model takes an alias ({', '.join(ALIASES)}), "
            "a hub id such as rinna/japanese-gpt-neox-3.6b-instruction-sft, or a model folder"
        )
    return _from_hub(name, weights, generating)


def _from_hub(repo_id: str, weights: bool, generating: bool = True) -> Path:
    from huggingface_hub import constants

    files = [*TOKENIZER_FILES, CONFIG]
    listing = None if constants.HF_HUB_OFFLINE else _listing(repo_id)
    if listing is None:  # offline, or the hub did not answer: the cache decides
        folder = _from_cache(repo_id, files + list(SAFETENSORS) if weights else files, generating)
        if weights and not any(folder.glob("*.safetensors")):
            folder = _from_cache(repo_id, files + list(PICKLE))
        if weights and not _weight_files(folder):
            raise ModelError(_not_cached(repo_id, "its weights are"))
        return folder
    sha, sizes = listing
    wanted = [name for name in files if name in sizes]
    if weights:
        chosen = _weights_of(sizes)
        if not chosen:
            raise ModelError(f"{repo_id}: the repo holds no weights (no *.safetensors, no pytorch_model*.bin)")
        to_fetch = [sizes[name] for name in chosen if not _cached(repo_id, name, sha)]
        if to_fetch:
            _announce(repo_id, None if None in to_fetch else sum(n or 0 for n in to_fetch))
        wanted += chosen
    cached = {name: _cached(repo_id, name, sha) for name in wanted}
    missing_files = [name for name, path in cached.items() if path is None]
    first = next((path for path in cached.values() if path is not None), None)
    if wanted and not missing_files and first:  # nothing to fetch: no progress bar, no more requests
        return Path(first).parent
    return _download(repo_id, missing_files or wanted)


def _listing(repo_id: str) -> tuple[str, dict[str, int | None]] | None:
    """The repo's commit and its files with their sizes, or None when the hub cannot say (the cache is used then)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        info = HfApi().model_info(repo_id, files_metadata=True)
    except (RepositoryNotFoundError, GatedRepoError):
        raise ModelError(f"{repo_id}: no such model on the Hugging Face hub (or it needs a login)") from None
    except Exception:  # no network, a proxy, a hub error: snapshot_download falls back to the cache or says why
        return None
    if info.sha is None:
        return None
    return info.sha, {sibling.rfilename: sibling.size for sibling in info.siblings or []}


def _weights_of(sizes: dict) -> list[str]:
    """The weight files to fetch: the safetensors set if the repo has one, else the pickle set."""
    for patterns in (SAFETENSORS, PICKLE):
        chosen = sorted(name for name in sizes if "/" not in name and any(fnmatch(name, p) for p in patterns))
        if any(not name.endswith(".json") for name in chosen):
            return chosen
    return []


def _weight_files(folder: Path) -> list[Path]:
    return [*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")]


def _cached(repo_id: str, filename: str, sha: str) -> str | None:
    """The cached file's path in the snapshot of commit ``sha``, or None."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, filename, revision=sha)
    return path if isinstance(path, str) else None


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e8 else f"{max(n_bytes / 1e6, 0.1):.1f} MB"


def _announce(repo_id: str, n_bytes: int | None) -> None:
    """The one line before a first download: how much, where to, what comes next, and that Ctrl-C is safe."""
    from huggingface_hub import constants

    from rinna_cli.render import err_console

    cache = str(constants.HF_HUB_CACHE)
    home = str(Path.home())
    cache = "~" + cache[len(home) :] if cache.startswith(home + os.sep) else cache
    size = _size(n_bytes) if n_bytes is not None else "size unknown"
    took = (
        f"about {max(5, round(n_bytes / 1e9 * _INT8_SECONDS_PER_GB / 5) * 5)} s"
        if n_bytes
        else f"about {_INT8_SECONDS_PER_GB:g} s per GB"
    )
    err_console().print(
        f"rinna: downloading {repo_id} ({size}) into {cache}, once; on a CPU the first start then "
        f"converts the weights to int8 ({took}, also once). Ctrl-C is safe: run it again to continue.",
        markup=False, highlight=False, soft_wrap=True,
    )  # fmt: skip


def _not_cached(repo_id: str, what: str = "it is", generating: bool = True) -> str:
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"the hub ({constants.ENDPOINT}) cannot be reached"
    demo = DEMO_MODEL if DEMO_MODEL.is_dir() else "tests/fixtures/memorized (in rinna-cli's source)"
    if not generating:
        return (
            f"{repo_id}: its tokenizer is not in the local Hugging Face cache and {why}; give --model a local folder "
            f"holding it (spiece.model and config.json), or try the demo model: --model {demo}"
        )
    return (
        f"{repo_id}: {what} not in the local Hugging Face cache and {why}; without a download, generate on a "
        f"server with --endpoint URL (and --model a local folder holding its tokenizer), or try the demo model: --model {demo}"
    )


def _from_cache(repo_id: str, patterns: list[str], generating: bool = True) -> Path:
    """Offline, or the hub did not list the repo: huggingface_hub's snapshot logic decides.

    It returns the cached snapshot (checked complete where it knows the repo's files), or raises
    :class:`LocalEntryNotFoundError`, which becomes the not-cached message.
    """
    from huggingface_hub import snapshot_download

    with _hub_errors(repo_id, generating):
        return Path(snapshot_download(repo_id, allow_patterns=patterns))


def _download(repo_id: str, names: list[str]) -> Path:
    """Fetch ``names`` one after another (a progress bar each, on a terminal) into the cache; the snapshot folder.

    The files come down in a daemon thread so that Ctrl-C ends the command at once: huggingface_hub's
    own thread pool (snapshot_download) would keep the process alive until the current file is done.
    """
    from rinna_cli.interrupt import in_a_daemon_thread

    with _hub_errors(repo_id):
        try:
            paths = in_a_daemon_thread(lambda: [_fetch(repo_id, name) for name in names], "rinna-download")
        except KeyboardInterrupt:
            print(
                f"rinna: download of {repo_id} interrupted; run the same command again to continue it", file=sys.stderr
            )
            raise
    return Path(paths[-1]).parent


def _fetch(repo_id: str, name: str) -> str:
    """One file into the cache, resuming what an earlier run left: the cached file's path.

    huggingface_hub resumes a dropped connection within one process, but writes to a file unique
    to the process and deletes it when the process ends, so after a Ctrl-C a 7 GB file would start
    over. Here the bytes go to ``blobs/<etag>.part`` (under huggingface_hub's lock for that blob),
    continued with a range request by the next run and renamed to the blob when complete;
    ``hf_hub_download`` then finds the blob and links it into the snapshot as usual.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.file_download import http_get, repo_folder_name
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    meta = get_hf_file_metadata(hf_hub_url(repo_id, name))
    folder = repo_folder_name(repo_id=repo_id, repo_type="model")
    blob = Path(constants.HF_HUB_CACHE) / folder / "blobs" / (meta.etag or "")
    if meta.etag and not blob.exists():
        lock = Path(constants.HF_HUB_CACHE) / ".locks" / folder / f"{meta.etag}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        blob.parent.mkdir(parents=True, exist_ok=True)
        part = blob.with_name(f"{meta.etag}.part")
        with WeakFileLock(lock):
            if not blob.exists():  # another run may have finished it meanwhile
                with part.open("ab", buffering=0) as out:  # unbuffered: a kill keeps what was written
                    if meta.size is not None and out.tell() > meta.size:  # not this file's start
                        out.seek(0)
                        out.truncate()
                    http_get(
                        meta.location, out, resume_size=out.tell(), headers=build_hf_headers(),
                        expected_size=meta.size, displayed_filename=name,
                    )  # fmt: skip
                part.replace(blob)
    return hf_hub_download(repo_id, name)


@contextmanager
def _hub_errors(repo_id: str, generating: bool = True) -> Iterator[None]:
    """huggingface_hub's exceptions as one-line :class:`ModelError` messages."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        yield
    except LocalEntryNotFoundError:
        raise ModelError(_not_cached(repo_id, generating=generating)) from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise ModelError(f"{repo_id}: no such model on the Hugging Face hub (or it needs a login)") from None
    except HfHubHTTPError as err:
        raise ModelError(f"{repo_id}: download failed: {str(err).splitlines()[0]}") from None
    except Exception as err:  # OSError, or the HTTP client's own errors (a connection cut short, ...)
        said = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelError(f"{repo_id}: download failed: {said}") from None


def read_config(folder: Path) -> dict:
    """``config.json``, checked to be a GPT-NeoX causal LM."""
    path = folder / CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: missing; a rinna model folder holds config.json") from None
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("model_type") != "gpt_neox":
        kind = data.get("model_type") if isinstance(data, dict) else None
        raise ModelError(f"{path}: model_type is {kind!r}, not 'gpt_neox'; rinna-cli runs rinna's GPT-NeoX models")
    return data


def context_window(config: dict) -> int:
    return int(config.get("max_position_embeddings", 2048))
