"""The jepsen_like campaign behind docs/testing.md: every workload under every nemesis, one run
after another, then one markdown table of ops, faults and verdicts.

    python tests/jepsen_like/campaign.py --time 300 --out runs/campaign
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from jepsen_like.runner import RunConfig, run_test

# (workload, nemeses, nodes, seed)
CAMPAIGN = [
    ("register", "kill,pause,partition", 5, 1),
    ("register", "partition", 5, 2),
    ("register", "kill", 3, 3),
    ("set", "kill,pause,partition", 5, 4),
    ("set", "partition", 3, 5),
    ("append", "kill,pause,partition", 5, 6),
    ("append", "pause", 3, 7),
    ("register", "pause", 5, 8),
    ("set", "kill", 5, 9),
    ("append", "partition", 5, 10),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--time", type=float, default=300, help="seconds per run")
    parser.add_argument("--out", type=Path, default=Path("runs/campaign"))
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args()
    rows = []
    for number, (workload, nemeses, nodes, seed) in enumerate(CAMPAIGN, start=1):
        started = time.monotonic()
        result = asyncio.run(
            run_test(
                RunConfig(
                    workload=workload,
                    nemeses=frozenset(nemeses.split(",")),
                    time_s=args.time,
                    nodes=nodes,
                    shards=4,
                    concurrency=args.concurrency,
                    seed=seed,
                    out=args.out / f"{number:02d}-{workload}-{seed}",
                )
            )
        )
        ops = result.summary["ops"]
        faults = result.summary["faults"]
        kinds = ", ".join(sorted({f["kind"] for f in faults}))
        row = (
            f"| {number} | {workload} | {nemeses} | {nodes} | {seed} | {ops.get('ok', 0)} | "
            f"{ops.get('fail', 0)} | {ops.get('info', 0)} | {len(faults)} ({kinds}) | "
            f"**{result.verdict}** | {time.monotonic() - started:.0f}s |"
        )
        rows.append(row)
        print(row, flush=True)
    columns = ["#", "workload", "nemesis", "nodes", "seed", "ok", "fail", "info", "faults"]
    print("\n| " + " | ".join([*columns, "verdict", "wall"]) + " |")
    print("| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- | --- | ---: |")
    print("\n".join(rows))
    return 0 if all("**valid**" in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
