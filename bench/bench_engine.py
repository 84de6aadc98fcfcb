"""Speed and memory of the engine against the naive way, measured in one run on one volume.

    python bench/bench_engine.py --quick            # 32 x 256 x 256 CT-like volume (CI runs this)
    python bench/bench_engine.py --full             # 300 x 512 x 512
    python bench/bench_engine.py --depth 200 --size 512 --precision fp32 bf16 --no-naive

Cases, full-size CLIPSeg with random weights (speed does not depend on the weights):
  (a) naive: the reference code's path - per slice a PIL image through the HF processor, a full
      forward with the text re-encoded, fp32, batch 1;
  (b) engine, first pass: file read -> masks -> .seg.nrrd written;
  (c) engine, re-prompt of the already-encoded volume (decoder only, feature cache);
  (d) current-slice preview (one slice, new prompt, nothing cached for it), and the same after the
      slice was prefetched (what the Slicer panel does while the prompt is typed);
  (e) --memory (instead of a-d): bytes per voxel that `medvlsm segment` holds beyond the volume for
      each output kind, one prompt and each further one: the slope of its peak RSS between 64 and 256
      slices of 512 x 512 (``--memory-depths``), small and full CLIPSeg (``--memory-models``).
Peak memory is each case's own peak RSS, measured in a fresh subprocess. Results: a JSON file
(``--json``) and a markdown table on stdout. Ratios are what to compare across machines.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def make_volume(depth: int, size: int, path: Path) -> None:
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:depth, :size, :size]
    body = ((y - size / 2) ** 2 / (0.42 * size) ** 2 + (x - size / 2) ** 2 / (0.48 * size) ** 2) < 1
    a = np.where(body, 40, -1000) + 0 * z
    organ = ((y - 0.45 * size) ** 2 + (x - 0.35 * size) ** 2) < (0.12 * size) ** 2
    a = np.where(organ & body, 150, a) + rng.normal(0, 10, (1, size, size))
    image = sitk.GetImageFromArray(a.astype(np.int16))
    image.SetSpacing((0.7, 0.7, 1.5))
    sitk.WriteImage(image, str(path))


def _model(size="full", seed=0):
    from medvlsm.models.clipseg import CLIPSeg

    return CLIPSeg.random(size, seed=seed)


def case_naive(volume_path: str, slices: int, model_size: str = "full") -> dict:
    """The reference code's path (HF processor on PIL images, full forward per slice, fp32, batch 1)."""
    import torch
    from PIL import Image
    from transformers import CLIPSegProcessor, ViTImageProcessor

    from medvlsm import io
    from medvlsm.window import choose_window

    model = _model(model_size)
    hf = model.hf.eval()
    processor = CLIPSegProcessor(
        image_processor=ViTImageProcessor(do_resize=True, size={"height": 352, "width": 352}, resample=2,
                                          image_mean=list(model.spec.mean), image_std=list(model.spec.std)),
        tokenizer=model.tokenizer)
    volume = io.read_image(volume_path)
    w = choose_window(volume)
    start = time.perf_counter()
    with torch.inference_mode():
        for k in range(slices):
            grey = (np.clip((volume.array[k] - w.low) / (w.high - w.low), 0, 1) * 255).astype(np.uint8)
            image = Image.fromarray(grey).convert("RGB")
            inputs = processor(text=["liver"], images=[image], padding=True, return_tensors="pt")
            logits = hf(**inputs).logits
            np.asarray(torch.sigmoid(logits).numpy() > 0.5)
    return {"seconds": time.perf_counter() - start, "slices": slices, "dtype": "float32", "batch": 1}


def case_engine(volume_path: str, precision: str, batch: int | None, reprompt: bool, preview: bool,
                model_size: str = "full") -> dict:
    from medvlsm import io
    from medvlsm.engine import Engine

    engine = Engine(_model(model_size), device="auto", precision=precision, batch_size=batch, cache_bytes=8 << 30)
    out = Path(tempfile.mkdtemp()) / "out.seg.nrrd"
    engine.encode_text(["liver", "spleen", "kidney"])  # the model is loaded and warm: time the volume only
    start = time.perf_counter()
    volume = io.read_image(volume_path)
    result = engine.segment(volume, ["liver"], cache_key="bench")
    io.write_seg_nrrd(volume, result.masks(), result.prompts, out)
    first = time.perf_counter() - start
    record = {"seconds": first, "slices": volume.shape[0], "dtype": result.dtype, "device": result.device,
              "batch": engine.batch_size}
    if reprompt:
        start = time.perf_counter()
        again = engine.segment(volume, ["spleen"], cache_key="bench")
        assert again.from_cache
        record["reprompt_seconds"] = time.perf_counter() - start
    if preview:
        mid = volume.shape[0] // 2
        engine.clear_cache()
        start = time.perf_counter()  # a new volume's current slice, keyed cheaply as Slicer does (node ID + MTime)
        engine.segment(volume, ["kidney"], slices=(mid, mid + 1), cache_key="bench-preview")
        record["preview_seconds"] = time.perf_counter() - start
        engine.prefetch(volume, slices=(mid + 1, mid + 2), cache_key="bench-preview")  # while typing
        start = time.perf_counter()
        engine.segment(volume, ["liver"], slices=(mid + 1, mid + 2), cache_key="bench-preview")
        record["preview_prefetched_seconds"] = time.perf_counter() - start
    return record


def _in_subprocess(case: str, **kwargs) -> dict:
    """Run one case in a fresh interpreter: its peak RSS is its own."""
    code = (f"import json, resource, sys; sys.path.insert(0, {str(HERE)!r}); import bench_engine as b; "
            f"r = b.{case}(**{kwargs!r}); "
            "r['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; print(json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_memory(results: dict) -> None:
    m = results["memory"]
    print(f"Machine: {results['machine']}; {m['depths'][0]} -> {m['depths'][1]} slices of {m['size']} x {m['size']}; "
          "bytes per voxel held beyond the volume (int16) by `medvlsm segment`\n")
    print("| model | output | one prompt | each further prompt |\n|---|---|---|---|")
    for r in m["rows"]:
        print(f"| CLIPSeg {r['model']} | {r['kind']} | {r['one_prompt']:.2f} | {r.get('each_further_prompt', float('nan')):.2f} |")


def report(results: dict, path=None) -> dict:
    """Print ``results`` as JSON and, with ``path``, save them there (the benchmarks' one output)."""
    print(json.dumps(results, indent=2))
    if path:
        Path(path).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return results


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    import os

    return f"{cpu}, {len(os.sched_getaffinity(0))} cores"


MEMORY_KINDS = {  # output kind -> the segment arguments that write it (besides -o for the first)
    "labelmap .nii.gz": ["-o", "{out}.nii.gz"],
    "labelmap .nrrd": ["-o", "{out}.nrrd"],
    ".seg.nrrd": ["-o", "{out}.seg.nrrd"],
    "+ probabilities .nii.gz": ["-o", "{out}.seg.nrrd", "--probabilities", "{out}-p.nii.gz"],
    "+ overlay .png": ["-o", "{out}.seg.nrrd", "--overlay", "{out}.png"],
}
MEMORY_PROMPTS = ["liver", "spleen", "left kidney"]


def _peak_rss_mb(argv: list) -> float:
    """Peak RSS of one command (its own, from wait4: RUSAGE_CHILDREN would be the largest of all children)."""
    import os

    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    err = child.stderr.read().decode(errors="replace")
    if status:
        raise RuntimeError(f"{' '.join(argv)} failed: {err[-1500:]}")
    return usage.ru_maxrss / 1024


def output_memory(depths, size: int, models, tmp: Path, kinds=None, prompts=(1, 3), repeats: int = 2) -> dict:
    """Bytes per voxel a ``medvlsm segment`` run holds beyond the volume, per output kind, from the
    slope of its peak RSS between two depths (what does not grow with the volume — the model, torch,
    one batch — cancels out); minus the input's own 2 bytes (int16) per voxel. Each run is a fresh
    process, repeated ``repeats`` times, the smallest peak kept (the allocator's caches add tens of MB
    of noise to a single run); the same for one prompt and for each further prompt. The full model
    runs the first kind only (its bytes per voxel are the small model's: only constants differ)."""
    shallow, deep = depths
    volumes = {}
    for depth in depths:  # made in a child: a forked child's peak RSS starts at its parent's
        volumes[depth] = tmp / f"memory-{depth}.nrrd"
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_engine; "
                        f"bench_engine.make_volume({depth}, {size}, bench_engine.Path({str(volumes[depth])!r}))"],
                       check=True)
    extra_voxels = (deep - shallow) * size * size
    rows = []
    for model_size in models:
        folder = tmp / f"clipseg-{model_size}"
        if not folder.is_dir():
            subprocess.run([sys.executable, "-m", "medvlsm.cli", "init", "--size", model_size, "-o", str(folder)],
                           check=True, capture_output=True)
        chosen = kinds or MEMORY_KINDS
        if model_size == "full" and kinds is None:
            chosen = dict(list(MEMORY_KINDS.items())[:1])
        for kind, template in chosen.items():
            per_prompts = {}
            for n in prompts:
                peaks = {}
                for depth in depths:
                    out = str(tmp / f"out-{depth}")
                    argv = [sys.executable, "-m", "medvlsm.cli", "--quiet", "segment", str(volumes[depth]),
                            "--model", str(folder), "--device", "cpu", *[a.format(out=out) for a in template]]
                    for prompt in MEMORY_PROMPTS[:n]:
                        argv += ["-p", prompt]
                    peaks[depth] = min(_peak_rss_mb(argv) for _ in range(repeats))
                slope = (peaks[deep] - peaks[shallow]) * 2**20 / extra_voxels
                per_prompts[n] = {"peak_rss_mb": peaks, "bytes_per_voxel": slope, "beyond_volume": slope - 2.0}
            row = {"model": model_size, "kind": kind, "prompts": per_prompts,
                   "one_prompt": per_prompts[prompts[0]]["beyond_volume"]}
            if len(prompts) > 1:
                row["each_further_prompt"] = ((per_prompts[prompts[-1]]["bytes_per_voxel"]
                                               - per_prompts[prompts[0]]["bytes_per_voxel"]) / (prompts[-1] - prompts[0]))
            rows.append(row)
            print(f"  {model_size} {kind}: {row['one_prompt']:.2f} B/voxel beyond the volume for one prompt, "
                  f"{row.get('each_further_prompt', float('nan')):.2f} per further prompt", flush=True)
    return {"depths": list(depths), "size": size, "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="32 x 256 x 256 (default)")
    p.add_argument("--full", action="store_true", help="300 x 512 x 512")
    p.add_argument("--depth", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--precision", nargs="+", default=["auto"], help="engine precisions to time (fp32 bf16 auto)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--naive-slices", type=int, default=None, help="time the naive way on this many slices "
                   "(per-slice cost is constant; default: all in quick mode, 16 in full mode)")
    p.add_argument("--no-naive", action="store_true")
    p.add_argument("--memory", action="store_true", help="bytes per voxel of every output kind instead of the "
                   "speed cases (targets: <= 3 beyond the volume for one prompt, <= 1.5 per further prompt)")
    p.add_argument("--memory-depths", type=int, nargs=2, default=[64, 256])
    p.add_argument("--memory-models", nargs="+", default=["small", "full"])
    p.add_argument("--memory-repeats", type=int, default=2, help="runs per measurement, the smallest peak kept")
    p.add_argument("--model-size", default="full", choices=("full", "small", "tiny"),
                   help="CLIPSeg size for the speed cases (default full, the published architecture)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    depth, size = (300, 512) if args.full else (32, 256)
    depth, size = args.depth or depth, args.size or size
    tmp = Path(tempfile.mkdtemp())
    if args.memory:
        size = args.size or 512
        results = {"machine": machine(), "memory": output_memory(args.memory_depths, size, args.memory_models, tmp,
                                                                   repeats=args.memory_repeats)}
        print_memory(results)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2))
        return results
    volume_path = tmp / "bench.nrrd"
    make_volume(depth, size, volume_path)
    results = {"machine": machine(), "volume": f"{depth}x{size}x{size}", "model": f"CLIPSeg {args.model_size}",
               "cases": {}}
    if not args.no_naive:
        n = args.naive_slices or (depth if depth <= 32 else 16)
        results["cases"]["naive"] = _in_subprocess("case_naive", volume_path=str(volume_path), slices=n,
                                                   model_size=args.model_size)
    for precision in args.precision:
        results["cases"][f"engine_{precision}"] = _in_subprocess(
            "case_engine", volume_path=str(volume_path), precision=precision, batch=args.batch_size,
            reprompt=True, preview=True, model_size=args.model_size)
    rows = ["| case | dtype | batch | s/slice | slices/s | s/volume | re-prompt s | preview s | preview s, prefetched "
            "| peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["cases"].items():
        per = r["seconds"] / r["slices"]
        r["seconds_per_slice"] = per
        rows.append(f"| {name} | {r['dtype']} | {r['batch']} | {per:.3f} | {1 / per:.2f} | {per * depth:.1f} | "
                    f"{r.get('reprompt_seconds', float('nan')):.2f} | {r.get('preview_seconds', float('nan')):.3f} | "
                    f"{r.get('preview_prefetched_seconds', float('nan')):.3f} | {r['peak_rss_mb']:.0f} |")
    naive = results["cases"].get("naive")
    for name, r in results["cases"].items():
        if name.startswith("engine"):
            if naive:
                r["speedup_vs_naive"] = naive["seconds_per_slice"] / r["seconds_per_slice"]
            r["reprompt_speedup"] = r["seconds"] / r["reprompt_seconds"]
            rows.append(f"\n{name}: first pass {r.get('speedup_vs_naive', float('nan')):.1f}x the naive way (b/a); "
                        f"re-prompt {r['reprompt_speedup']:.1f}x faster than the first pass (b/c)")
    print(f"Machine: {results['machine']}; volume {results['volume']}; CLIPSeg {args.model_size}, random weights\n")
    print("\n".join(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
