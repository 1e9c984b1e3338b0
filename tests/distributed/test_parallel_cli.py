"""The layout table through the user's entry point: `memplan train plan.path=PLAN.json
cluster=cpu cluster.gpus_per_node=N ...` (torchrun with N ranks), five steps on fixed data.

The metrics line prints the loss with four decimals, so a printed loss must lie within
rounding (5e-5) of the single-process loss plus the 1e-5 relative tolerance; the exact
comparison (and the final parameters) is test_parallel_layouts.py, on the same table.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.distributed.layout_worker import reference
from tests.distributed.layouts import CASES, REPO, STEPS, Case

CLI_CASES = [case for case in CASES if case.cli]

pytestmark = pytest.mark.distributed

CONCURRENT_RUNS = 3  # start-up (imports, rendezvous) leaves the 2 cores idle in part
_LOSS = re.compile(r"step (\d+) \| loss (\d+\.\d{4}) \|")


def memplan_train(case: Case, plan: Path, root: Path) -> subprocess.CompletedProcess:
    """`memplan train` of the case's plan, as a user runs it."""
    script = Path(sys.executable).parent / "memplan"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "launch.cli"]
    return subprocess.run(
        [
            *command,
            "train",
            f"plan.path={plan}",
            *case.overrides_for_cli(),
            f"launch.run_dir={root / case.name}",
        ],
        cwd=REPO,
        env={**os.environ, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("cli")
    plans = {}
    for case in CLI_CASES:  # composing (Hydra) is not thread-safe: plans first, then the runs
        plans[case.name] = root / f"{case.name}.plan.json"
        case.plan().write(plans[case.name])
    with ThreadPoolExecutor(CONCURRENT_RUNS) as pool:
        done = pool.map(lambda c: (c.name, memplan_train(c, plans[c.name], root)), CLI_CASES)
        return dict(done)


@pytest.fixture(scope="module")
def reference_losses() -> dict[tuple[str, ...], list[float]]:
    """Single-process losses by the case's config overrides (computed on first use)."""
    return {}


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.name for c in CLI_CASES])
def test_memplan_train_matches_one_process(case: Case, cli_runs, reference_losses) -> None:
    done = cli_runs[case.name]
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    printed = {int(step): float(loss) for step, loss in _LOSS.findall(output)}
    assert sorted(printed) == list(range(1, STEPS + 1)), output[-4000:]
    if case.overrides not in reference_losses:
        reference_losses[case.overrides] = reference(case.config())[0]
    for step, want in enumerate(reference_losses[case.overrides], start=1):
        assert abs(printed[step] - want) <= 5e-5 + 1e-5 * abs(want), (step, printed, want)
