"""The layout table through the user's entry point: `memplan train plan.path=PLAN.json
cluster=cpu cluster.gpus_per_node=N ...` (torchrun with N ranks), five steps on fixed data;
and a checkpoint written by 2 ranks resumed by 4 in another layout.

The metrics line prints the loss with four decimals, so a printed loss must lie within
rounding (5e-5) of the single-process loss plus the 1e-5 relative tolerance; the exact
comparison (and the final parameters) is test_parallel_layouts.py, on the same table.
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.distributed.layout_worker import reference
from tests.distributed.layouts import (
    CASES,
    RESUME_AT,
    STEPS,
    Case,
    _pp,
    memplan_train,
    printed_losses,
)

CLI_CASES = [case for case in CASES if case.cli]

pytestmark = pytest.mark.distributed

CONCURRENT_RUNS = 3  # start-up (imports, rendezvous) leaves the 2 cores idle in part


# A checkpoint of 2 ranks (FSDP ZeRO-3) resumed by 4 (dp2 x pp2, ZeRO-1): steps 1-3, then 4-5.
CHECKPOINTS = "checkpoint.dir=ROOT/resharded-checkpoints"  # ROOT: the test's directory
RESUME_FIRST = Case(
    "resume_first_dp2_zero3",
    2,
    {"dp": 2, "zero_stage": 3},
    (CHECKPOINTS, f"checkpoint.every={RESUME_AT}", f"checkpoint.exit_after={RESUME_AT}"),
)
RESUME_SECOND = Case(
    "resume_second_dp2_pp2_zero1",
    4,
    {"dp": 2, **_pp("1f1b", zero_stage=1)},
    (CHECKPOINTS,),
    micro_batch_size=2,
)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("cli")
    resume = [
        Case(c.name, c.world, c.layout, tuple(o.replace("ROOT", str(root)) for o in c.overrides),
             micro_batch_size=c.micro_batch_size)
        for c in (RESUME_FIRST, RESUME_SECOND)
    ]  # fmt: skip
    plans = {}
    for case in [*CLI_CASES, *resume]:  # composing is not thread-safe: plans, then the runs
        plans[case.name] = root / f"{case.name}.plan.json"
        case.plan().write(plans[case.name])

    def run(cases: list[Case]) -> list[tuple[str, subprocess.CompletedProcess]]:
        return [(c.name, memplan_train(c, plans[c.name], root)) for c in cases]

    with ThreadPoolExecutor(CONCURRENT_RUNS) as pool:
        # the resume pair first (it is sequential and the longest task)
        done = pool.map(run, [resume, *([c] for c in CLI_CASES)])
        return {name: result for runs in done for name, result in runs}


@pytest.fixture(scope="module")
def reference_losses() -> dict[tuple[str, ...], list[float]]:
    """Single-process losses by the case's config overrides (computed on first use)."""
    return {}


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.name for c in CLI_CASES])
def test_memplan_train_matches_one_process(case: Case, cli_runs, reference_losses) -> None:
    done = cli_runs[case.name]
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    printed = printed_losses(output)
    assert sorted(printed) == list(range(1, STEPS + 1)), output[-4000:]
    if case.overrides not in reference_losses:
        reference_losses[case.overrides] = reference(case.config())[0]
    for step, want in enumerate(reference_losses[case.overrides], start=1):
        assert abs(printed[step] - want) <= 5e-5 + 1e-5 * abs(want), (step, printed, want)


def test_checkpoint_of_two_ranks_resumes_on_four(cli_runs) -> None:
    first, second = cli_runs[RESUME_FIRST.name], cli_runs[RESUME_SECOND.name]
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    assert "written by 2 ranks, resharded to 4" in output, output[-4000:]
    printed = printed_losses(output)
    assert sorted(printed) == list(range(RESUME_AT + 1, STEPS + 1)), output[-4000:]
    wanted = reference(RESUME_SECOND.config())[0]
    for step in printed:
        want = wanted[step - 1]
        assert abs(printed[step] - want) <= 5e-5 + 1e-5 * abs(want), (step, printed, wanted)
