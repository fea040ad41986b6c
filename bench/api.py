"""API benchmark over real HTTP: a `fedsynth serve` process on loopback, the bank model.

Prints one JSON line per figure, writes bench/results/api.jsonl and the table in
docs/benchmarks.md:

- ``throughput``: rows/s of one 1,000,000-row request as CSV and as Parquet, end to end
  (request to last byte, client discarding bytes), next to the same rows generated and
  encoded in-process without HTTP (the baseline the HTTP path is compared with);
- ``latency``: p50/p95/p99 and errors of 1,000-row CSV requests from 50 concurrent
  clients (asyncio + aiohttp) for 60 s;
- ``memory``: the server's peak RSS growth while streaming 10,000,000 rows.

Targets (docs/benchmarks.md): >= 500,000 rows/s for CSV, p99 < 250 ms at 50 clients, zero
errors, RSS growth < 200 MB for 10M rows.

    python bench/api.py             # about 5 minutes on 2 cores
    python bench/api.py --quick     # smaller figures, for a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import torch

from fedsynth.demo.data import prepare_demo_tables
from fedsynth.generative.export import iter_encoded
from fedsynth.generative.spec import load_spec
from fedsynth.generative.table import read_table, validate_table
from fedsynth.generative.training import train
from fedsynth.home import fedsynth_home
from fedsynth.privacy.keys import KeyStore as SigningKeys
from fedsynth.server.api.keys import KeyStore
from fedsynth.server.records import Database, database_url
from fedsynth.server.registry import ModelRegistry

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "api.jsonl"
DOC = REPO / "docs" / "benchmarks.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (the workers of ``--workers N``)."""
    total = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                total = int(line.split()[1]) / 1024
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return total + sum(rss_mib(int(child)) for child in children)


def start_server(home: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    """``fedsynth serve ARGS`` over ``home`` on a free port, in its own session (stop it
    with ``os.killpg``); returns once /health answers, with the process and its URL."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "fedsynth.cli", "serve", "--port", str(port), *args],
        env=dict(os.environ, FEDSYNTH_HOME=str(home)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    return server, url


def prepare(home: Path) -> tuple[str, Any]:
    """Train the bank model (the spec's settings), register it, make an analyst key."""
    spec = load_spec(REPO / "federations" / "bank.toml")
    table = prepare_demo_tables(fedsynth_home() / "data", names=("bank",))["bank"]
    model = train(validate_table(read_table(table), spec.schema), spec)
    db = Database(database_url(home))
    registry = ModelRegistry(home / "registry", SigningKeys(home / "keys"), db)
    version = registry.register(
        model,
        federation="bank",
        sector="bank",
        run_id=None,
        round=1,
        node_privacy={"central": {"epsilon": model.epsilon, "delta": spec.privacy.delta}},
        participants=["central"],
    )
    _, token = KeyStore(db).create("analyst", label="bench")
    return token, registry.load(version.id)


def stream_rows(client: httpx.Client, n: int, fmt: str, pid: int | None = None) -> dict[str, Any]:
    peak, total = 0.0, 0
    started = time.perf_counter()
    body = {"n": n, "seed": 1, "format": fmt}
    with client.stream("POST", "/v1/models/bank-v1/samples", json=body) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            total += len(chunk)
            if pid is not None:
                peak = max(peak, rss_mib(pid))
    seconds = time.perf_counter() - started
    return {
        "rows_per_s": round(n / seconds),
        "seconds": round(seconds, 2),
        "bytes": total,
        "peak_rss_mib": round(peak, 1),
    }


def in_process(model, n: int, fmt: str) -> dict[str, Any]:
    torch.set_num_threads(1)  # as the server does (fedsynth.server.api.app.create_app)
    started = time.perf_counter()
    total = sum(len(b) for b in iter_encoded(model.iter_samples(n, seed=1), model.schema, fmt, {}))
    seconds = time.perf_counter() - started
    return {"rows_per_s": round(n / seconds), "seconds": round(seconds, 2), "bytes": total}


async def load(url: str, token: str, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` closed-loop clients sending 1,000-row CSV requests for ``seconds``.

    aiohttp, not httpx: on these 2 cores, which the server shares with its load, httpx's
    client cost 8 ms of CPU per request (18 CPU-seconds in 30 s of this load) and that
    showed in the tail latencies; aiohttp costs under 1 ms. ``loadgen_cpu_s`` says what the
    generator took.
    """
    latencies: list[float] = []
    errors = 0
    cpu_before = time.process_time()
    deadline = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(
        url, headers=headers, connector=connector, timeout=timeout
    ) as session:

        async def worker(i: int) -> None:
            nonlocal errors
            seed = i * 1_000_000
            while time.perf_counter() < deadline:
                seed += 1
                started = time.perf_counter()
                try:
                    body = {"n": 1000, "seed": seed}
                    async with session.post("/v1/models/bank-v1/samples", json=body) as r:
                        data = await r.read()
                    if r.status != 200 or len(data) < 1000:
                        errors += 1
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker(i) for i in range(clients)))
    latencies.sort()

    def pct(q: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)

    return {
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "requests_per_s": round(len(latencies) / seconds, 1),
        "loadgen_cpu_s": round(time.process_time() - cpu_before, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="fedsynth serve --workers N; N > 1 records to api-workers<N>.jsonl, not the doc",
    )
    args = parser.parse_args()
    rows_1m = 200_000 if args.quick else 1_000_000
    rows_big = 1_000_000 if args.quick else 10_000_000
    load_s = 10 if args.quick else 60
    results: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        row["workers"] = args.workers
        print(json.dumps(row), flush=True)
        results.append(row)

    with tempfile.TemporaryDirectory(prefix="fedsynth-api-bench-") as tmp:
        home = Path(tmp)
        token, model = prepare(home)
        server, url = start_server(
            home, "--max-rows", str(rows_big), "--workers", str(args.workers)
        )
        try:
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
                for _ in range(4):  # warm-up: model load and first imports, in every worker
                    stream_rows(client, 20_000, "csv")
                for fmt in ("csv", "parquet"):
                    over_http = stream_rows(client, rows_1m, fmt)
                    direct = in_process(model, rows_1m, fmt)
                    emit(
                        {
                            "bench": "throughput",
                            "format": fmt,
                            "rows": rows_1m,
                            "http": over_http,
                            "in_process": direct,
                            "http_vs_in_process": round(
                                over_http["rows_per_s"] / direct["rows_per_s"], 2
                            ),
                        }
                    )
                idle = rss_mib(server.pid)
                big = stream_rows(client, rows_big, "csv", pid=server.pid)
                emit(
                    {
                        "bench": "memory",
                        "rows": rows_big,
                        "rss_before_mib": round(idle, 1),
                        "rss_peak_mib": big["peak_rss_mib"],
                        "rss_growth_mib": round(big["peak_rss_mib"] - idle, 1),
                        "rows_per_s": big["rows_per_s"],
                    }
                )
            emit(
                {
                    "bench": "latency",
                    "clients": 50,
                    "seconds": load_s,
                    "rows_per_request": 1000,
                    **asyncio.run(load(url, token, 50, load_s)),
                }
            )
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    if not args.quick:  # a smoke run prints its figures and records nothing
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        target = RESULTS if args.workers == 1 else RESULTS.with_stem(f"api-workers{args.workers}")
        target.write_text("".join(json.dumps(r) + "\n" for r in results))
        if args.workers == 1:
            write_doc(results)


def write_doc(rows: list[dict[str, Any]]) -> None:
    lines = ["| bench | figure | target |", "| --- | --- | --- |"]
    for r in rows:
        if r["bench"] == "throughput":
            lines.append(
                f"| {r['rows']:,} rows as {r['format']} "
                f"| {r['http']['rows_per_s']:,} rows/s over HTTP "
                f"({r['in_process']['rows_per_s']:,} in-process, {r['http_vs_in_process']}x) "
                f"| {'>= 500,000 rows/s' if r['format'] == 'csv' else '-'} |"
            )
        elif r["bench"] == "memory":
            lines.append(
                f"| {r['rows']:,}-row CSV stream | server RSS +{r['rss_growth_mib']} MiB "
                f"(peak {r['rss_peak_mib']} MiB) | < 200 MB growth |"
            )
        else:
            lines.append(
                f"| {r['clients']} clients, {r['rows_per_request']}-row requests, {r['seconds']} s "
                f"| p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, p99 {r['p99_ms']} ms; "
                f"{r['requests']} requests, {r['errors']} errors | p99 < 250 ms, 0 errors |"
            )
    start, end = "<!-- api:start -->", "<!-- api:end -->"
    block = f"{start}\n" + "\n".join(lines) + f"\n{end}"
    text = DOC.read_text()
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text += f"\n## API (bench/api.py)\n\n{block}\n"
    DOC.write_text(text)


if __name__ == "__main__":
    main()
