"""The labeling app while clients flood its sign-in with wrong credentials: latency of a plain GET and of a
signed-in annotator's `/next_task`, without and with the flood.

    python benchmarks/signin_bench.py                     # 8 flooding clients, the app's throttle on
    python benchmarks/signin_bench.py --no-throttle       # every wrong credential runs scrypt (the worst case)

The app runs in its own process on loopback (a SQLite store in a temporary directory); each flooding client is a
process of its own sending wrong credentials for names of its own as fast as the answers come. The measuring
client sends `--samples` GETs of the page and `--samples` `/next_task` calls (gradio_client, signed in before the
flood). Printed: p50/p95/max of both, per phase. Targets under the flood: GET p95 < 50 ms, `/next_task` p95 < 200 ms.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def serve(db: str, port: int, throttle: bool) -> None:
    from labeling_ui.app import LabelConfig, build_app
    from labeling_ui.guard import Throttle
    from rlhf.store import Store

    app = build_app(LabelConfig(db=db, port=port, repeat_share=0.0), Store(db))
    if not throttle:
        app.name_throttle, app.client_throttle = Throttle(max_failures=10**9), Throttle(max_failures=10**9)
    app.launch(server_name="127.0.0.1", server_port=port, footer_links=[], quiet=True)


def flood(url: str, index: int) -> None:
    """Wrong credentials for 50 names of this client's own, one after another, until terminated."""
    import httpx

    with httpx.Client(base_url=url, timeout=60) as client:
        for sent in range(10**9):
            client.post("/login", data={"username": f"flood{index}-{sent % 50}", "password": "wrong"})


def percentiles(ms: list[float]) -> str:
    ms = sorted(ms)
    return (f"p50 {statistics.median(ms):6.1f} ms  p95 {ms[int(0.95 * (len(ms) - 1))]:6.1f} ms  "
            f"max {ms[-1]:6.1f} ms  (n={len(ms)})")


def measure(url: str, client, samples: int) -> tuple[list[float], list[float]]:
    import httpx

    get_ms, next_ms = [], []
    with httpx.Client(base_url=url, timeout=60) as plain:
        for _ in range(samples):
            t0 = time.perf_counter()
            plain.get("/").raise_for_status()
            get_ms.append(1000 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            client.predict(api_name="/next_task")
            next_ms.append(1000 * (time.perf_counter() - t0))
            time.sleep(0.02)
    return get_ms, next_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flooders", type=int, default=8)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--no-throttle", action="store_true", help="no lockout: every attempt runs scrypt")
    parser.add_argument("--serve", nargs=3, metavar=("DB", "PORT", "THROTTLE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve[0], int(args.serve[1]), args.serve[2] == "1")

    from gradio_client import Client

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
    server = subprocess.Popen([sys.executable, __file__, "--serve", db, str(port), "0" if args.no_throttle else "1"])
    try:
        for _ in range(600):
            try:
                client = Client(url, auth=("ann", credential), verbose=False)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.1)
        measure(url, client, 10)  # warm up
        quiet = measure(url, client, args.samples)
        flooders = [mp.Process(target=flood, args=(url, i)) for i in range(args.flooders)]
        for p in flooders:
            p.start()
        time.sleep(3)  # the flood under way (and, with the throttle, past its lockout threshold)
        t0 = time.time()
        flooded = measure(url, client, args.samples)
        seconds = time.time() - t0
        for p in flooders:
            p.terminate()
        for p in flooders:
            p.join()
    finally:
        server.terminate()
        server.wait()
    print(f"throttle {'off' if args.no_throttle else 'on'}; {args.flooders} clients sending wrong credentials")
    for phase, (get_ms, next_ms) in (("no flood", quiet), ("flood", flooded)):
        print(f"{phase:>8}  GET /        {percentiles(get_ms)}")
        print(f"{phase:>8}  /next_task   {percentiles(next_ms)}")
    print(f"flood phase {seconds:.1f} s")


if __name__ == "__main__":
    main()
