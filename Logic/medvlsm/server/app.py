"""``create_app``: the FastAPI application — its gate (``auth.py``), its one-line errors, and the routes
of each resource (``volumes.py``, ``runs.py``, ``teaching.py``, ``models.py``)."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError
from . import models, runs, teaching, volumes
from .auth import Gate, TokenSource, client_dependency, install_log_filter, printable
from .config import ServerConfig, Stores

log = logging.getLogger("medvlsm")


def create_app(config: ServerConfig, runner=None):
    """The FastAPI application (``uvicorn.run(create_app(config))``); ``runner(job, model)`` segments
    (default: ``LocalEngines(config)``). ``app.state.runner`` is read per job, so a deployment may set
    it when its replica starts (``ray_serve.py``)."""
    from concurrent.futures import ThreadPoolExecutor

    from . import __doc__ as protocol

    config.check()
    install_log_filter()
    app = FastAPI(title="MedVLSM", version="1", description=protocol.split("\n\n")[0])
    app.state.runner = runs.LocalEngines(config) if runner is None else runner
    tokens = TokenSource(config)
    app.add_middleware(Gate, config=config, token_source=tokens)
    client = client_dependency(tokens)
    held = volumes.VolumeStore(config.volume_cache_bytes, config.volume_ttl_s)
    uploads = volumes.Uploads(config)
    jobs = app.state.jobs = runs.JobStore(config.max_jobs_per_client, config.result_cache_bytes, config.volume_ttl_s)
    workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="medvlsm-job")
    stores = Stores(held, uploads, jobs, models.ModelStore(config))
    app.include_router(volumes.routes(client, held, uploads))
    app.include_router(runs.routes(client, config, stores, workers, lambda: app.state.runner))
    app.include_router(teaching.routes(client, config, stores))
    app.include_router(models.routes(client, stores.models))

    @app.exception_handler(RequestValidationError)
    async def one_line_422(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"detail": printable(f"{where}: {first.get('msg', 'invalid')}")}, status_code=422)

    @app.exception_handler(InputError)
    async def input_error(request, exc):
        status = 413 if "accepted here" in str(exc) else 422  # a budget, or a malformed value
        return JSONResponse({"detail": printable(exc)}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return JSONResponse({"detail": printable(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def server_fault(request, exc):  # a bug of ours, never a client's input: one line, no client text
        log.error("Internal error on %s %s", request.method, request.scope.get("route").path
                  if request.scope.get("route") else "(no route)", exc_info=exc)
        return JSONResponse({"detail": "Internal server error (logged on the server)"}, status_code=500)

    return app
