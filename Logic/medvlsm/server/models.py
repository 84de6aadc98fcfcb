"""Models: the ones the operator serves (``--model``, every client's) and the ones a client taught
(``--teach-dir DIR``: ``DIR/<client>/<name>``, that client's alone). ``GET /models`` lists both for the
asking client; ``GET /models/{name}`` gives one's card, ``DELETE`` removes a taught one. Another
client's model does not exist for this one: a 404 here, "not served here" when a run or a teach names
it — the same answers as for a name nobody has. To give a taught model to every client, the operator
serves its folder: ``medvlsm serve --model DIR/<client>/<name>``."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException
from fastapi import Path as PathParam

from ..errors import InputError
from ..teaching import versioned_folder
from .auth import printable

MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"  # a folder name: no path, no hidden file
_FOLDER_NAME = re.compile(MODEL_NAME.strip("^$"))
NAME = PathParam(pattern=MODEL_NAME, description="a served model's or one of your taught models' name")


class ModelStore:
    def __init__(self, config):
        self.served = dict(config.models)
        self.root = Path(config.teach_dir) if config.teach_dir else None
        self.max_per_client = config.max_models_per_client
        self._lock = threading.Lock()  # new folder names: two teach jobs never take the same one
        self.clear_unfinished()

    def _client_dir(self, client: str) -> Path:
        """The client's own folder: its name if that is a plain folder name, else a hash of it (names
        come from the operator's token file, but '..' must never be a folder here)."""
        if _FOLDER_NAME.fullmatch(client):
            return self.root / client
        return self.root / ("client-" + hashlib.blake2b(client.encode(), digest_size=8).hexdigest())

    def own(self, client: str) -> list[str]:
        """This client's taught models (complete folders only: a teach in progress writes elsewhere)."""
        folder = self._client_dir(client) if self.root else None
        if folder is None or not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and _FOLDER_NAME.fullmatch(p.name)
                      and (p / "medvlsm.json").is_file())

    def resolve(self, client: str, name: str | None) -> str:
        """A served name as it is, a client's own model as its folder; anything else is refused."""
        name = name or next(iter(self.served))
        if name in self.served:
            return name
        if _FOLDER_NAME.fullmatch(name) and name in self.own(client):
            return str(self._client_dir(client) / name)
        raise InputError(f"Model {name!r} is not served here",
                         f"Use one of: {', '.join([*self.served, *self.own(client)])}")

    def new_folder(self, client: str, base: str) -> Path:
        """A fresh ``<base>-taught-<N>`` in the client's folder, reserved as an empty directory (never
        listed: a model is listed once its ``medvlsm.json`` is there, and the finished model is renamed
        onto it whole). Refused past ``max_per_client``."""
        if self.root is None:
            raise InputError("This server does not teach", "Ask its operator to start it with --teach-dir DIR")
        with self._lock:
            if len(self.own(client)) >= self.max_per_client:
                raise HTTPException(429, f"You keep {self.max_per_client} taught models here; delete one first "
                                         "(DELETE /models/NAME)")
            folder = versioned_folder(self._client_dir(client), base)
            folder.mkdir(parents=True)
            return folder

    def clear_unfinished(self) -> None:
        """At start: what a server stopped mid-teach left (staging folders, empty reserved ones)."""
        for client_dir in (p for p in self.root.iterdir() if p.is_dir()) if self.root and self.root.is_dir() else ():
            for item in client_dir.iterdir():
                if item.name.startswith(".teaching-") or (item.is_dir() and not any(item.iterdir())):
                    shutil.rmtree(item, ignore_errors=True)

    def card(self, client: str, name: str) -> dict:
        if name in self.served:
            return {"name": name, "served": True}
        if name not in self.own(client):
            raise HTTPException(404, "No such model")
        spec = json.loads((self._client_dir(client) / name / "medvlsm.json").read_text(encoding="utf-8"))
        return {"name": name, "served": False, **{k: spec.get(k) for k in ("arch", "cases", "prompts", "labels",
                                                                               "description")}}

    def delete(self, client: str, name: str) -> None:
        if name not in self.own(client):
            raise HTTPException(404, "No such model of yours")
        shutil.rmtree(self._client_dir(client) / name)


def routes(client, store: ModelStore) -> APIRouter:
    router = APIRouter()

    @router.get("/models")
    def models(name: str = Depends(client)):
        return {"models": list(store.served), "default": next(iter(store.served)), "yours": store.own(name)}

    @router.get("/models/{model}")
    def model_card(model: str = NAME, name: str = Depends(client)):
        return store.card(name, model)

    @router.delete("/models/{model}")
    def delete_model(model: str = NAME, name: str = Depends(client)):
        store.delete(name, model)
        return {"deleted": printable(model)}

    return router
