"""Volumes: ``HEAD /volumes/{key}`` (held for this client?) and ``PUT /volumes/{key}`` (NRRD in the wire
format of ``wire.py``, decoded within a budget computed before a byte is inflated), held in memory
per client. The upload path (limits, stall timeout, one decode at a time) serves ``/labels`` too."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from fastapi import APIRouter, Depends, HTTPException, Path as PathParam, Response
from fastapi import Request as HTTPRequest
from starlette.requests import ClientDisconnect

from .. import wire
from ..errors import InputError
from .config import VOLUME_KEY

log = logging.getLogger("medvlsm")
KEY = PathParam(pattern=VOLUME_KEY, description="the fingerprint of what is uploaded (Volume.fingerprint())")


class VolumeStore:
    """Uploaded volumes in memory, per client: least recently used out past ``max_bytes``, and any
    older than ``ttl_s``."""

    def __init__(self, max_bytes: int, ttl_s: float):
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self._items: OrderedDict = OrderedDict()  # (client, key) -> (volume, stored at)
        self._lock = threading.Lock()

    def _expire(self) -> None:
        now = time.monotonic()
        for k in [k for k, (_, at) in self._items.items() if now - at > self.ttl_s]:
            del self._items[k]
        while self._items and sum(v.array.nbytes for v, _ in self._items.values()) > self.max_bytes:
            self._items.popitem(last=False)

    def get(self, client: str, key: str):
        with self._lock:
            self._expire()
            item = self._items.get((client, key))
            if item is None:
                return None
            self._items.move_to_end((client, key))
            return item[0]

    def put(self, client: str, key: str, volume) -> None:
        if volume.array.nbytes > self.max_bytes:
            raise InputError(f"The volume ({volume.array.nbytes >> 20} MB) is larger than this server keeps "
                             f"({self.max_bytes >> 20} MB)", "Send a smaller volume or raise --volume-cache-mb")
        with self._lock:
            self._items[(client, key)] = (volume, time.monotonic())
            self._expire()


def _volume_from_upload(body: bytearray, key: str, limits: wire.Limits):
    volume, _, _ = wire.decode(body, limits)
    volume.validate()
    if volume.fingerprint() != key:
        raise InputError("The uploaded volume does not match its key", "Key a volume by Volume.fingerprint()")
    return volume


class Uploads:
    """Receiving and decoding uploads within the server's limits: the bytes of one upload and of all in
    flight together, a stall timeout, and one decode at a time (at most one decoded budget in memory)."""

    def __init__(self, config):
        self.config = config
        self.limits = wire.Limits(max_values=config.max_voxels, max_bytes=config.max_volume_bytes)
        self.decoding = threading.Lock()
        self.receiving = 0  # upload bytes held by all connections together (the event loop's thread only)

    async def receive(self, request: HTTPRequest, decode):
        """The body, checked against the limits as it streams in, then ``decode(body, limits)`` off the
        event loop (decompressing and hashing a CT takes a moment; other clients' polls go on)."""
        config = self.config
        try:
            declared = int(request.headers.get("content-length") or 0)
        except ValueError:
            raise HTTPException(400, "Content-Length is not a number") from None
        if declared > config.max_upload_bytes:
            raise HTTPException(413, f"The upload is {declared >> 20} MB; this server accepts "
                                     f"{config.max_upload_bytes >> 20} MB")
        body = bytearray()
        try:
            await self._stream(request, body)

            def decoded():
                with self.decoding:
                    return decode(body, self.limits)

            return await asyncio.to_thread(decoded)
        finally:
            self.receiving -= len(body)

    async def _stream(self, request: HTTPRequest, body: bytearray) -> None:
        """The body into ``body``, within the upload limit (this one and all in flight together) and
        the idle timeout; an aborted upload is one log line."""
        config = self.config
        chunks = request.stream().__aiter__()
        while True:
            try:  # a client that stops sending mid-upload does not hold a connection forever
                chunk = await asyncio.wait_for(chunks.__anext__(), config.upload_idle_timeout_s)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise HTTPException(408, f"The upload stalled for {config.upload_idle_timeout_s:g} s") from None
            except ClientDisconnect:
                log.warning("An upload was aborted by its client after %d bytes", len(body))
                raise HTTPException(400, "The upload was aborted") from None
            if len(body) + len(chunk) > config.max_upload_bytes:
                raise HTTPException(413, f"The upload exceeds {config.max_upload_bytes >> 20} MB")
            if self.receiving + len(chunk) > config.max_upload_bytes:
                raise HTTPException(503, "The server is receiving other uploads; send again in a moment",
                                    headers={"Retry-After": "5"})
            body += chunk
            self.receiving += len(chunk)


@dataclass
class UploadKind:
    """What a kind of upload is: ``decode(body, key, limits)``, its name in answers, and a check run
    before anything (``before()`` may refuse)."""

    decode: Callable
    what: str
    before: Callable = lambda: None


def upload_routes(router: APIRouter, path: str, client, store: VolumeStore, uploads: Uploads,
                  kind: UploadKind) -> None:
    """``HEAD path/{key}`` (held for this client?) and ``PUT path/{key}`` (decoded within the upload
    limits, answered ``{"key": key}``)."""
    decode, what, before = kind.decode, kind.what, kind.before

    @router.head(path + "/{key}")
    def held(key: str = KEY, name: str = Depends(client)):
        before()
        if store.get(name, key) is None:
            raise HTTPException(404, f"Upload {what} first")
        return Response(status_code=200)

    @router.put(path + "/{key}", responses={413: {"description": "over --max-upload-mb, --max-voxels or "
                                                                "--max-volume-mb"}})
    async def upload(request: HTTPRequest, key: str = KEY, name: str = Depends(client)):
        """NRRD in the wire format (gzip or raw, attached data, LPS; see ``wire.py``), decoded within the limits."""
        before()
        store.put(name, key, await uploads.receive(request, lambda body, limits: decode(body, key, limits)))
        return {"key": key}


def routes(client, volumes: VolumeStore, uploads: Uploads) -> APIRouter:
    router = APIRouter()
    upload_routes(router, "/volumes", client, volumes, uploads, UploadKind(_volume_from_upload, "this volume"))
    return router
