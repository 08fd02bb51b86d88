"""`python -m jepsen_like run ...`: test a real cluster under faults; `python -m jepsen_like check
FILE`: check a recorded history (ours, or Jepsen's own) and print its verdict.

The last line printed is `VERDICT valid|invalid|unknown <checker> <summary>`; the exit status
is 0 valid, 1 invalid, 2 unknown, 3 the input could not be read.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from jepsen_like.checker import CHECKERS, check_history, verdict, verdict_line
from jepsen_like.history import History
from jepsen_like.jepsen_format import load_jepsen
from jepsen_like.linearizability import DEFAULT_MAX_STEPS_PER_KEY
from jepsen_like.model import MODELS

EXIT_CODES = {"valid": 0, "invalid": 1, "unknown": 2}
EXIT_BAD_INPUT = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jepsen_like",
        description="Jepsen-style testing of the store: record histories and check them.",
        epilog="exit status: 0 valid, 1 invalid, 2 unknown, 3 unreadable input",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "check",
        help="check a recorded history",
        description="Check a history and print `VERDICT valid|invalid|unknown ...` last.",
    )
    check.add_argument("file", type=Path, help="the history file")
    check.add_argument(
        "--format",
        choices=("ours", "jepsen"),
        default="ours",
        help="ours: our JSON lines (every checker that applies runs); jepsen: Jepsen's log "
        "lines or EDN operation maps of one register (default: ours)",
    )
    check.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="cas-register",
        help="the model for the linearizability checker (default: cas-register)",
    )
    check.add_argument(
        "--checker",
        action="append",
        choices=CHECKERS,
        help="run only this checker (repeatable; default: every one that applies)",
    )
    check.add_argument(
        "--max-steps-per-key",
        type=int,
        default=DEFAULT_MAX_STEPS_PER_KEY,
        help="linearizability search budget per key; beyond it the key is unknown "
        f"(default: {DEFAULT_MAX_STEPS_PER_KEY})",
    )
    check.add_argument(
        "--time-limit-s",
        type=float,
        default=None,
        help="stop the linearizability search after this long (keys left are unknown)",
    )
    check.set_defaults(handler=run_check)

    run = commands.add_parser(
        "run",
        help="start a real cluster, run a workload under faults, check it, write a report",
        description="Start NODES real node processes, run CONCURRENCY clients of WORKLOAD for "
        "TIME seconds while the nemesis injects faults on a timeline seeded by SEED, heal, read "
        "the final state, check the history and write history.jsonl, summary.json, PNG plots "
        "and index.html to OUT. Example: python -m jepsen_like run --workload register "
        "--nemesis kill,pause,partition --time 60 --nodes 5 --shards 4 --concurrency 10 "
        "--seed 1 --out runs/r1",
    )
    run.add_argument(
        "--workload", choices=("register", "set", "append", "bank"), default="register"
    )
    run.add_argument(
        "--nemesis",
        default="kill,partition",
        help="comma-separated: kill, pause, partition, or none (default: kill,partition)",
    )
    run.add_argument("--time", type=float, default=60, help="seconds of load and faults")
    run.add_argument("--nodes", type=int, default=5)
    run.add_argument("--shards", type=int, default=4)
    run.add_argument("--replication", type=int, default=3)
    run.add_argument("--concurrency", type=int, default=10, help="client processes")
    run.add_argument("--seed", type=int, default=1, help="seeds the fault timeline and clients")
    run.add_argument("--out", type=Path, default=None, help="run directory (default: runs/...)")
    run.add_argument(
        "--broken",
        choices=("stale-reads",),
        default=None,
        help="start the nodes in a deliberately unsafe test mode: the run must come out invalid",
    )
    run.set_defaults(handler=run_run)
    return parser


def run_run(args: argparse.Namespace) -> int:
    from jepsen_like.runner import RunConfig, main_run

    nemeses = frozenset(n for n in args.nemesis.split(",") if n and n != "none")
    unknown = nemeses - {"kill", "pause", "partition"}
    if unknown or args.time <= 0 or args.nodes < 1 or args.concurrency < 1:
        print(
            f"jepsen_like: bad arguments (unknown nemesis {sorted(unknown)}?); see --help",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    out = args.out or Path("runs") / f"{args.workload}-seed{args.seed}"
    return main_run(
        RunConfig(
            workload=args.workload,
            nemeses=nemeses,
            time_s=args.time,
            nodes=args.nodes,
            shards=args.shards,
            concurrency=args.concurrency,
            seed=args.seed,
            out=out,
            replication=args.replication,
            broken=args.broken,
        )
    )


def run_check(args: argparse.Namespace) -> int:
    try:
        if args.format == "jepsen":
            history = load_jepsen(args.file)
            checkers = args.checker or ["linearizable"]
        else:
            history = History.load(args.file)
            checkers = args.checker
        results = check_history(
            history,
            checkers,
            model=MODELS[args.model],
            max_steps_per_key=args.max_steps_per_key,
            time_limit_s=args.time_limit_s,
        )
    except (OSError, ValueError) as error:
        print(f"jepsen_like: cannot check {args.file}: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for result in results:
        print(f"{result.checker}: {result.verdict}: {result.summary}")
        witness = result.details.get("witness_text")
        if witness:
            print("  " + witness.replace("\n", "\n  "))
    print(verdict_line(results), flush=True)
    return EXIT_CODES[verdict(results)]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
