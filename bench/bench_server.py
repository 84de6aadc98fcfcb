"""Load on `medvlsm serve`: N concurrent clients x M requests each, over real HTTP on this machine.

    python bench/bench_server.py [--clients 8] [--requests 20] [--depth 16] [--size 96] [--json out.json]

The server runs in its own process (`medvlsm serve`, the tiny random CLIPSeg unless --model) as in
a department; each client thread has its own volume and token and checks every answer against the
masks the same model makes locally, so a mixed-up answer fails the run. Reported: requests answered,
mismatches, latency p50 / p95 per request (upload included in each client's first), throughput.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import machine, report  # noqa: E402

from medvlsm.client import Client  # noqa: E402
from medvlsm.engine import Engine  # noqa: E402
from medvlsm.models import load_model  # noqa: E402
from medvlsm.request import plan  # noqa: E402
from medvlsm.volume import Volume  # noqa: E402

PROMPTS = ["liver", "spleen", "left kidney", "aorta", "tumour"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, tokens: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "medvlsm.cli", "serve", "--model", str(model_dir), "--port",
                               str(port), "--token-file", str(tokens), "--device", "cpu"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            Client(f"http://127.0.0.1:{port}", "client0-token-0123456789").models()
            return server
        except Exception:
            if server.poll() is not None:
                raise RuntimeError(server.stderr.read().decode()[-2000:])
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not start within 120 s")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=20, help="requests per client")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--model", default=None, help="a model folder (default: a tiny random CLIPSeg)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = Path(args.model) if args.model else tmp / "tiny"
        if not args.model:
            from medvlsm.models.clipseg import CLIPSeg

            CLIPSeg.random("tiny", seed=0).save_pretrained(model_dir)
        tokens = {f"client{i}": f"client{i}-token-0123456789" for i in range(args.clients)}
        (tmp / "tokens").write_text("".join(f"{n} {t}\n" for n, t in tokens.items()), encoding="utf-8")
        port = free_port()
        server = start_server(model_dir, tmp / "tokens", port)
        try:
            engine = Engine(load_model(model_dir), device="cpu")
            rng = np.random.default_rng(0)
            volumes = [Volume(rng.normal(0, 300, (args.depth, args.size, args.size)).astype(np.int16), (0.8, 0.8, 2.0))
                       for _ in range(args.clients)]
            expected = {(c, q): engine.segment(volumes[c], plan(volumes[c], [q])).masks()
                        for c in range(args.clients) for q in PROMPTS}
            latencies, mismatches, errors = [], [], []

            def client_run(c: int, token: str):
                client = Client(f"http://127.0.0.1:{port}", token)
                for r in range(args.requests):
                    prompt = PROMPTS[r % len(PROMPTS)]
                    start = time.perf_counter()
                    try:
                        result = client.segment(volumes[c], plan(volumes[c], [prompt]))
                    except Exception as e:  # counted, not raised: the figures say how many failed
                        errors.append(f"client {c}: {e}")
                        continue
                    latencies.append(time.perf_counter() - start)
                    if not np.array_equal(result.masks(), expected[(c, prompt)]):
                        mismatches.append((c, r))

            threads = [threading.Thread(target=client_run, args=(c, t)) for c, t in enumerate(tokens.values())]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - started
        finally:
            server.terminate()
            server.wait(30)
    lat = np.array(latencies)
    results = {"machine": machine(), "clients": args.clients, "requests_per_client": args.requests,
              "volume": f"{args.depth}x{args.size}x{args.size}", "answered": len(latencies),
              "asked": args.clients * args.requests, "mismatched": len(mismatches), "errors": errors[:5],
              "p50_s": float(np.percentile(lat, 50)) if len(lat) else None,
              "p95_s": float(np.percentile(lat, 95)) if len(lat) else None,
              "requests_per_s": len(latencies) / wall, "wall_s": wall}
    return report(results, args.json)


if __name__ == "__main__":
    main()
