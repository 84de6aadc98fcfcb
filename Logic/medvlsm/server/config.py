"""What ``medvlsm serve`` is told: the served models, the clients' tokens, every limit."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
LOCAL_CLIENT = "local"
VOLUME_KEY = r"^[0-9a-f]{32}$"  # Volume.fingerprint(): 16 bytes of blake2b in hex
MAX_LOG_CHARS = 300


@dataclass(frozen=True)
class ServerConfig:
    """What ``medvlsm serve`` is told. ``models``: served name -> registry name or model folder (the
    first is the default); ``tokens``: token -> client name (empty: no authentication, localhost only)."""

    models: dict
    tokens: dict = field(default_factory=dict)
    host: str = "127.0.0.1"
    device: str = "auto"
    token_file: str | None = None  # re-read when it changes; ``tokens`` then holds its first reading
    allowed_hosts: tuple = ()  # names besides localhost's that Host/Origin may give (a token-less server)
    max_upload_bytes: int = 1 << 30  # what is sent (compressed); all uploads in flight together too
    max_voxels: int = 1 << 28  # what it decodes to: 512 x 512 x 1024 voxels (or values of an RGB volume)
    max_volume_bytes: int = 1 << 30  # and in bytes: a float32 512 x 512 x 1024 CT
    max_json_bytes: int = 64 << 10  # any other body; a request with 64 prompts of 1000 characters fits
    volume_cache_bytes: int = 8 << 30
    volume_ttl_s: float = 3600.0
    job_timeout_s: float = 600.0
    max_jobs_per_client: int = 4
    result_cache_bytes: int = 4 << 30
    upload_idle_timeout_s: float = 60.0
    feature_cache_bytes: int = 4 << 30
    teach_dir: str | None = None  # where taught models go (DIR/<client>/<name>); None: this server does not teach
    max_models_per_client: int = 5  # taught models a client may keep (a full CLIPSeg is ~600 MB on disk)
    max_teach_epochs: int = 200
    teach_timeout_s: float = 3 * 3600.0

    def check(self) -> None:
        if self.host not in LOCAL_HOSTS and not self.tokens:
            raise InputError(f"Serving on {self.host} lets anyone on the network in without a token",
                             "Give --token-file (one 'name token' per line), or serve on 127.0.0.1 behind a proxy")
        if not self.models:
            raise InputError("No model to serve", "Give --model NAME_OR_FOLDER (repeat for several)")


def read_tokens(path) -> dict:
    """``name token`` per line (``#`` comments) -> ``{token: name}``; short tokens are refused."""
    tokens = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[1]) < 16:
            raise InputError(f"{path} line {number} is not 'name token' with a token of 16 or more characters",
                             "Write e.g. 'alice " + secrets.token_urlsafe(24) + "'")
        tokens[parts[1]] = parts[0]
    if not tokens:
        raise InputError(f"{path} holds no token", "Write one 'name token' line per client")
    return tokens


@dataclass
class Stores:
    """What the routes of several resources share: held volumes, the upload path, the runs, the models."""

    volumes: object
    uploads: object
    jobs: object
    models: object
