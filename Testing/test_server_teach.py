"""Teaching on `medvlsm serve --teach-dir` over real HTTP (uvicorn in a thread, the tiny model): a
client's labelled cases become that client's model — progress and the learning curve as it trains,
cancel keeps nothing, another client never sees it — and everything a client sends is checked."""

import json
import threading
import time
import urllib.request

import numpy as np
import pytest
from conftest import blobs
from test_server import LiveServer, _call

from medvlsm import io, wire
from medvlsm.cli import main
from medvlsm.client import Client, ServerError
from medvlsm.request import plan
from medvlsm.server import ServerConfig, create_app
from medvlsm.teaching import LabelledArrays, TeachSettings
from medvlsm.volume import Volume

TOKENS = {"alice-token-0123456789": "alice", "bob-token-0123456789ab": "bob"}
ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"


def labelled_case(seed=0, name="case"):
    """Liver on axial slices 1, 3, 5, spleen on 3, slice 7 reviewed: partial labels."""
    volume = Volume(blobs((9, 28, 30), seed=seed), (0.8, 0.8, 2.5))
    liver, spleen, reviewed = (np.zeros(volume.shape, bool) for _ in range(3))
    for k in (1, 3, 5):
        liver[k, 5:14, 6:16] = True
    spleen[3, 18:25, 18:27] = True
    reviewed[7, 0, 0] = True
    return LabelledArrays(name, volume, np.stack([liver, spleen, reviewed]), ["liver", "spleen", "reviewed"])


@pytest.fixture(scope="module")
def teaching(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("taught")
    config = ServerConfig(models={"tiny": str(tiny_model_dir)}, tokens=TOKENS, device="cpu", teach_dir=str(folder),
                          max_teach_epochs=50, max_models_per_client=3)
    live = LiveServer(create_app(config))
    live.folder = folder
    yield live
    live.stop()


def test_a_taught_model_is_the_client_s_alone_and_serves_its_runs(teaching):
    alice, bob = Client(teaching.url, ALICE), Client(teaching.url, BOB)
    steps, rows = [], []
    name, summary = alice.teach([labelled_case()], TeachSettings(mode="adapt", epochs=2), "tiny",
                                progress=lambda done, total: steps.append((done, total)), on_epoch=rows.append)
    assert name == "tiny-taught-1" and [r["epoch"] for r in rows] == [1, 2] and 0 <= summary["best_val_dice"] <= 1
    assert steps and steps[-1][0] == steps[-1][1] and not summary["base_trained"]
    card = json.loads((teaching.folder / "alice" / name / "medvlsm.json").read_text(encoding="utf-8"))
    assert card["prompts"] == ["liver", "spleen"] and card["labels"] == "partial" and card["name"] == name
    assert alice.models()["yours"] == [name] and bob.models()["yours"] == []
    volume = labelled_case(seed=5).volume
    result = alice.segment(volume, plan(volume, ["liver"]), name)
    assert result.model_name == name
    with pytest.raises(ServerError, match="422.*not served here"):  # bob: as if no such model existed
        bob.segment(volume, plan(volume, ["liver"]), name)
    assert _call(f"{teaching.url}/models/{name}", token=BOB)[0] == 404
    assert _call(f"{teaching.url}/models/{name}", "DELETE", token=BOB)[0] == 404
    status, body = _call(f"{teaching.url}/models/{name}", token=ALICE)
    assert status == 200 and json.loads(body)["prompts"] == ["liver", "spleen"]
    assert sorted(p.name for p in teaching.folder.iterdir()) == ["alice"]  # nothing of bob's, no staging left


def test_progress_streams_as_server_sent_events_and_cancel_keeps_no_model(teaching):
    alice = Client(teaching.url, ALICE)
    case = labelled_case(seed=1)
    body = {"cases": [{"volume": alice.upload(case.volume),
                       "labels": alice.upload_labels(case.volume, case.masks, case.names)}],
            "model": "tiny", "mode": "adapt", "epochs": 50, "plane": "axial", "labels": "partial"}
    job = json.loads(alice._call("POST", "/teach", json.dumps(body).encode())[1])["job"]
    with pytest.raises(ServerError, match="429.*teach jobs"):  # one teach per client at a time
        alice._call("POST", "/teach", json.dumps(body).encode())
    request = urllib.request.Request(f"{teaching.url}/teach/{job}/events", headers={"Authorization": f"Bearer {ALICE}"})
    with urllib.request.urlopen(request, timeout=60) as stream:
        for line in stream:
            if line.startswith(b"data: ") and json.loads(line[6:])["curve"]:
                break  # the first epoch's row arrived while it trains
    status = json.loads(alice._call("DELETE", f"/teach/{job}")[1])
    while status["state"] not in ("cancelled", "done", "failed"):
        time.sleep(0.05)
        status = json.loads(alice._call("GET", f"/teach/{job}")[1])
    assert status["state"] == "cancelled" and status["model"] is None
    assert sorted(p.name for p in (teaching.folder / "alice").iterdir()) == alice.models()["yours"]
    assert _call(f"{teaching.url}/teach/{job}", token="bob-token-0123456789ab")[0] == 404


def test_what_a_client_sends_to_teach_is_checked_with_one_line_answers(teaching):
    alice, bob = Client(teaching.url, ALICE), Client(teaching.url, BOB)
    case = labelled_case(seed=2)
    layers = case.masks.astype(np.uint8)
    key = wire.labels_fingerprint(case.volume, layers, case.names)

    def put(body, as_key=key):
        return _call(f"{teaching.url}/labels/{as_key}", "PUT", body, token=ALICE)

    bad = {
        "another key": (wire.encode(case.volume, layers, {"names": json.dumps(case.names)}), "0" * 32, "match"),
        "not binary": (wire.encode(case.volume, layers * 2, {"names": json.dumps(case.names)}), key, "0 and 1"),
        "a name short": (wire.encode(case.volume, layers, {"names": json.dumps(case.names[:2])}), key, "one name"),
        "no layers": (wire.encode(case.volume), key, "layers"),
    }
    from test_server_hostile import _gzip_stream

    header = bad["another key"][0].split(b"\n\n", 1)[0]
    sizes = next(line for line in header.split(b"\n") if line.startswith(b"sizes:"))
    bad["a gzip bomb"] = (header + b"\n\n" + _gzip_stream(20 << 20), key, "inflates to more than")
    bad["declared beyond the voxels"] = (header.replace(sizes, b"sizes: 30 5000 5000 3") + b"\n\n" + bytes(100), key,
                                         "--max-voxels")
    for what, (body, as_key, reason) in bad.items():
        status, answer = put(body, as_key)
        detail = json.loads(answer)["detail"]
        assert status in (413, 422) and reason in detail and "\n" not in detail, what
    volume_key, labels_key = alice.upload(case.volume), alice.upload_labels(case.volume, case.masks, case.names)
    teach = {"cases": [{"volume": volume_key, "labels": labels_key}], "model": "tiny", "epochs": 2}
    refused = [({**teach, "epochs": 51}, 422, "Epochs must be 1..50"),
               ({**teach, "model": "../alice/tiny-taught-1"}, 422, "not served here"),
               ({**teach, "plane": "all"}, 422, "plane"),
               ({**teach, "cases": []}, 422, "cases"),
               ({**teach, "mode": "rm -rf"}, 422, "mode")]
    for body, code, reason in refused:
        status, answer = _call(f"{teaching.url}/teach", "POST", json.dumps(body).encode(), token=ALICE)
        assert status == code and reason in json.loads(answer)["detail"], body
    status, answer = _call(f"{teaching.url}/teach", "POST", json.dumps(teach).encode(), token=BOB)
    assert status == 404 and "Upload case 1" in json.loads(answer)["detail"]  # alice's uploads are not bob's
    other = labelled_case(seed=3)
    other.volume = Volume(other.volume.array, (1.0, 1.0, 3.0))  # same voxels, another grid
    wrong_grid = {**teach, "cases": [{"volume": alice.upload(other.volume), "labels": labels_key}]}
    status, answer = _call(f"{teaching.url}/teach", "POST", json.dumps(wrong_grid).encode(), token=ALICE)
    assert status == 422 and "not on its volume's grid" in json.loads(answer)["detail"]
    assert _call(f"{teaching.url}/models/..%2F..%2Fetc", token=ALICE)[0] in (404, 422)


def test_a_server_without_teach_dir_does_not_teach(tiny_model_dir):
    live = LiveServer(create_app(ServerConfig(models={"tiny": str(tiny_model_dir)}, device="cpu")))
    try:
        with pytest.raises(ServerError, match="404.*does not teach"):
            Client(live.url).teach([labelled_case()], TeachSettings(epochs=1))
    finally:
        live.stop()


def test_teaching_waits_while_segmentation_runs():
    """The priority rule itself: before each step a teach job waits while any run is queued or running."""
    from medvlsm.server.teaching import TeachServerJob

    busy = threading.Event()
    busy.set()
    job = TeachServerJob("alice", [], "tiny", TeachSettings(), time.monotonic() + 60, busy.is_set)
    waited = threading.Thread(target=job._yield_to_runs)
    waited.start()
    waited.join(0.3)
    assert waited.is_alive()  # a run is waiting: no training step
    busy.clear()
    waited.join(5)
    assert not waited.is_alive()


def test_finetune_server_teaches_there_from_the_command_line(teaching, tmp_path, capsys):
    volumes, segmentations = tmp_path / "volumes", tmp_path / "segmentations"
    volumes.mkdir(), segmentations.mkdir()
    case = labelled_case(seed=4)
    import SimpleITK as sitk

    sitk.WriteImage(io.volume_to_sitk(case.volume), str(volumes / "case1.nrrd"))
    io.write_seg_nrrd(case.volume, case.masks, case.names, segmentations / "case1.seg.nrrd")
    token = tmp_path / "token"
    token.write_text("bob " + BOB + "\n", encoding="utf-8")
    assert main(["finetune", "--server", teaching.url, "--token-file", str(token), "--volumes", str(volumes),
                 "--segmentations", str(segmentations), "--adapt", "--epochs", "1", "--model", "tiny"]) == 0
    out = capsys.readouterr()
    assert "Taught tiny-taught-1 on" in out.out and "epoch 1: train loss" in out.err
    assert Client(teaching.url, BOB).models()["yours"] == ["tiny-taught-1"]


def test_finetune_server_refuses_what_it_cannot_do_in_one_line(tmp_path, capsys):
    for extra, reason in ((["--train", "t.json"], "--server teaches on volumes"),
                          (["--volumes", "v", "--segmentations", "s", "--output", "x"], "keeps the model on the server")):
        assert main(["finetune", "--server", "http://127.0.0.1:9", *extra]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and reason in error[0], error
