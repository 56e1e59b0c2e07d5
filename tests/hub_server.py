"""A Hugging Face Hub on 127.0.0.1 for the tests: the routes huggingface_hub calls, over
checkpoint folders on disk, counting the body bytes it sends per file.

    GET       /api/models/{org}/{name}/revision/{rev}   repository info: sha, siblings with sizes
    HEAD/GET  /{org}/{name}/resolve/{rev}/{file}        the file (Range supported), with the
                                                        X-Repo-Commit / ETag headers of the Hub
Errors carry the Hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo),
which huggingface_hub turns into its typed exceptions.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

CHUNK = 1 << 20


@dataclass
class Repo:
    folder: Path
    sha: str
    gated: bool = False

    def files(self) -> dict[str, Path]:
        return {p.relative_to(self.folder).as_posix(): p
                for p in sorted(self.folder.rglob("*")) if p.is_file()}


class HubServer:
    """`with HubServer() as hub: hub.add("org/name", folder)`; `hub.sent[(repo, file)]` is the
    number of body bytes sent for that file."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.sent: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, repo_id: str, folder: Path, gated: bool = False) -> str:
        """Serve `folder` as `repo_id` (revision main, or its commit sha); returns the sha."""
        sha = hashlib.sha1(repo_id.encode()).hexdigest()
        self.repos[repo_id] = Repo(folder, sha, gated)
        return sha

    def sent_for(self, repo_id: str, suffix: str = "") -> dict[str, int]:
        return {f: n for (r, f), n in self.sent.items() if r == repo_id and f.endswith(suffix)}

    def reset(self) -> None:
        with self.lock:
            self.sent.clear()

    def __enter__(self) -> HubServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


API = re.compile(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)")
RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:   # quiet test output
            pass

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def _reply(self, status: int, headers: dict[str, str], payload: bytes = b"",
                   body: bool = True) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body and payload:
                self.wfile.write(payload)

        def _error(self, status: int, code: str, body: bool, commit: str | None = None) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": code,
                       "Content-Type": "application/json"}
            if commit:
                headers["X-Repo-Commit"] = commit
            self._reply(status, headers, json.dumps({"error": code}).encode(), body)

        def _repo(self, repo_id: str, rev: str, body: bool) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", body)
            elif rev not in ("main", repo.sha):
                self._error(404, "RevisionNotFound", body)
            else:
                return repo
            return None

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            if m := API.fullmatch(path):
                repo = self._repo(m[1], m[2], body)
                if repo is not None:   # a gated repository's info is public, its files are not
                    info = {"id": m[1], "modelId": m[1], "sha": repo.sha, "private": False,
                            "siblings": [{"rfilename": f, "size": p.stat().st_size}
                                         for f, p in repo.files().items()]}
                    self._reply(200, {"Content-Type": "application/json"},
                                json.dumps(info).encode(), body)
            elif m := RESOLVE.fullmatch(path):
                repo = self._repo(m[1], m[2], body)
                if repo is None:
                    return
                if repo.gated:
                    self._error(401, "GatedRepo", body)
                    return
                file = repo.files().get(m[3])
                if file is None:
                    self._error(404, "EntryNotFound", body, commit=repo.sha)
                    return
                self._send_file(m[1], m[3], file, repo.sha, body)
            else:
                self._error(404, "RepoNotFound", body)

        def _send_file(self, repo_id: str, name: str, file: Path, sha: str, body: bool) -> None:
            size = file.stat().st_size
            start, end, status = 0, size - 1, 200
            if r := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
                start, end, status = int(r[1]), min(int(r[2] or size - 1), size - 1), 206
            etag = hashlib.sha256(f"{repo_id}/{name}/{size}".encode()).hexdigest()
            headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                       "Content-Length": str(max(end - start + 1, 0)),
                       "Content-Type": "application/octet-stream"}
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            self._reply(status, headers, body=False)
            if not body:
                return
            with open(file, "rb") as f:
                f.seek(start)
                left = end - start + 1
                while left > 0:
                    chunk = f.read(min(CHUNK, left))
                    self.wfile.write(chunk)
                    left -= len(chunk)
                    with hub.lock:
                        hub.sent[(repo_id, name)] += len(chunk)

    return Handler
