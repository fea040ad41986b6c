"""Soak: the API under a mixed load of 50 concurrent clients for 10 minutes.

A `fedsynth serve` process over a home with the bank model (trained as bench/api.py
does); analysts ask for samples (1,000 rows, CSV / NDJSON / Parquet in turn), compliance
officers read budgets and audit pages. Measured, one JSON line written to
bench/results/soak.jsonl:

- errors: any non-2xx response or transport error (target: zero);
- memory: the server's RSS every 10 s; growth = median of the last two minutes minus the
  median of the first two after warm-up (target: flat, i.e. within noise, < 50 MiB);
- audit: sample_request events written during the soak == sample requests answered, and
  the chain verifies afterwards;
- request rates and p50/p99 latency per kind.

    python bench/soak.py                   # 10 minutes, 50 clients
    python bench/soak.py --minutes 1       # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from api import prepare, rss_mib, start_server  # bench/api.py: same model, same server
from sqlalchemy import func, select

from fedsynth.server.api.keys import KeyStore
from fedsynth.server.audit import AuditLog
from fedsynth.server.records import AuditEvent, Database, database_url

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "soak.jsonl"
FORMATS = ("csv", "ndjson", "parquet")


def sample_requests(db: Database) -> int:
    with db.session() as session:
        query = select(func.count()).where(AuditEvent.event_type == "sample_request")
        return int(session.execute(query).scalar_one())


async def soak(
    url: str, analyst: str, compliance: str, clients: int, seconds: float, pid: int
) -> dict[str, Any]:
    latencies: dict[str, list[float]] = {"samples": [], "budgets": [], "audit": []}
    errors: list[str] = []
    rss: list[tuple[float, float]] = []
    started = time.perf_counter()
    deadline = started + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:

        async def client(i: int) -> None:
            analyst_h = {"Authorization": f"Bearer {analyst}"}
            compliance_h = {"Authorization": f"Bearer {compliance}"}
            n = 0
            while time.perf_counter() < deadline:
                n += 1
                kind = ("samples", "samples", "samples", "budgets", "audit")[(i + n) % 5]
                t0 = time.perf_counter()
                try:
                    if kind == "samples":
                        body = {"n": 1000, "seed": i * 1_000_000 + n, "format": FORMATS[n % 3]}
                        r = await http.post(
                            "/v1/models/bank-v1/samples", json=body, headers=analyst_h
                        )
                        ok = r.status_code == 200 and len(r.content) > 1000
                    elif kind == "budgets":
                        r = await http.get("/v1/privacy/budgets", headers=compliance_h)
                        ok = r.status_code == 200
                    else:
                        r = await http.get("/v1/audit?limit=50", headers=compliance_h)
                        ok = r.status_code == 200 and len(r.json()["entries"]) > 0
                    if not ok:
                        errors.append(f"{kind}: HTTP {r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                latencies[kind].append(time.perf_counter() - t0)

        async def watch_memory() -> None:
            while time.perf_counter() < deadline:
                rss.append((time.perf_counter() - started, rss_mib(pid)))
                await asyncio.sleep(10)

        await asyncio.gather(watch_memory(), *(client(i) for i in range(clients)))

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return round(1000 * values[min(len(values) - 1, int(q * len(values)))], 1)

    window = min(120.0, seconds / 4)
    early = [m for t, m in rss if 30 <= t < 30 + window] or [rss[0][1]]
    late = [m for t, m in rss if t >= seconds - window] or [rss[-1][1]]
    return {
        "errors": len(errors),
        "first_errors": errors[:5],
        "requests": {k: len(v) for k, v in latencies.items()},
        "requests_per_s": round(sum(map(len, latencies.values())) / seconds, 1),
        "p50_ms": {k: pct(v, 0.5) for k, v in latencies.items() if v},
        "p99_ms": {k: pct(v, 0.99) for k, v in latencies.items() if v},
        "rss_mib_every_10s": [round(m, 1) for _, m in rss],
        "rss_early_mib": round(statistics.median(early), 1),
        "rss_late_mib": round(statistics.median(late), 1),
        "rss_growth_mib": round(statistics.median(late) - statistics.median(early), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fedsynth-soak-") as tmp:
        home = Path(tmp)
        analyst, _ = prepare(home)
        db = Database(database_url(home))
        _, compliance = KeyStore(db).create("compliance", label="soak")
        server, url = start_server(home, "--workers", str(args.workers))
        try:
            with httpx.Client(base_url=url, timeout=60) as warm:  # model load, first imports
                for fmt in FORMATS:
                    body = {"n": 100, "seed": 0, "format": fmt}
                    auth = {"Authorization": f"Bearer {analyst}"}
                    warm.post("/v1/models/bank-v1/samples", json=body, headers=auth)
            audited_before = sample_requests(db)
            result = asyncio.run(
                soak(url, analyst, compliance, args.clients, args.minutes * 60, server.pid)
            )
        finally:
            os.killpg(server.pid, signal.SIGINT)
            server.wait(timeout=60)
        audited = sample_requests(db) - audited_before
        chain = AuditLog(db).verify()
        row = {
            "bench": "soak",
            "minutes": args.minutes,
            "clients": args.clients,
            "workers": args.workers,
            **result,
            "sample_requests_audited": audited,
            "audit_matches_requests": audited == result["requests"]["samples"],
            "chain_ok": chain.ok,
            "chain_checked": chain.checked,
        }
        db.dispose()
    print(json.dumps(row), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
