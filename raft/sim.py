"""`python -m raft.sim`: run many seeded simulations; on a violation print the seed and how to
replay it, and exit non-zero."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from raft.testing.simulation import InvariantViolation, SimConfig, Simulation


def config_for_seed(seed: int, nodes: int | None, groups: int, ticks: int) -> SimConfig:
    """Without --nodes, the cluster size varies with the seed over 3..7."""
    return SimConfig(nodes=nodes or 3 + seed % 5, groups=groups, fault_ticks=ticks)


def replay_command(seed: int, nodes: int | None, groups: int, ticks: int) -> str:
    command = f"python -m raft.sim --seeds 1 --start-seed {seed} --groups {groups} --ticks {ticks}"
    return command + (f" --nodes {nodes}" if nodes else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raft.sim",
        description="Run seeded Raft simulations with message loss, duplication, reordering, "
        "partitions, crash-restarts, membership changes and snapshots, checking Election "
        "Safety, Log Matching, Leader Completeness, State Machine Safety, linearizable "
        "ReadIndex and liveness after healing.",
    )
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds to run")
    parser.add_argument("--start-seed", type=int, default=1, help="first seed")
    parser.add_argument("--nodes", type=int, default=None, help="cluster size (default: 3..7)")
    parser.add_argument("--groups", type=int, default=2, help="Raft groups sharing the nodes")
    parser.add_argument("--ticks", type=int, default=300, help="ticks of faults per seed")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")

    started = time.monotonic()
    totals: Counter[str] = Counter()
    for offset in range(args.seeds):
        seed = args.start_seed + offset
        config = config_for_seed(seed, args.nodes, args.groups, args.ticks)
        try:
            stats = Simulation(seed, config).run()
        except InvariantViolation as violation:
            print(f"\nFAILED seed {seed} ({config.nodes} nodes): {violation}", file=sys.stderr)
            print(f"replay: {replay_command(seed, args.nodes, args.groups, args.ticks)}")
            return 1
        totals["ticks"] += stats.ticks
        totals["elections"] += stats.elections
        totals["acknowledged"] += stats.proposals_acknowledged
        totals["reads"] += stats.reads_served
        totals["messages"] += stats.messages_delivered
        totals.update({f"fault:{name}": count for name, count in stats.faults.items()})
        if not args.quiet and sys.stderr.isatty() and offset % 10 == 0:
            print(f"\r{offset + 1}/{args.seeds} seeds", end="", file=sys.stderr, flush=True)
    elapsed = time.monotonic() - started
    faults = ", ".join(
        f"{name[6:]} {count}" for name, count in sorted(totals.items()) if name.startswith("fault:")
    )
    if not args.quiet and sys.stderr.isatty():
        print(file=sys.stderr)
    print(
        f"OK {args.seeds} seeds from {args.start_seed} in {elapsed:.1f}s: "
        f"{totals['ticks']} ticks, {totals['messages']} messages, {totals['elections']} "
        f"elections, {totals['acknowledged']} proposals acknowledged, {totals['reads']} "
        f"linearizable reads; faults: {faults}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
