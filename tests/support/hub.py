"""A stand-in for the Hugging Face hub on loopback, for tests of downloads: the real ``huggingface_hub`` client
(in a server pointed at it with ``HF_ENDPOINT``) fetches real files from it, slowly enough to watch.

It answers what a download of one file asks: the repo's file list (``GET /api/models/REPO``), a file's
metadata (``HEAD /REPO/resolve/main/FILE``) and its bytes (``GET``, with ``Range`` for a resumed download).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class StandInHub:
    def __init__(self, repos: dict[str, dict[str, Path]], bytes_per_second: int) -> None:
        self.repos = repos
        self.bytes_per_second = bytes_per_second
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.bytes_sent = 0
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                hub._answer(self, send_body=True)

            def do_HEAD(self) -> None:
                hub._answer(self, send_body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> StandInHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, send_body: bool) -> None:
        path = handler.path.split("?", 1)[0]
        self.requests.append((handler.command, path, handler.headers.get("Range")))
        info = re.fullmatch(r"/api/models/(.+?)(?:/revision/[^/]+)?", path)
        if info and info[1] in self.repos:
            files = [{"rfilename": name} for name in self.repos[info[1]]]
            self._json(handler, {"id": info[1], "modelId": info[1], "sha": COMMIT, "siblings": files}, send_body)
            return
        resolve = re.fullmatch(r"/(.+?)/resolve/[^/]+/(.+)", path)
        if resolve and resolve[2] in self.repos.get(resolve[1], {}):
            self._file(handler, self.repos[resolve[1]][resolve[2]], send_body)
            return
        handler.send_response(404)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def _json(self, handler: BaseHTTPRequestHandler, body: Any, send_body: bool) -> None:
        content = json.dumps(body).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        if send_body:
            handler.wfile.write(content)

    def _file(self, handler: BaseHTTPRequestHandler, path: Path, send_body: bool) -> None:
        size = path.stat().st_size
        etag = hashlib.sha256(f"{path}:{size}".encode()).hexdigest()
        start = 0
        wanted = handler.headers.get("Range")
        if wanted and (match := re.fullmatch(r"bytes=(\d+)-", wanted)):
            start = int(match[1])
        handler.send_response(206 if start else 200)
        handler.send_header("Content-Length", str(size - start))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        handler.send_header("ETag", f'"{etag}"')
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("Accept-Ranges", "bytes")
        handler.end_headers()
        if not send_body:
            return
        chunk = max(self.bytes_per_second // 20, 1)  # twenty writes a second
        try:
            with open(path, "rb") as source:
                source.seek(start)
                while block := source.read(chunk):
                    handler.wfile.write(block)
                    self.bytes_sent += len(block)
                    time.sleep(len(block) / self.bytes_per_second)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped the download
