"""Vote latency of the preference store with 50 concurrent annotators, SQLite and PostgreSQL side by side.

    python benchmarks/store_bench.py                        # SQLite; PostgreSQL too if RLHF_TEST_POSTGRES_URL is set
    RLHF_TEST_POSTGRES_URL=$(bash .ci/postgres.sh | tail -1) python benchmarks/store_bench.py --think 0

Each annotator is its own process (as app workers would be) with its own connection pool: it asks for its next
task and submits a vote, `--votes` times, pausing `--think` seconds between votes (0 = hammering, the worst
case; people take seconds per vote). Printed: p50/p95/max latency of `submit` and of `next_task`, votes/s, and
checks that the guarantees held (total votes, nobody twice on a task, no task over its overlap).
Target: p95 submit <= 50 ms on SQLite at 50 annotators.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import tempfile
import time
import uuid
from collections import Counter

from sqlalchemy import create_engine, text


def annotate(url: str, name: str, votes: int, think: float, seed: int, start_at: float, out) -> None:
    from rlhf.store import Store, TaskFull

    store = Store(url)
    rng = random.Random(seed)
    submit_ms, next_ms = [], []
    time.sleep(max(0.0, start_at - time.time()))  # everyone starts together
    done = 0
    while done < votes:
        t0 = time.perf_counter()
        task = store.next_task(name)
        next_ms.append(1000 * (time.perf_counter() - t0))
        if task is None:
            break
        t0 = time.perf_counter()
        try:
            store.submit(name, task.id, rng.choice("AB"), strength=rng.choice((1, 2, 3)), left=rng.choice("AB"))
            done += 1
        except TaskFull:
            pass
        submit_ms.append(1000 * (time.perf_counter() - t0))
        if think:
            time.sleep(rng.uniform(0.5 * think, 1.5 * think))
    out.put((name, done, submit_ms, next_ms))
    store.engine.dispose()


def bench(url: str, annotators: int, votes: int, think: float, overlap: int) -> dict:
    from rlhf.store import Store

    store = Store(url)
    names = [f"bench-{i:03d}" for i in range(annotators)]
    for name in names:
        store.add_annotator(name)
    n_tasks = annotators * votes // overlap + annotators * 2
    for pid in store.add_prompts([f"bench prompt {i}" for i in range(n_tasks)]):
        a, b = store.add_responses(pid, ["first answer", "second answer"], model="bench")
        store.add_task([a, b], overlap=overlap)
    queue = mp.get_context("spawn").Queue()
    start_at = time.time() + 3.0
    procs = [mp.get_context("spawn").Process(target=annotate, args=(url, n, votes, think, i, start_at, queue))
             for i, n in enumerate(names)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    wall = time.time() - start_at
    submit = sorted(x for r in results for x in r[2])
    nxt = sorted(x for r in results for x in r[3])
    stored = store.votes()
    pairs = Counter((v["task_id"], v["annotator"]) for v in stored)
    per_task = Counter(v["task_id"] for v in stored)

    def q(xs, f):
        return xs[min(len(xs) - 1, int(f * len(xs)))]

    return {"votes": len(stored), "expected": annotators * votes, "twice": max(pairs.values()) > 1,
            "over_overlap": max(per_task.values()) > overlap, "votes_per_s": len(stored) / wall,
            "submit_p50": statistics.median(submit), "submit_p95": q(submit, 0.95), "submit_max": submit[-1],
            "next_p50": statistics.median(nxt), "next_p95": q(nxt, 0.95)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--annotators", type=int, default=50)
    ap.add_argument("--votes", type=int, default=40)
    ap.add_argument("--think", type=float, default=0.5, help="mean seconds between one annotator's votes")
    ap.add_argument("--overlap", type=int, default=2)
    args = ap.parse_args()

    backends = {}
    tmp = tempfile.mkdtemp()
    backends["sqlite"] = f"sqlite:///{tmp}/bench.db"
    pg = os.environ.get("RLHF_TEST_POSTGRES_URL")
    pg_db = None
    if pg:
        pg_db = f"rlhf_bench_{uuid.uuid4().hex[:8]}"
        with create_engine(pg, isolation_level="AUTOCOMMIT").connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{pg_db}"'))
        backends["postgresql"] = pg.rsplit("/", 1)[0] + "/" + pg_db
    print(f"{args.annotators} annotator processes x {args.votes} votes, think {args.think} s, overlap {args.overlap}, "
          f"{os.cpu_count()} cores")
    print(f"{'backend':<12}{'votes':>8}{'votes/s':>9}{'submit p50':>12}{'p95':>8}{'max':>8}{'next p50':>10}"
          f"{'p95':>8}  checks")
    for name, url in backends.items():
        r = bench(url, args.annotators, args.votes, args.think, args.overlap)
        ok = r["votes"] == r["expected"] and not r["twice"] and not r["over_overlap"]
        print(f"{name:<12}{r['votes']:>8}{r['votes_per_s']:>9.1f}{r['submit_p50']:>10.1f}ms{r['submit_p95']:>6.1f}ms"
              f"{r['submit_max']:>6.0f}ms{r['next_p50']:>8.1f}ms{r['next_p95']:>6.1f}ms  "
              f"{'ok' if ok else 'FAILED'} (target p95 <= 50 ms on SQLite)")
    if pg_db:
        with create_engine(pg, isolation_level="AUTOCOMMIT").connect() as conn:
            conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{pg_db}'"))
            conn.execute(text(f'DROP DATABASE "{pg_db}"'))


if __name__ == "__main__":
    main()
