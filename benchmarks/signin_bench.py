"""The labeling app while clients flood its sign-in with wrong credentials: latency of a plain GET and of a
signed-in annotator's `/next_task`, without and with the flood.

    python benchmarks/signin_bench.py                     # 8 flooding clients, the app's throttle on
    python benchmarks/signin_bench.py --no-throttle       # every wrong credential runs scrypt (the worst case)

The app runs in its own process on loopback (a SQLite store in a temporary directory); each flooding client is a
process of its own sending wrong credentials for names of its own as fast as the answers come. The measuring
client, signed in before the flood, sends `--samples` GETs of the page and `--samples` `/next_task` calls as the
browser makes them (join the queue, read the event's stream to its end). Printed: p50/p95/max of both, per
phase. Targets under the flood: GET p95 < 50 ms, `/next_task` p95 < 200 ms.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


def serve(db: str, port: int, mode: str) -> None:
    from labeling_ui.app import LabelConfig, build_app
    from labeling_ui.guard import Throttle
    from rlhf.store import Store

    app = build_app(LabelConfig(db=db, port=port, repeat_share=0.0), Store(db))
    if mode == "no-throttle":
        app.name_throttle, app.client_throttle = Throttle(max_failures=10**9), Throttle(max_failures=10**9)
    app.launch(server_name="127.0.0.1", server_port=port, footer_links=[], quiet=True)


def flood(url: str, index: int) -> None:
    """Wrong credentials for 50 names of this client's own, one after another, until terminated."""
    import httpx

    with httpx.Client(base_url=url, timeout=60) as client:
        for sent in range(10**9):
            client.post("/login", data={"username": f"flood{index}-{sent % 50}", "password": "wrong"})


def p95(ms: list[float]) -> float:
    return sorted(ms)[int(0.95 * (len(ms) - 1))]


def percentiles(ms: list[float]) -> str:
    ms = sorted(ms)
    return (f"p50 {statistics.median(ms):6.1f} ms  p95 {p95(ms):6.1f} ms  "
            f"max {ms[-1]:6.1f} ms  (n={len(ms)})")


def next_task(client, fn_index: int, deadline_s: float = 30.0) -> None:
    """One /next_task call as the page makes its events: join the queue, read the stream to the result."""
    session = uuid.uuid4().hex
    client.post("/gradio_api/queue/join", json={"data": [], "fn_index": fn_index, "session_hash": session,
                                                "event_data": None, "trigger_id": None}).raise_for_status()
    seen, t0 = [], time.perf_counter()
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                seen.append(json.loads(line[5:]).get("msg"))
                if seen[-1] == "process_completed":
                    return
            if time.perf_counter() - t0 > deadline_s:
                break
    raise RuntimeError(f"no result within {deadline_s:.0f} s; the stream said {seen[-12:]}")


def measure(url: str, annotator, fn_index: int, samples: int) -> tuple[list[float], list[float]]:
    import httpx

    get_ms, next_ms = [], []
    with httpx.Client(base_url=url, timeout=60) as plain:
        for _ in range(samples):
            t0 = time.perf_counter()
            plain.get("/").raise_for_status()
            get_ms.append(1000 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            next_task(annotator, fn_index)
            next_ms.append(1000 * (time.perf_counter() - t0))
            time.sleep(0.02)
    return get_ms, next_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flooders", type=int, default=8)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--no-throttle", action="store_true", help="no lockout: every attempt runs scrypt")
    parser.add_argument("--serve", nargs=3, metavar=("DB", "PORT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve[0], int(args.serve[1]), args.serve[2])

    import httpx

    from rlhf.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="signin-bench-"))
    db = f"sqlite:///{tmp / 'store.db'}"
    store = Store(db)
    credential = store.add_annotator("ann")
    for i in range(50):
        [pid] = store.add_prompts([f"Review film {i}."])
        store.add_task(store.add_responses(pid, [f"good {i}", f"bad {i}"], model="m"), overlap=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    mode = "no-throttle" if args.no_throttle else "guarded"
    server = subprocess.Popen([sys.executable, __file__, "--serve", db, str(port), mode])
    annotator = httpx.Client(base_url=url, timeout=60)
    try:
        for _ in range(1200):
            try:
                annotator.post("/login", data={"username": "ann", "password": credential}).raise_for_status()
                break
            except httpx.HTTPError:  # not listening yet
                time.sleep(0.1)
        info = annotator.get("/config").json()
        fn_index = next(d["id"] for d in info["dependencies"] if d.get("api_name") == "next_task")
        measure(url, annotator, fn_index, 10)  # warm up
        quiet = measure(url, annotator, fn_index, args.samples)
        flooders = [mp.Process(target=flood, args=(url, i)) for i in range(args.flooders)]
        for p in flooders:
            p.start()
        time.sleep(3)  # the flood under way (and, with the throttle, past its lockout threshold)
        t0 = time.time()
        flooded = measure(url, annotator, fn_index, args.samples)
        seconds = time.time() - t0
        for p in flooders:
            p.terminate()
        for p in flooders:
            p.join()
    finally:
        annotator.close()
        server.terminate()
        server.wait()
    print(f"{mode}; {args.flooders} clients sending wrong credentials")
    for phase, (get_ms, next_ms) in (("no flood", quiet), ("flood", flooded)):
        print(f"{phase:>8}  GET /        {percentiles(get_ms)}")
        print(f"{phase:>8}  /next_task   {percentiles(next_ms)}")
    print(f"flood phase {seconds:.1f} s")
    get_p95, next_p95 = p95(flooded[0]), p95(flooded[1])
    print(f"targets under the flood: GET p95 {get_p95:.1f} < 50 ms {'met' if get_p95 < 50 else 'NOT MET'}; "
          f"/next_task p95 {next_p95:.1f} < 200 ms {'met' if next_p95 < 200 else 'NOT MET'}")


if __name__ == "__main__":
    main()
