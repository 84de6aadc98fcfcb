"""Who may ask, and what reaches the routes: bearer tokens (re-read from their file), the Host/Origin
allow-list of a token-less server, body limits, and a log that holds one printable line per event."""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
import time
import unicodedata
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import Header, HTTPException

from ..errors import InputError
from .config import LOCAL_CLIENT, LOCAL_HOSTS, MAX_LOG_CHARS, ServerConfig, read_tokens

log = logging.getLogger("medvlsm")


class TokenSource:
    """The server's tokens: ``config.tokens``, or its token file re-read whenever it changes (checked at
    most once a second), so a token removed from the file stops working at once, without a restart. A
    token file that cannot be read or holds no valid line lets nobody in until it is fixed (one log
    line); it never switches the server to no authentication."""

    def __init__(self, config: ServerConfig):
        self.path, self.tokens = config.token_file, dict(config.tokens)
        self.required = bool(config.tokens or config.token_file)
        self._stamp, self._checked = self._stat(), time.monotonic()
        self._lock = threading.Lock()

    def _stat(self):
        try:
            st = os.stat(self.path) if self.path else None
        except OSError:
            return "missing"
        return st and (st.st_mtime_ns, st.st_size, st.st_ino)

    def current(self) -> dict:
        if not self.path:
            return self.tokens
        with self._lock:
            if time.monotonic() - self._checked >= 1.0:
                self._checked = time.monotonic()
                stamp = self._stat()
                if stamp != self._stamp:
                    self._stamp = stamp
                    try:
                        self.tokens = read_tokens(self.path)
                        log.warning("Token file re-read: %d client(s)", len(self.tokens))
                    except (OSError, InputError) as e:
                        self.tokens = {}
                        log.warning("Token file unusable (%s): every request is refused until it is fixed",
                                    e.__class__.__name__)
            return self.tokens


def client_dependency(tokens: TokenSource):
    """The FastAPI dependency every route takes: the client's name from its bearer token."""

    def client(authorization: str | None = Header(default=None, max_length=1024)) -> str:
        """The client's name from its bearer token (every token compared, in constant time)."""
        if not tokens.required:
            return LOCAL_CLIENT
        given = (authorization or "").removeprefix("Bearer ").strip()
        name = None
        for token, owner in tokens.current().items():
            if hmac.compare_digest(given.encode(), token.encode()):
                name = owner
        if name is None:
            raise HTTPException(401, "A valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        return name

    return client


def printable(text, limit: int = MAX_LOG_CHARS) -> str:
    """One line of printable text, at most ``limit`` characters: control characters (newlines
    included) escaped, so no client text can forge a log line or a second line of an answer."""
    text = str(text)
    out = "".join(ch if unicodedata.category(ch)[0] != "C" else ch.encode("unicode_escape").decode("ascii")
                  for ch in text[:limit])
    return out + ("..." if len(text) > limit else "")


class OneLineLog(logging.Filter):
    """On the server's loggers: every record becomes one printable, bounded line; a traceback becomes
    its exception's type and the place it was raised (its message may hold client text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            error, trace = record.exc_info[1], record.exc_info[2]
            while trace is not None and trace.tb_next is not None:
                trace = trace.tb_next
            where = f" at {Path(trace.tb_frame.f_code.co_filename).name}:{trace.tb_lineno}" if trace else ""
            message += f" ({error.__class__.__name__}{where})"
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = printable(message), None
        return True


def install_log_filter() -> None:
    for name in ("medvlsm", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLineLog) for f in logger.filters):
            logger.addFilter(OneLineLog())


def _host_name(value: str) -> str:
    """``host[:port]`` or ``[v6]:port`` -> the name, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


STREAMED_UPLOADS = ("/volumes/", "/labels/")  # routes that count their own bytes as they stream in


class Gate:
    """ASGI middleware before any route: the Host/Origin allow-list of a token-less server, and the
    body limit of every route but the upload (which counts its own bytes as they stream in)."""

    def __init__(self, app, config: ServerConfig, token_source: TokenSource):
        self.app, self.config, self.tokens = app, config, token_source
        self.hosts = {*LOCAL_HOSTS, *(h.lower() for h in config.allowed_hosts)}

    async def _refuse(self, send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _origin_allowed(self, headers: dict) -> bool:
        host = _host_name(headers.get(b"host", b"").decode("latin-1"))
        origin = headers.get(b"origin")
        if origin is None:
            return host in self.hosts
        return host in self.hosts and (urlsplit(origin.decode("latin-1")).hostname or "") in self.hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if (not self.tokens.required or self.config.allowed_hosts) and not self._origin_allowed(headers):
            log.warning("Refused a request addressed to another host or from a web page's origin")
            return await self._refuse(send, 403, "This server answers requests addressed to "
                                                 f"{', '.join(sorted(self.hosts))} only")
        if scope["method"] == "PUT" and scope["path"].startswith(STREAMED_UPLOADS):
            return await self.app(scope, receive, send)
        limit = self.config.max_json_bytes
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return await self._refuse(send, 400, "Content-Length is not a number")
        if declared > limit:
            return await self._refuse(send, 413, f"The body is {declared:,} bytes; this route accepts {limit:,}")
        chunks, size, more = [], 0, True
        while more:  # small bodies only: read here with the limit, handed on whole
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return await self._refuse(send, 413, f"The body exceeds {limit:,} bytes")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)
