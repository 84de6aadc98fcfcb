"""The ``medvlsm`` command line. Each sub-command imports what it needs, so the fast ones stay fast.

Errors the user can fix print one line (``error: <problem>. <fix>.``) and exit 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from .datasets import LABELS
from .errors import Cancelled, InputError, MedVLSMError, ModelError
from .models.architectures import ARCHITECTURES, architecture, converters
from .request import ALL_PLANES, FUSIONS, planes_cost
from .volume import PLANES

log = logging.getLogger("medvlsm")

EXIT_USER_ERROR = 2
EXIT_CANCELLED = 130


def _float_where(text: str, accept, problem: str) -> float:
    """``text`` as a float that ``accept`` takes (nan never does), else argparse's one-line error."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or not accept(value):
        raise argparse.ArgumentTypeError(f"{text!r} {problem}")
    return value


def _probability(text: str) -> float:
    return _float_where(text, lambda v: 0.0 < v < 1.0, "is not a probability: give a number between 0 and 1, e.g. 0.5")


def _positive_float(text: str) -> float:
    return _float_where(text, lambda v: 0.0 < v < float("inf"), "must be a positive number, e.g. 1e-4")


def _ratio(text: str) -> float:
    return _float_where(text, lambda v: 0.0 <= v <= 4.0, "is not a ratio from 0 to 4: give e.g. 0.25 (0: no negatives)")


def _label_names(items) -> dict:
    names = {}
    for item in items or []:
        value, sep, name = item.partition("=")
        if not sep or not value.strip().isdigit() or not name.strip():
            raise InputError(f"--label-names {item!r} is not VALUE=NAME", "Write e.g. --label-names 1=liver 2=spleen")
        names[int(value)] = name.strip()
    return names


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _check_model_output(args) -> None:
    """A model folder is never written over by accident: new, empty, or ``--overwrite``."""
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {out} is a file", "Give a folder name for the model")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise InputError(f"{out} already holds files", "Choose a new folder, or add --overwrite to replace the model")
    from .io import check_writable

    check_writable(out)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0, e.g. 100")
    return value


def _join_negative_values(argv: list) -> list:
    """``--window -600,1500`` as users type it (argparse would read the value as an option)."""
    out = []
    for token in argv:
        if out and out[-1] == "--window" and token[:1] == "-" and token[1:2].isdigit():
            out[-1] = f"--window={token}"
        else:
            out.append(token)
    return out


def _add_segment_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="registry name (see `medvlsm models`) or a model folder; "
                   "default: the registry's default (clipseg-rd64-refined)")
    p.add_argument("--axis", "--plane", dest="axis", choices=(*PLANES, ALL_PLANES), default=None,
                   help="anatomical plane to slice along (default: axial; the acquisition plane for 2D images); "
                   "all: each of the three, fused (the time of all their slices: 3x axial for a cube, ~6x for a "
                   "512x512x200 CT)")
    p.add_argument("--fusion", choices=FUSIONS, default="mean",
                   help="how --axis all fuses the planes: mean or max of the probabilities, or majority vote")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 where the hardware supports it natively, else fp32")
    p.add_argument("--threshold", type=_probability, default=None,
                   help="probability threshold between 0 and 1 (default: the model's own)")
    p.add_argument("--batch-size", type=int, default=None, help="slices per batch (default 8 on CPU, 32 on GPU)")
    p.add_argument("--window", default="auto", help="intensity window: auto, abdomen, lung, bone, brain, mediastinum, "
                   "percentile, none, or LEVEL,WIDTH in HU")
    p.add_argument("--resize", default=None, choices=["letterbox", "stretch"],
                   help="letterbox keeps the physical aspect ratio; stretch squashes to a square as the paper did "
                   "(default: what the model folder records it was trained with, else letterbox; evaluate: else "
                   "stretch, the paper's protocol)")
    p.add_argument("--slices", default=None, help="START:STOP slice range in the chosen plane (default: all)")
    p.add_argument("--keep-largest", action="store_true", help="keep only the largest 3D connected component")
    p.add_argument("--min-size", type=_non_negative_int, default=0,
                   help="remove 3D islands smaller than this many voxels")
    p.add_argument("--fill-holes", action="store_true", help="fill enclosed holes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medvlsm", description="Text-prompted segmentation of medical images "
                                     "with vision-language segmentation models (arXiv 2308.07706).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment an image or volume from text prompts")
    seg.add_argument("input", help="NIfTI/NRRD/MHA file, a DICOM series folder, or a 2D PNG/JPG; a cohort: a "
                     "folder of volumes (files, or one DICOM series per subfolder) or a CSV with a 'path' column")
    seg.add_argument("--prompt", "-p", action="append", required=True,
                     help="what to segment; repeat for several segments (one label each)")
    seg.add_argument("--output", "-o", required=True, help=".seg.nrrd (Slicer segmentation), .nii/.nii.gz/.nrrd/.mha "
                     "(labelmap: label i = i-th prompt), .png (2D inputs) or .dcm (DICOM SEG, for DICOM series inputs); "
                     "a cohort: a folder, one OUTPUT/<case><--format> per volume")
    seg.add_argument("--probabilities", default=None, help="also write the probabilities, x 255 as uint8 (0..255 for 0..1; "
                     "threshold 0.5 = 127.5) (.nii.gz/.nrrd/.mha)")
    seg.add_argument("--overlay", default=None, help="also write a PNG montage of slices with the masks")
    seg.add_argument("--server", default=None, help="run on a `medvlsm serve` server (URL) instead of here; "
                     "--model then names one of its models")
    seg.add_argument("--token-file", default=None, help="file holding the server's bearer token (for --server)")
    seg.add_argument("--format", default=".seg.nrrd", help="a cohort's output format (default .seg.nrrd)")
    seg.add_argument("--overwrite", action="store_true", help="a cohort: redo cases whose output exists (default: "
                     "skip them, so an interrupted cohort resumes)")
    _add_segment_options(seg)

    sub.add_parser("models", help="list the model registry")

    demo = sub.add_parser("demo", help="segment the bundled demo CT (lung1 crop, pyradiomics, BSD-3)")
    demo.add_argument("--output", "-o", default="medvlsm-demo", help="folder for the results (default: ./medvlsm-demo)")
    demo.add_argument("--allow-untrained", action="store_true",
                      help="if the default weights cannot be had (offline), run the pipeline with random weights "
                           "instead of stopping; the outputs are then marked UNTRAINED")
    _add_segment_options(demo)

    dl = sub.add_parser("download", help="download a registry model into the Hugging Face cache (checksummed)")
    dl.add_argument("name")

    pr = sub.add_parser("prompts", help="build the paper's prompt ladder p0..p9 from attributes (or a mask)")
    pr.add_argument("--class", dest="cls", help="what the target is, e.g. polyp")
    pr.add_argument("--shape", default="")
    pr.add_argument("--color", "--colour", dest="color", default="")
    pr.add_argument("--size", default="", help="tiny, small, medium or large (derived from --mask if given)")
    pr.add_argument("--number", default="", help="how many, as a word or a number (derived from --mask if given)")
    pr.add_argument("--location", default="", help="e.g. 'top left' (derived from --mask if given)")
    pr.add_argument("--description", action="append", default=[], help="repeat for p7..p9 variants")
    pr.add_argument("--mask", help="a 2D mask file: number, size and location are derived from it")
    pr.add_argument("--attributes", help="a JSON list of attribute objects -> a JSON list of ladders")
    pr.add_argument("--json", action="store_true", help="print JSON instead of one line per type")

    ev = sub.add_parser("evaluate", help="score masks (any tool) or a model per prompt type")
    ev.add_argument("--predictions", help="folder of predicted masks (any tool)")
    ev.add_argument("--ground-truth", help="folder of reference masks, matched by file name")
    ev.add_argument("--data", help="annotation JSON in the paper's format (runs --model)")
    ev.add_argument("--images", help="image folder of --data")
    ev.add_argument("--masks", help="mask folder of --data")
    ev.add_argument("--prompt-type", nargs="+", default=["p1"], help="prompt types to evaluate (p0..p9)")
    ev.add_argument("--robustness", action="store_true", help="also: Dice gain over empty/unrelated prompts, "
                    "false positives on empty images")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N cases")
    ev.add_argument("--nsd-tolerance", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    ev.add_argument("--output", "-o", required=True, help="results .csv; .md, box plot and overlays go beside it")
    _add_segment_options(ev)

    ft = sub.add_parser("finetune", help="finetune a model on your labelled images or volumes")
    ft.add_argument("--train", help="training annotations (the paper's JSON format)")
    ft.add_argument("--val", help="validation annotations (same format)")
    ft.add_argument("--images", help="image folder of --train/--val")
    ft.add_argument("--masks", help="mask folder of --train/--val")
    ft.add_argument("--volumes", help="folder of volumes (NIfTI/NRRD ...) instead of --train")
    ft.add_argument("--segmentations", help="folder of .seg.nrrd / labelmaps named like the volumes")
    ft.add_argument("--plane", default="axial", choices=(*PLANES, ALL_PLANES),
                    help="slicing plane (volumes); all: slices of the three planes, so one model serves --axis all")
    ft.add_argument("--labels", default="partial", choices=LABELS,
                    help="volumes: partial (default): only labelled slices of --plane are data, those holding any "
                         "segment or the 'reviewed' segment; complete: every slice is labelled")
    ft.add_argument("--empty-fraction", type=float, default=0.1,
                    help="--labels complete: slices without the structure kept, as a fraction of those with it "
                         "(default 0.1)")
    ft.add_argument("--val-fraction", type=float, default=0.2, help="volumes held out for validation (default 0.2)")
    ft.add_argument("--model", default=None, help="registry name or model folder to start from (see `medvlsm init`)")
    ft.add_argument("--arch", default=None, choices=list(ARCHITECTURES),
                    help="instead of --model: start from random weights of this architecture (unet: the paper's "
                         "image-only baseline, MONAI BasicUNet; it ignores the prompt)")
    ft.add_argument("--size", default="small", help="the size of --arch's random model (default small)")
    ft.add_argument("--negative-ratio", type=_ratio, default=None, metavar="R",
                    help="wrong prompts (absent structures, other organs, a wrong location) trained to an empty mask, "
                         "per image (default 0.25; 0: none; image-only models: none)")
    ft.add_argument("--output", "-o", help="folder for the finetuned model, card and curves (not with --server)")
    ft.add_argument("--prompt-type", nargs="+", default=["p1"], help="p0..p9 (several: one drawn per sample) or random")
    ft.add_argument("--epochs", type=_positive_int, default=50)
    ft.add_argument("--recipe", choices=("default", "paper"), default="default",
                    help="default: batch 16 and the learning rate measured to learn the prompts (docs/finetune.md); paper: "
                    "the paper's batch size and learning rate per architecture")
    ft.add_argument("--batch-size", type=_positive_int, default=0, help="default: the recipe's (16; paper: 128 / 32)")
    ft.add_argument("--label-names", nargs="+", default=None, metavar="VALUE=NAME",
                    help="names (= prompts) of labelmap values, e.g. 1=liver 2=spleen (default: a Slicer colour "
                    "table NAME.ctbl/.txt beside each labelmap)")
    ft.add_argument("--lr", type=_positive_float, default=0.0, help="learning rate (default: the recipe's for the "
                    "architecture: " + ", ".join(f"{a.title} {a.lr or a.paper_lr:g} (paper {a.paper_lr:g})"
                                                for a in ARCHITECTURES.values()) + ")")
    ft.add_argument("--freeze", default="none", choices=["none", "encoders", "text"])
    ft.add_argument("--server", default=None, help="teach on a `medvlsm serve --teach-dir` server (URL) instead of "
                    "here (--volumes/--segmentations): the model stays there, yours alone, named in the answer")
    ft.add_argument("--token-file", default=None, help="file holding the server's bearer token (for --server)")
    ft.add_argument("--adapt", action="store_true",
                    help="train the decoder only, on image features encoded once (frozen encoders): minutes on a "
                         "CPU instead of hours")
    ft.add_argument("--device", default="auto")
    ft.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto: bf16 on GPUs that support it, fp32 on CPUs")
    ft.add_argument("--resize", default=None, choices=["letterbox", "stretch"],
                    help="default: stretch for 2D images (the paper), letterbox for volumes")
    ft.add_argument("--patience", type=int, default=20, help="early stopping on validation Dice (epochs)")
    ft.add_argument("--max-steps-per-epoch", type=int, default=0, help="cap steps per epoch (quick checks)")
    ft.add_argument("--cpu-seconds", type=_positive_float, default=0.0,
                    help="stop after the epoch in which training has used this much CPU time (compare models at "
                         "an equal budget; default: no limit)")
    ft.add_argument("--seed", type=int, default=42)
    ft.add_argument("--limit", type=_positive_int, default=None,
                    help="use only the first N annotated images of each split (or N volumes): a quick try first")
    ft.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint/last.pt")

    cv = sub.add_parser("convert", help="original weights (CRIS / OpenAI RN50, open_clip BiomedCLIP, CIDAS CLIPSeg) "
                                        "-> a model folder")
    cv.add_argument("--arch", required=True, choices=list(converters()))
    cv.add_argument("--from", dest="sources", nargs="+", required=True,
                    help="; ".join(f"{name}: {arch.converters[name][1]}" for name, arch in converters().items()))
    cv.add_argument("--output", "-o", required=True, help="the model folder to write (must be new or empty)")
    cv.add_argument("--overwrite", action="store_true", help="replace the files of an existing model folder")

    sv = sub.add_parser("serve", help="segment for other computers over HTTP (one GPU for a department)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this computer only; any "
                    "other needs --token-file)")
    sv.add_argument("--port", type=_positive_int, default=8765)
    sv.add_argument("--model", action="append", default=None, metavar="NAME_OR_FOLDER",
                    help="a model to serve (repeat; clients name it by its registry name or folder name; "
                    "default: the registry's default)")
    sv.add_argument("--token-file", default=None, help="'name token' per line: clients authenticate with a "
                    "bearer token and see only their own volumes and jobs")
    sv.add_argument("--device", default="auto")
    sv.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                    help="a name besides localhost's that requests may be addressed to (Host and Origin headers) "
                    "(repeat); a server without tokens answers localhost names only, against DNS rebinding")
    sv.add_argument("--max-upload-mb", type=_positive_int, default=1024,
                    help="bytes one upload may send (compressed), and all uploads in flight together")
    sv.add_argument("--max-voxels", type=_positive_int, default=1 << 28,
                    help="voxels an uploaded volume may hold (default 268435456 = 512 x 512 x 1024), checked "
                    "before decoding")
    sv.add_argument("--max-volume-mb", type=_positive_int, default=1024,
                    help="bytes an uploaded volume may decode to (voxels x bytes per voxel), checked before decoding")
    sv.add_argument("--upload-idle-timeout", type=_positive_float, default=60.0,
                    help="seconds an upload may stall before it is dropped (408)")
    sv.add_argument("--volume-cache-mb", type=_positive_int, default=8192,
                    help="uploaded volumes kept in memory (least recently used out first; never on disk)")
    sv.add_argument("--volume-ttl", type=_positive_float, default=3600.0, help="seconds an uploaded volume is kept")
    sv.add_argument("--job-timeout", type=_positive_float, default=600.0, help="seconds a run may take")
    sv.add_argument("--max-runs-per-client", type=_positive_int, default=4,
                    help="runs one client may have waiting or running (more are refused with 429)")
    sv.add_argument("--result-cache-mb", type=_positive_int, default=4096,
                    help="finished results kept in memory until their client fetches them (oldest out first; "
                    "also gone after --volume-ttl)")
    sv.add_argument("--teach-dir", default=None, metavar="DIR",
                    help="let clients teach models on their labelled cases (POST /teach); each client's models go "
                    "to DIR/<client>/ and are that client's alone (default: this server does not teach)")
    sv.add_argument("--max-models-per-client", type=_positive_int, default=5,
                    help="taught models a client may keep in --teach-dir (a full CLIPSeg is ~600 MB)")
    sv.add_argument("--max-teach-epochs", type=_positive_int, default=200, help="epochs one teach job may ask for")
    sv.add_argument("--replicas", type=_positive_int, default=0, help="serve on Ray Serve with this many model "
                    "replicas (one per GPU with --gpus-per-replica 1); a volume's runs stay on the replica that "
                    "cached it")
    sv.add_argument("--ray-address", default=None, help="join a running Ray cluster (e.g. auto) instead of "
                    "starting one on this machine")
    sv.add_argument("--gpus-per-replica", type=float, default=0.0)

    init = sub.add_parser("init", help="write a model folder with random weights (training from scratch, tests)")
    init.add_argument("--arch", default="clipseg", choices=list(ARCHITECTURES))
    init.add_argument("--size", default="full", choices=list(dict.fromkeys(s for a in ARCHITECTURES.values()
                                                                           for s in a.sizes)))
    init.add_argument("--output", "-o", required=True, help="the model folder to write (must be new or empty)")
    init.add_argument("--overwrite", action="store_true", help="replace the files of an existing model folder")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--input-size", type=_positive_int, default=None,
                      help="square input side the model is fed (default: the architecture's, " +
                      " / ".join(str(a.defaults["input_size"]) for a in ARCHITECTURES.values()) + ")")
    return parser


# ---- sub-commands ------------------------------------------------------------------------------

def _parse_slices(text):
    if not text:
        return None
    try:
        start, stop = (int(v) for v in text.split(":"))
    except ValueError as e:
        raise InputError(f"--slices {text!r} is not START:STOP", "Write e.g. --slices 10:40") from e
    return start, stop


PROGRESS_EVERY_S = 10.0  # a log file gets a progress line this often (and the last one)


def _note(args, text: str) -> None:
    """A phase line on stderr (not with --quiet): what the run is doing before its first slice."""
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


class _ProgressLines:
    """Progress for a log file: one plain line every ``PROGRESS_EVERY_S`` and at the end, with the
    time left estimated from the pace so far (no bar redraws: they turn a log into carriage returns)."""

    def __init__(self, what: str, unit: str):
        import time

        self.what, self.unit, self.clock = what, unit, time.monotonic
        self.started, self.printed = self.clock(), None

    def __call__(self, done, total):
        now = self.clock()
        if done < total and self.printed is not None and now - self.printed < PROGRESS_EVERY_S:
            return
        self.printed = now
        elapsed = now - self.started
        left = f", ~{elapsed / done * (total - done):.0f} s left" if 0 < done < total else ""
        print(f"{self.what}: {done}/{total} {self.unit}s ({100 * done / max(total, 1):.0f} %), {elapsed:.0f} s{left}",
              file=sys.stderr, flush=True)


def _progress_bar(quiet: bool, what: str, unit: str = "slice"):
    """A progress bar on a terminal; in a log file (stderr not a terminal) plain lines at a steady
    pace instead (``_ProgressLines``); nothing with --quiet."""
    if quiet:
        return None, lambda: None
    if not sys.stderr.isatty():
        return _ProgressLines(what, unit), lambda: None
    from tqdm import tqdm

    bar = tqdm(total=0, unit=unit, desc=what, leave=False, file=sys.stderr)

    def update(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    return update, bar.close


def run_segmentation(args, input_path, prompts, outputs, runner=None):
    """Shared by ``segment`` and ``demo``: read, plan the request and check every output path (before
    the slow model load), run (``runner``: see ``_runner``), write (``outputs.Outputs``), summarise."""
    import numpy as np

    from . import io
    from .postprocess import PostProcess
    from .request import plan

    volume = io.read_image(input_path)
    outputs.check(input_path, volume)
    post = PostProcess(keep_largest=args.keep_largest, min_voxels=args.min_size, fill_holes=args.fill_holes)
    request = plan(volume, prompts, plane=args.axis, slices=_parse_slices(args.slices), window=args.window,
                   resize=args.resize, threshold=args.threshold, post=post, fusion=args.fusion)
    if runner is None:
        _note(args, f"loading the model ({args.model or 'the default'}) ...")
        runner = _runner(args)
    slices = request.slices[1] - request.slices[0]
    what = ("a 2D image" if volume.shape[0] == 1 else f"{slices} {request.plane} slices" if request.plane != ALL_PLANES
            else f"{slices} slices of all three planes ({planes_cost(volume)})")
    _note(args, f"plan: {', '.join(repr(p) for p in request.prompts)} on {what} of {input_path} "
                f"({'x'.join(map(str, volume.shape[::-1]))} voxels){getattr(runner, 'describe', '')}")
    update, close = _progress_bar(args.quiet, "segmenting")
    try:
        result = runner(volume, request, update)
    finally:
        close()
    masks = outputs.write(volume, result)
    if volume.shape[0] == 1:  # a 2D image: pixels and mm², one image
        pixel_mm2 = float(volume.spacing[0] * volume.spacing[1])
        counts = ", ".join(f"{p or '(empty)'}: {int(m.sum())} pixels ({m.sum() * pixel_mm2:.1f} mm²)"
                           for p, m in zip(result.prompts, masks))
        ran = "1 image"
    else:
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        counts = ", ".join(f"{p or '(empty)'}: {int(m.sum())} voxels ({m.sum() * voxel_ml:.1f} mL)"
                           for p, m in zip(result.prompts, masks))
        n = result.slice_range[1] - result.slice_range[0]
        ran = (f"{n} {result.plane} slices" if result.plane != ALL_PLANES
               else f"{n} slices of all three planes ({result.request.fusion})")
    print(f"{counts} | {ran} in {result.seconds:.1f} s on {result.device} ({result.dtype}) "
          f"| window {result.window} -> {', '.join(str(o) for o in outputs.files)}")
    return result


def _runner(args, model=None):
    """``run(volume, request, progress) -> result``: on a server (``--server``) or an engine here
    (``model``, else ``--model`` loaded once); a cohort runs all its cases through one."""
    if getattr(args, "server", None):
        from .client import Client, read_token

        client = Client(args.server, read_token(args.token_file))
        return _Runner(lambda volume, request, progress: client.segment(volume, request, args.model, progress=progress),
                       f" on the server {args.server}")
    from .engine import Engine, resolve_device

    device = resolve_device(args.device)
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"Batch size {args.batch_size} must be at least 1", "Use --batch-size 1 or more")
    if model is None:
        from .models import load_model

        model = load_model(args.model)
    engine = Engine(model, device=device, precision=args.precision, batch_size=args.batch_size)
    trained = "" if model.spec.trained else ", UNTRAINED (random) weights"
    if not architecture(model.spec.arch).reads_text:
        trained += ", IMAGE-ONLY (the prompt is ignored)"
    return _Runner(lambda volume, request, progress: engine.segment(volume, request, progress=progress),
                   f", {model.spec.name} on {engine.device} ({str(engine.dtype).replace('torch.', '')}, batches of "
                   f"{engine.batch_size}){trained}")


class _Runner:
    """``run(volume, request, progress) -> result``, with ``describe``: where and how it runs."""

    def __init__(self, run, describe: str):
        self.run, self.describe = run, describe

    def __call__(self, volume, request, progress):
        return self.run(volume, request, progress)


def cmd_serve(args):
    try:
        import uvicorn
    except ImportError as e:
        raise InputError("medvlsm serve needs FastAPI and uvicorn, which are not installed",
                         "Run: pip install 'medvlsm[server]' (or pip install fastapi uvicorn)") from e

    from .models import default_model_name
    from .server import ServerConfig, create_app, read_tokens

    sources = args.model or [default_model_name()]
    models = {Path(m).name if Path(m).exists() else m: m for m in sources}
    config = ServerConfig(models=models, tokens=read_tokens(args.token_file) if args.token_file else {},
                          token_file=args.token_file, allowed_hosts=tuple(args.allow_host),
                          max_voxels=args.max_voxels, max_volume_bytes=args.max_volume_mb << 20,
                          upload_idle_timeout_s=args.upload_idle_timeout,
                          host=args.host, device=args.device, max_upload_bytes=args.max_upload_mb << 20,
                          volume_cache_bytes=args.volume_cache_mb << 20, volume_ttl_s=args.volume_ttl,
                          job_timeout_s=args.job_timeout, max_jobs_per_client=args.max_runs_per_client,
                          result_cache_bytes=args.result_cache_mb << 20, teach_dir=args.teach_dir,
                          max_models_per_client=args.max_models_per_client, max_teach_epochs=args.max_teach_epochs)
    who = f"bearer tokens of {len(config.tokens)} client(s)" if config.tokens else "no token: this computer only"
    if args.replicas:
        from . import ray_serve

        print(f"Serving {', '.join(models)} on Ray Serve ({args.replicas} replicas) at http://{args.host}:{args.port} "
              f"({who}); API: /docs")
        ray_serve.run(config, args.port, args.replicas, address=args.ray_address, gpus_per_replica=args.gpus_per_replica)
        return
    app = create_app(config)
    print(f"Serving {', '.join(models)} on http://{args.host}:{args.port} ({who}); API: /docs")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=30)


def cmd_segment(args):
    from . import cohort
    from .outputs import Outputs

    if not cohort.is_cohort(args.input):
        run_segmentation(args, args.input, args.prompt, Outputs((args.output,), args.probabilities, args.overlay))
        return
    from . import io

    found = cohort.cases(args.input)
    if args.probabilities or args.overlay:
        raise InputError("--probabilities and --overlay are for one volume", "Leave them out for a cohort")
    if io.extension(args.output) or Path(args.output).is_file():
        raise InputError(f"A cohort's --output is a folder, not {args.output}",
                         "Give a folder; --format chooses the files' format (default .seg.nrrd)")
    if io.extension(args.format) not in io.OUTPUT_EXTENSIONS:
        raise InputError(f"Unknown --format {args.format!r}", f"Use one of: {', '.join(io.OUTPUT_EXTENSIONS)}")
    runner = _runner(args)
    quiet = argparse.Namespace(**{**vars(args), "quiet": True})  # one bar for the cohort, not one per volume
    update, close = _progress_bar(args.quiet, "cohort", unit="volume")
    try:
        states = cohort.run(found, Path(args.output), args.format, lambda path, target: run_segmentation(
            quiet, path, args.prompt, Outputs((target,)), runner), overwrite=args.overwrite, progress=update)
    finally:
        close()
    print(f"Cohort of {len(found)}: {states['done']} segmented, {states['skipped']} done before, {states['failed']} "
          f"failed -> {Path(args.output) / cohort.LOG}")
    if states["failed"]:
        raise InputError(f"{states['failed']} case(s) failed", f"Their reasons are in {Path(args.output) / cohort.LOG}")


def cmd_models(args):
    from .models import default_model_name, registry

    default = default_model_name()
    print(f"{'name':24} {'arch':14} {'input':>6} {'thr':>5} {'params':>8}  source / licence")
    for spec in registry().values():
        mark = " (default)" if spec.name == default else ""
        print(f"{spec.name:24} {spec.arch:14} {spec.input_size:>6} {spec.threshold:>5} {spec.parameters_m:>7.1f}M  "
              f"{spec.source}{mark}; {spec.licence}")
    print("A model folder (save_pretrained format, e.g. from `medvlsm init`) works anywhere a name does.")


DEMO_PROMPTS = ["lung", "heart", "lung tumor"]


def cmd_demo(args):
    from .models import load_model
    from .resources import resource

    out = Path(args.output)
    try:
        model = load_model(args.model)
    except ModelError as e:
        if not args.allow_untrained:
            raise
        from .models.clipseg import CLIPSeg

        log.warning("%s", e)
        log.warning("Running the demo with RANDOM weights (--allow-untrained): the files show the pipeline "
                    "and the geometry, not a segmentation.")
        model = CLIPSeg.random("full")
    image = resource("Demo", "lung1_ct_crop.nrrd")
    print(f"Demo: {image.name} (pyradiomics lung1 CT, BSD-3), prompts {DEMO_PROMPTS}, model {model.spec.name}")
    from .outputs import Outputs

    outputs = Outputs((out / "demo.seg.nrrd", out / "demo_labels.nii.gz"), overlay=out / "demo_overlay.png")
    out.mkdir(parents=True, exist_ok=True)  # only now: a demo that stops earlier leaves no empty folder
    run_segmentation(args, image, DEMO_PROMPTS, outputs, _runner(args, model))
    print(f"Wrote {outputs.files[0]} (open it in 3D Slicer over {image}), {outputs.files[1]} and {outputs.overlay}")


def cmd_download(args):
    from .models import fetch, registry

    specs = registry()
    if args.name not in specs:
        raise ModelError(f"Unknown model {args.name!r}", f"Use one of: {', '.join(specs)}")
    print(fetch(specs[args.name]))


def cmd_convert(args):
    _check_model_output(args)
    files = [Path(f) for f in args.sources]
    for f in files:
        if not f.exists():
            raise InputError(f"{f} not found", "Give the original files' paths after --from")
    model = converters()[args.arch].convert(args.arch, files, args.output, Path(args.output).name)
    state = "ready to use" if model.spec.trained else "decoder untrained: finetune it before use"
    print(f"Wrote {args.arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {state}) "
          f"to {args.output}")


def cmd_init(args):
    arch = ARCHITECTURES[args.arch]
    if args.size not in arch.sizes:
        raise InputError(f"{arch.title} has no size {args.size!r}", f"Use one of: {', '.join(arch.sizes)}")
    if args.input_size is not None:
        arch.check_input_size(args.input_size)
    _check_model_output(args)
    model = arch.random(args.size, name=Path(args.output).name, seed=args.seed)
    if args.input_size is not None:
        model.spec.input_size = args.input_size
    n = sum(p.numel() for p in model.parameters()) / 1e6
    model.spec.parameters_m = round(n, 2)  # the folder's medvlsm.json says what this prints
    model.save_pretrained(args.output)
    print(f"Wrote {args.arch} ({args.size}, {n:.2f} M parameters, random weights) to {args.output}")


def cmd_prompts(args):
    import json

    from .prompts import Attributes, geometry_attributes, ladder

    if args.attributes:
        try:
            entries = json.loads(Path(args.attributes).read_text(encoding="utf-8"))
            ladders = [ladder(Attributes.from_dict(e)) for e in entries]
        except (OSError, ValueError, TypeError) as e:
            raise InputError(f"Cannot use {args.attributes}: {e}",
                             "Give a JSON list of objects with class, shape, color, size, number, location, "
                             "descriptions") from e
        print(json.dumps(ladders, indent=2))
        return
    if not args.cls:
        raise InputError("No --class given", "Say what the target is, e.g. --class polyp (or use --attributes FILE)")
    values = {"cls": args.cls, "shape": args.shape, "color": args.color, "size": args.size, "number": args.number,
              "location": args.location, "descriptions": args.description}
    if args.mask:
        from . import io
        from .datasets import binary_mask

        mask = binary_mask(io.read_image(args.mask))
        if mask.shape[0] != 1:
            raise InputError(f"{args.mask} is a volume", "Give a 2D mask (one slice) for --mask")
        derived = geometry_attributes(mask[0])
        values.update({k: v for k, v in derived.items() if not values[k]})
    result = ladder(Attributes(**values))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        for text in value if isinstance(value, list) else [value]:
            print(f"{key}: {text}")


def _check_prompt_types(types, allow_random=False):
    from .prompts import PROMPT_TYPES

    allowed = PROMPT_TYPES + (("random",) if allow_random else ())
    bad = [t for t in types if t not in allowed]
    if bad:
        raise InputError(f"Unknown prompt type(s) {bad}", f"Use {' '.join(allowed)}")


def cmd_evaluate(args):
    from . import evaluation
    out = Path(args.output)
    if out.suffix.lower() != ".csv":
        raise InputError(f"--output {out} must end in .csv", "The summary, plot and overlays are written beside it")
    from .io import check_writable

    try:  # as finetune does: the report's folder is made if it is new
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"Cannot create the folder {out.parent} ({e.strerror or e.__class__.__name__})",
                         "Choose a folder you can write to") from e
    check_writable(out)
    worst = None
    robust = None
    if args.predictions or args.ground_truth:
        if not (args.predictions and args.ground_truth):
            raise InputError("--predictions and --ground-truth go together", "Give both folders")
        rows = evaluation.evaluate_files(args.predictions, args.ground_truth, args.nsd_tolerance)
    elif args.data:
        if not (args.images and args.masks):
            raise InputError("--data needs --images and --masks", "Give the image and mask folders of the JSON file")
        from .datasets import read_annotations
        from .engine import Engine
        from .models import load_model

        items = read_annotations(args.data, args.images, args.masks)[: args.limit]
        _check_prompt_types(args.prompt_type)
        engine = Engine(load_model(args.model), device=args.device, precision=args.precision,
                        batch_size=args.batch_size, cache_bytes=256 << 20)
        update, close = _progress_bar(args.quiet, "evaluating")
        worst = evaluation.WorstCases(3)
        # one preprocessing for the table and the robustness figures: asked, else as trained, else the paper's
        options = {"threshold": args.threshold, "resize": args.resize or engine.model.spec.resize or "stretch"}
        try:
            rows = evaluation.evaluate_model(engine, items, args.prompt_type, nsd_tolerance_mm=args.nsd_tolerance,
                                             progress=update, keep=worst, **options)
            if args.robustness:  # the "correct" prompt: the first real (non-empty) type asked for
                correct = next((t for t in args.prompt_type if t != "p0"), "p1")
                robust = evaluation.robustness(engine, items, correct, **options)
        finally:
            close()
    else:
        raise InputError("Nothing to evaluate", "Give --predictions and --ground-truth, or --model with --data")
    untrained = "" if worst is None or engine.model.spec.trained else engine.model.spec.name
    report = evaluation.write_report(rows, out, robust, worst, untrained)
    missing = evaluation.missing_cases(rows)
    print(report[2])
    if missing:
        print(f"{len(missing)} case(s) without a prediction, scored as empty: {', '.join(missing[:10])}")
    if robust:
        print("\n".join(report[report.index("## Prompt robustness") + 2 :]))
    print(f"Wrote {out}, {out.with_suffix('.md')}, {out.stem}_boxplot.png")


def cmd_finetune(args):
    from . import training

    _check_prompt_types(args.prompt_type, allow_random=True)
    if args.server:
        return _teach_on_server(args)
    if not args.output:
        raise InputError("finetune needs --output", "Give the folder for the new model")
    model = _starting_model(args)
    spec = model.spec
    if args.volumes or args.segmentations:
        if not (args.volumes and args.segmentations):
            raise InputError("--volumes and --segmentations go together", "Give both folders")
        from .datasets import read_volume_folder

        pairs = read_volume_folder(args.volumes, args.segmentations, _label_names(args.label_names))[: args.limit]
        resize = args.resize or "letterbox"
        slicing = training.Slicing(args.plane, args.labels, args.empty_fraction, args.seed, resize)
        train, val = training.train_val_split(pairs, args.val_fraction, lambda ps: training.samples_from_volumes(
            ps, spec, slicing))
    elif args.train:
        if not (args.images and args.masks):
            raise InputError("--train needs --images and --masks", "Give the image and mask folders")
        from .datasets import read_annotations

        resize = args.resize or "stretch"
        if not args.val:
            raise InputError("No --val annotations", "Give a validation split (the best model is chosen on it)")
        train, val = (training.samples_from_annotations(read_annotations(split, args.images, args.masks)[: args.limit],
                                                        spec, resize) for split in (args.train, args.val))
    else:
        raise InputError("No training data", "Give --train/--val with --images/--masks, or --volumes with --segmentations")
    config = training.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, recipe=args.recipe,
                                  prompt_types=args.prompt_type, freeze=args.freeze, seed=args.seed,
                                  patience=args.patience, precision=args.precision,
                                  max_steps_per_epoch=args.max_steps_per_epoch, resize=resize, device=args.device,
                                  resume=args.resume, cpu_seconds=args.cpu_seconds, adapt=args.adapt, **({} if args.negative_ratio is None else
                                                         {"negative_ratio": args.negative_ratio}))
    Path(args.output).mkdir(parents=True, exist_ok=True)
    bar = lines = None
    if not args.quiet and training.dist_info()[0] == 0:
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=0, unit="step", leave=False, file=sys.stderr)
        else:  # a log file: plain lines, never bar redraws
            lines = {}

    def progress(epoch, step, steps):
        if lines is not None:
            lines.setdefault(epoch, _ProgressLines(f"epoch {epoch}", "step"))(step, steps)
            return
        if step == 1:
            bar.reset(total=steps)
            bar.set_description(f"epoch {epoch}")
        bar.update(1)

    try:
        summary = training.finetune(model, train, val, args.output, config,
                                    training.Progress(progress if bar is not None or lines is not None else None))
    finally:
        if bar is not None:
            bar.close()
    if training.dist_info()[0] == 0:
        print(f"Best validation Dice {summary['best_val_dice']:.4f} at epoch {summary['best_epoch']} "
              f"({summary['epochs']} epochs, {summary['steps_per_epoch']} steps/epoch x {summary['world_size']} "
              f"process(es), {summary['seconds']:.0f} s) -> {args.output}")


def _starting_model(args):
    """``--model`` (a registry name or folder), or random weights of ``--arch`` at ``--size``."""
    from .models import load_model

    if args.arch is None:
        return load_model(args.model)
    if args.model:
        raise InputError("--model and --arch both say where training starts", "Give one of them")
    arch = ARCHITECTURES[args.arch]
    if args.size not in arch.sizes:
        raise InputError(f"{arch.title} has no size {args.size!r}", f"Use one of: {', '.join(arch.sizes)}")
    return arch.random(args.size, name=Path(args.output).name, seed=args.seed)


def _teach_on_server(args) -> None:
    """``finetune --server``: upload the cases once, teach there, follow the curve here."""
    from .client import Client, read_token
    from .datasets import read_volume_folder
    from .teaching import LabelledArrays, TeachSettings

    if not (args.volumes and args.segmentations):
        raise InputError("--server teaches on volumes", "Give --volumes and --segmentations")
    if args.output:
        raise InputError("--server keeps the model on the server", "Leave out --output; the answer names the model")
    pairs = read_volume_folder(args.volumes, args.segmentations, _label_names(args.label_names))[: args.limit]
    cases = [LabelledArrays(pair.name, *pair.load()) for pair in pairs]
    settings = TeachSettings(mode="adapt" if args.adapt else "finetune", epochs=args.epochs, plane=args.plane,
                             labels=args.labels)
    client = Client(args.server, read_token(args.token_file))
    log.info("teaching on %s: %d case(s), %s, %d epochs", args.server, len(cases), settings.mode, settings.epochs)

    def epoch(row):
        log.info("epoch %d: train loss %.4f, held-out Dice %.4f", row["epoch"], row["train_loss"], row["val_dice"])

    name, summary = client.teach(cases, settings, args.model, on_epoch=epoch)
    print(f"Taught {name} on {args.server} (yours alone there): held-out Dice {summary['best_val_dice']:.4f} "
          f"(epoch {summary['best_epoch']} of {summary['epochs']}). Use it: medvlsm segment ... --server "
          f"{args.server} --model {name}")


COMMANDS = {"finetune": cmd_finetune, "segment": cmd_segment, "serve": cmd_serve, "models": cmd_models, "demo": cmd_demo, "download": cmd_download,
            "init": cmd_init, "prompts": cmd_prompts, "evaluate": cmd_evaluate, "convert": cmd_convert}


class _OneLine(logging.Handler):
    """``warning: ...`` lines on whatever ``sys.stderr`` is at the time (tests swap it)."""

    def emit(self, record):
        line = f"{record.levelname.lower()}: {record.getMessage()}"
        try:  # while a progress bar is drawn, print above it instead of onto it
            from tqdm import tqdm

            if getattr(tqdm, "_instances", None):
                tqdm.write(line, file=sys.stderr)
                return
        except ImportError:
            pass
        print(line, file=sys.stderr)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = build_parser().parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    signal.signal(signal.SIGTERM, _interrupt)  # a killed run cleans up like Ctrl-C: no half-written file
    log.handlers[:] = [_OneLine()]
    log.setLevel(logging.DEBUG if args.debug else logging.INFO)
    log.propagate = False
    try:
        COMMANDS[args.command](args)
    except Cancelled as e:
        print(f"cancelled: {e}", file=sys.stderr)
        return EXIT_CANCELLED
    except BrokenPipeError:  # output piped into `head` and closed early
        return 0
    except KeyboardInterrupt:
        print("cancelled: interrupted; every output path holds its complete new file or what it held before.",
              file=sys.stderr)
        return EXIT_CANCELLED
    except MedVLSMError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # a bug or an environment problem: one line, details with --debug
        if args.debug:
            raise
        print(f"error: unexpected {e.__class__.__name__}: {str(e).splitlines()[0][:300] if str(e) else ''} "
              "(run again with --debug for the traceback and report it)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
