"""Seeded simulation of whole Raft clusters under faults (see raft.testing.simulation).

A failure names its seed; replay it with `pytest tests/raft/test_simulation.py --seed N` or
`python -m raft.sim --seeds 1 --start-seed N`.
"""

from __future__ import annotations

import pytest

from raft.sim import config_for_seed, main, replay_command
from raft.testing.simulation import InvariantViolation, SimConfig, SimStats, Simulation

DEFAULT_SEEDS = 500  # the default run; `make test-slow` runs many more
CHUNK = 50


def _run(seed: int, nodes: int | None = None, groups: int = 2, ticks: int = 300) -> None:
    config = config_for_seed(seed, nodes, groups, ticks)
    try:
        Simulation(seed, config).run()
    except InvariantViolation as violation:
        pytest.fail(
            f"{violation}\nreplay: pytest tests/raft/test_simulation.py --seed {seed}"
            f"\n    or: {replay_command(seed, nodes, groups, ticks)}",
            pytrace=False,
        )


@pytest.mark.parametrize("first_seed", range(1, DEFAULT_SEEDS + 1, CHUNK))
def test_every_seed_keeps_raft_safe_and_live(first_seed: int, request: pytest.FixtureRequest):
    replay = request.config.getoption("--seed")
    if replay is not None:
        if first_seed != 1:
            pytest.skip("replaying one seed")
        _run(replay)
        return
    for seed in range(first_seed, first_seed + CHUNK):
        _run(seed)


@pytest.mark.parametrize("nodes", [1, 2, 3, 7])
def test_unusual_cluster_sizes_stay_safe_and_live(nodes: int):
    for seed in range(1, 21):
        _run(seed, nodes=nodes)


def test_the_same_seed_replays_exactly():
    first = Simulation(42, SimConfig(nodes=5)).run()
    second = Simulation(42, SimConfig(nodes=5)).run()
    assert first == second
    assert first.messages_delivered > 1000
    assert first.proposals_acknowledged > 20


def test_a_run_exercises_every_fault_and_feature():
    totals: dict[str, int] = {}
    acknowledged = reads = 0
    for seed in range(1, 41):
        stats = Simulation(seed, config_for_seed(seed, None, 2, 300)).run()
        for name, count in stats.faults.items():
            totals[name] = totals.get(name, 0) + count
        acknowledged += stats.proposals_acknowledged
        reads += stats.reads_served
    expected = {"crash", "restart", "partition", "isolate_leader", "one_way", "heal"}
    expected |= {"membership", "snapshot", "transfer"}
    assert expected <= set(totals), f"faults never applied: {expected - set(totals)}"
    assert acknowledged > 1000
    assert reads > 100


def test_the_command_line_reports_a_summary(capsys: pytest.CaptureFixture[str]):
    assert main(["--seeds", "3", "--start-seed", "5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK 3 seeds from 5")


def test_the_command_line_prints_the_failing_seed_and_replay(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    real_run = Simulation.run

    def broken_run(self: Simulation) -> SimStats:
        if self.seed == 7:
            raise InvariantViolation(f"seed {self.seed}: injected")
        return real_run(self)

    monkeypatch.setattr(Simulation, "run", broken_run)
    assert main(["--seeds", "5", "--start-seed", "5", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "FAILED seed 7" in captured.err
    assert "replay: python -m raft.sim --seeds 1 --start-seed 7" in captured.out


@pytest.mark.slow
@pytest.mark.parametrize("first_seed", range(1, 20_001, 1000))
def test_twenty_thousand_seeds(first_seed: int):
    for seed in range(first_seed, first_seed + 1000):
        _run(seed)
