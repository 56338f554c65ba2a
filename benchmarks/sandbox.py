"""Grading speed of the MBPP sandbox: the 500 reference solutions, isolated vs unisolated, side by side.

    python benchmarks/sandbox.py [--rounds 2] [--workers N] [--limit 500]

Each round grades the references once with OS isolation (``isolation="auto"``) and once without
(``isolation="none"``, the cost of a plain child process), alternating so that a noisy, shared
machine loads both alike; prints a table and writes results/sandbox.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

from common import write_result

from rlkv.tasks.mbpp import MBPP
from rlkv.tasks.sandbox import Job, Limits, run_many

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def grade(jobs: list[Job], isolation: str, workers: int | None) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    results = run_many(jobs, workers=workers, limits=Limits(timeout=60, isolation=isolation))
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {
        "isolation": isolation, "passed": sum(r.passed for r in results), "jobs": len(jobs),
        "wall_s": round(seconds, 2), "children_cpu_s": round(cpu, 2), "load": round(os.getloadavg()[0], 2),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None, help="default: run_many's (two per CPU)")
    parser.add_argument("--limit", type=int, default=500)
    args = parser.parse_args()
    task = MBPP()
    examples = task.load(DATA, limit=args.limit)
    jobs = [Job(e.answer, task.sandbox_tests(e), tested={e.meta["entry_point"]}) for e in examples]
    rows = [grade(jobs, isolation, args.workers) for _ in range(args.rounds) for isolation in ("auto", "none")]
    print(f"{'isolation':>9} {'passed':>7} {'wall s':>7} {'child cpu s':>11} {'load':>5}")
    for row in rows:
        print(
            f"{row['isolation']:>9} {row['passed']:>7} {row['wall_s']:>7} {row['children_cpu_s']:>11} {row['load']:>5}"
        )
    ratio = sum(r["wall_s"] for r in rows if r["isolation"] == "auto") / sum(
        r["wall_s"] for r in rows if r["isolation"] == "none"
    )
    print(f"isolated / unisolated wall time: {ratio:.2f}")
    write_result(
        "results/sandbox.json",
        {"cpus": os.cpu_count(), "workers": args.workers, "rows": rows, "ratio": ratio},
    )


if __name__ == "__main__":
    main()
