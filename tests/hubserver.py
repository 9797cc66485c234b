"""A Hugging Face hub stand-in on 127.0.0.1, enough for huggingface_hub's downloads (``HF_ENDPOINT``).

It answers what ``snapshot_download``/``hf_hub_download`` and ``HfApi.model_info`` ask:

* ``GET /api/models/{repo}[/revision/{rev}]``: the commit and the files with their sizes;
* ``GET /api/models/{repo}/tree/{rev}``: the file listing;
* ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: the file, with the hub's headers (``X-Repo-Commit``,
  ``ETag``/``X-Linked-Etag``, ``X-Linked-Size`` for large files) and byte ranges (resumed downloads);
* unknown repos: 404 with ``X-Error-Code: RepoNotFound``, as the hub does.

Every request is recorded. ``hold[name] = n`` makes the server send the first ``n`` bytes of that file
and then wait until ``release`` is set before the rest (a download to interrupt, or to watch); ``cut[name] = n`` sends ``n`` bytes and
closes the connection, once (a dropped connection).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LARGE = 10_000  # files from this size are served as LFS files (the hub's large-file headers)


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str = ""

    def __post_init__(self):
        if not self.sha:
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
            self.sha = digest.hexdigest()

    @classmethod
    def from_folder(cls, folder: Path, only: tuple[str, ...] | None = None, extra: dict[str, bytes] | None = None):
        files = {
            p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and (only is None or p.name in only)
        }
        return cls({**files, **(extra or {})})


def _etag(data: bytes) -> str:
    return (
        hashlib.sha256(data).hexdigest()
        if len(data) >= LARGE
        else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    )


@dataclass
class Hub:
    repos: dict[str, Repo]
    url: str = ""
    requests: list[dict] = field(default_factory=list)
    hold: dict[str, int] = field(default_factory=dict)
    cut: dict[str, int] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    held: threading.Event = field(default_factory=threading.Event)  # set once a held file has sent its bytes

    def downloads(self, name: str) -> list[dict]:
        """The GET requests for file ``name``."""
        return [r for r in self.requests if r["method"] == "GET" and r["file"] == name]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, data: object) -> None:
        self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _not_found(self, head: bool = False) -> None:
        self._send(404, b'{"error":"Repository not found"}', {
            "Content-Type": "application/json", "X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found",
        }, head)  # fmt: skip

    def do_HEAD(self):
        self._route(head=True)

    def do_GET(self):
        self._route(head=False)

    def _route(self, head: bool) -> None:
        hub = self.server.hub
        path = self.path.split("?", 1)[0]
        record = {"method": self.command, "path": self.path, "file": None, "range": self.headers.get("Range")}
        hub.requests.append(record)
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/.*)?)?", path)
        if api:
            repo = hub.repos.get(api[1])
            if repo is None:
                return self._not_found(head)
            if api[2] in (None, "revision"):
                siblings = [self._sibling(name, data) for name, data in sorted(repo.files.items())]
                return self._json(
                    {"id": api[1], "modelId": api[1], "sha": repo.sha, "private": False, "siblings": siblings}
                )
            return self._json([self._tree_entry(name, data) for name, data in sorted(repo.files.items())])
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo = hub.repos.get(resolve[1]) if resolve else None
        if repo is None:
            return self._not_found(head)
        name = resolve[3]
        record["file"] = name
        if name not in repo.files:
            return self._send(
                404, b"Entry not found", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha}, head
            )
        self._file(repo, name, head)

    @staticmethod
    def _sibling(name: str, data: bytes) -> dict:
        entry = {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
        if len(data) >= LARGE:
            entry["lfs"] = {"sha256": _etag(data), "size": len(data), "pointerSize": 134}
        return entry

    @staticmethod
    def _tree_entry(name: str, data: bytes) -> dict:
        entry = {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": name}
        if len(data) >= LARGE:
            entry["lfs"] = {"oid": _etag(data), "size": len(data), "pointerSize": 134}
        return entry

    def _file(self, repo: Repo, name: str, head: bool) -> None:
        hub = self.server.hub
        data = repo.files[name]
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{_etag(data)}"', "Accept-Ranges": "bytes"}
        if len(data) >= LARGE:
            headers.update({"X-Linked-Etag": f'"{_etag(data)}"', "X-Linked-Size": str(len(data))})
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if ranged and not head:
            start = int(ranged[1])
        body = data[start:]
        self.send_response(206 if start else 200)
        for key, value in headers.items():
            self.send_header(key, value)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        cut = hub.cut.pop(name, None)
        if cut is not None and cut > start:
            self.wfile.write(body[: cut - start])
            self.wfile.flush()
            self.close_connection = True
            return
        limit = hub.hold.get(name)
        if limit is None or start >= limit:
            self.wfile.write(body)
            return
        self.wfile.write(body[: limit - start])
        self.wfile.flush()
        hub.held.set()
        hub.release.wait(120)
        try:
            self.wfile.write(body[limit - start :])
        except OSError:  # the client went away meanwhile (Ctrl-C)
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: Hub


class HubServer:
    """``with HubServer({"rinna/x": Repo(...)}) as hub:`` serves on ``hub.url`` until the block ends."""

    def __init__(self, repos: dict[str, Repo]):
        self.hub = Hub(repos)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self.hub
        self.url = self.hub.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Hub:
        self._thread.start()
        return self.hub

    def __exit__(self, *exc) -> None:
        self.hub.release.set()
        self._server.shutdown()
        self._server.server_close()
