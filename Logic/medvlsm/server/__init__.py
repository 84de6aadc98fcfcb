"""``medvlsm serve``: one GPU machine segments — and teaches — for many workstations over HTTP
(FastAPI + uvicorn).

The protocol (OpenAPI schema at ``/openapi.json``, interactive at ``/docs``):

- ``HEAD /volumes/{key}``: 200 if this client's volume is held, 404 if it must be uploaded;
- ``PUT /volumes/{key}``: the volume as NRRD bytes in the wire format of ``wire.py`` (gzip or raw,
  attached data only); ``key`` is its ``Volume.fingerprint()`` (content + geometry), checked here:
  one upload per volume, then each run sends only its request;
- ``POST /jobs``: ``{"volume": key, "request": Request JSON, "model": name or null}`` -> ``{"job": id}``;
  the run starts in the background;
- ``GET /jobs/{id}``: state, progress, error (or ``/jobs/{id}/events``: the same as server-sent events);
  ``DELETE /jobs/{id}``: cancel a run (before the next batch), or forget a finished one and its result
  (the client does so once it has fetched it);
- ``GET /jobs/{id}/probabilities``, ``/masks`` and ``/labelmap``: uint8 layers ``[P, K, J, I]`` or
  labels ``[K, J, I]`` as gzip NRRD with the grid and the run's facts (probabilities x 255, rounded;
  masks and labelmap at the request's threshold and post-processing: the bytes a local run makes).

The image-feature cache lives here, so a re-prompt of a held volume runs the decoder only; it is
kept per client, so no client learns from a cache hit what another client segmented.

Security (docs/server-security.md lists each rule with its option): binds to localhost by
default, where only requests addressed to a localhost name (Host and Origin) are answered, against
DNS rebinding; anywhere else needs a token file (``name token`` per line, re-read when it changes);
bearer tokens are compared in constant time; each client sees only its own volumes and jobs; model
names come from the server's list, never paths. Uploads are decoded by ``wire.decode``: attached data
only, their decoded size checked against ``--max-voxels`` / ``--max-volume-mb`` before a byte is
inflated. Requests are checked by ``Request.validate``, the code a local run uses, with caps on
prompts; every body is size-limited; anything malformed is one 4xx line, never a 500. Volumes and
results are kept in memory only, bounded in bytes and time; each client may have only a few runs
waiting (one client cannot queue the GPU away from the others). The log holds what the server
decided, one printable bounded line per event, never raw client text. TLS belongs to a reverse proxy
in front (docs/server.md).
"""

from .app import create_app  # noqa: E402
from .auth import printable  # noqa: E402
from .config import ServerConfig, read_tokens  # noqa: E402
from .runs import JobStore, LocalEngines, ServerJob  # noqa: E402

__all__ = ["JobStore", "LocalEngines", "ServerConfig", "ServerJob", "create_app", "printable", "read_tokens"]
