"""Remote execution under load: `purelens serve` in one process vs on Ray Serve.

    python benchmarks/serve.py [--clients 8] [--requests 50] [--no-ray] [--quick] [--out FILE]

Each server is started as `python -m purelens serve` in a subprocess on the
bundled model; `clients` threads each send `requests` runs (a steering vector
of their own and a save), and every record is checked against a local run.
Prints one row per server: wall time, requests per second, and the p50/p99
latency a client sees.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import torch
from _common import machine

import purelens as pl

PROMPTS = ["bilora lives in", "the home of"]
TOKEN = "benchmark-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(extra: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "PURELENS_TOKENS": TOKEN}
    command = [sys.executable, "-m", "purelens", "serve", "--port", str(port), *extra]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.terminate()
    raise RuntimeError("server did not start in 180 s")


def load(url: str, clients: int, requests: int) -> dict[str, Any]:
    """`clients` threads x `requests` runs; latencies, wall time, and whether all were right."""
    model, tokenizer = pl.models.load_default()
    ids = pl.tokenize(tokenizer, PROMPTS)
    last = pl.at(pl.last_token(ids["attention_mask"]))  # the batch is padded on the right
    vectors = torch.randn(clients, requests, 128, generator=torch.Generator().manual_seed(0))

    def interventions(k: int, i: int) -> list[Any]:
        return [pl.add("h.0", vectors[k, i]), pl.save("h.1", last, name="mine")]

    expected = [
        [pl.run(model, ids, interventions(k, i))["mine"] for i in range(requests)]
        for k in range(clients)
    ]
    latencies: list[float] = []
    wrong = 0
    lock = threading.Lock()
    handles = [pl.remote(url, "default", token=TOKEN) for _ in range(clients)]
    pl.run(handles[0], ids)  # warm up

    def client(k: int) -> None:
        nonlocal wrong
        for i in range(requests):
            start = time.perf_counter()
            rec = pl.run(handles[k], ids, interventions(k, i))
            took = time.perf_counter() - start
            with lock:
                latencies.append(took)
                wrong += not torch.equal(rec["mine"], expected[k][i])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for handle in handles:
        handle.close()
    return {"wall": wall, "latencies": latencies, "wrong": wrong}


def local_baseline(requests: int) -> dict[str, Any]:
    """The same runs in this process, one after another: what HTTP and serving add to."""
    model, tokenizer = pl.models.load_default()
    ids = pl.tokenize(tokenizer, PROMPTS)
    last = pl.at(pl.last_token(ids["attention_mask"]))
    vectors = torch.randn(requests, 128)
    latencies = []
    start = time.perf_counter()
    for i in range(requests):
        t0 = time.perf_counter()
        pl.run(model, ids, [pl.add("h.0", vectors[i]), pl.save("h.1", last, name="mine")])
        latencies.append(time.perf_counter() - t0)
    return {"wall": time.perf_counter() - start, "latencies": latencies, "wrong": 0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# The table's header, for the rows `row` makes.
HEADER = [
    "| server | clients x requests | wall (s) | requests/s | p50 (ms) | p99 (ms) | all right |",
    "|---|---|---|---|---|---|---|",
]


def row(name: str, shape: str, result: dict[str, Any]) -> str:
    lat = result["latencies"]
    right = "yes" if result["wrong"] == 0 else f"DIFFER ({result['wrong']} wrong)"
    return (
        f"| {name} | {shape} | {result['wall']:.2f} | {len(lat) / result['wall']:.1f} | "
        f"{statistics.median(lat) * 1e3:.1f} | {percentile(lat, 0.99) * 1e3:.1f} | {right} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="per client")
    parser.add_argument("--no-ray", action="store_true", help="leave out Ray Serve")
    parser.add_argument("--quick", action="store_true", help="2 clients x 5 requests, no Ray")
    parser.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    clients, requests = (2, 5) if args.quick else (args.clients, args.requests)
    servers = [
        ("one process (uvicorn), concurrency 1", []),
        ("one process (uvicorn), concurrency 2", ["--concurrency", "2"]),
    ]
    if not (args.quick or args.no_ray):
        servers.append(("Ray Serve, 2 replicas", ["--ray", "--replicas", "2"]))
    shape = f"{clients} x {requests}"
    rows = [
        row(
            "local pl.run, no server (sequential)",
            f"1 x {clients * requests}",
            local_baseline(clients * requests),
        )
    ]
    for name, extra in servers:
        process, url = start_server(extra)
        try:
            rows.append(row(name, shape, load(url, clients, requests)))
        finally:
            process.terminate()
            process.wait(timeout=60)
    text = "\n".join(
        [
            f"{machine()}, {os.cpu_count()} cores ({platform.system()}). Bundled model, "
            f"{len(PROMPTS)} prompts a request, a steering vector and a save each; "
            "latency as a client sees it.\n",
            *HEADER,
            *rows,
        ]
    )
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# purelens serve under load\n\n`python benchmarks/serve.py`\n\n{text}\n")


if __name__ == "__main__":
    main()
