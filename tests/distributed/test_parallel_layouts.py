"""Every layout of the table, and every kind of layout the planner can emit, trains exactly
like one process: same losses and gradient norms (relative difference <= 1e-5, fp32) and
the same final parameters, read through the runtime's checkpointable (FQN-keyed) state.
Checkpoints written by one layout resume in another (framework.trainer.train with
checkpoint.exit_after, then resume=auto) and continue with the single-process losses.

One torchrun per world size trains all its cases (tests/distributed/layout_worker.py drives
the trainer's build_runtime -> build_parallel_runtime with the trainer's data loader).
"""

from __future__ import annotations

import pytest

from tests.distributed.layouts import (
    CASES,
    RESUME_AT,
    RESUME_CASES,
    STEPS,
    Case,
    ResumeCase,
    planner_kind_cases,
    run_worker,
)

pytestmark = pytest.mark.distributed

LOSS_RTOL = 1e-5
# Parameters after a few AdamW steps differ by reduction order only (~2e-6 measured here);
# the largest single-process update of an entry is ~4e-3, so a wrong layout shows.
PARAM_ATOL = 2e-5
MIN_UPDATE = 1e-3


@pytest.fixture(scope="module")
def planner_cases() -> list[Case]:
    return planner_kind_cases()


@pytest.fixture(scope="module")
def results(tmp_path_factory, planner_cases) -> tuple[dict, dict[int, str]]:
    """Results of every table and planner case, and each world size's torchrun output."""
    merged, logs = {}, {}
    # one-rank cases run through `memplan train` only (test_parallel_cli.py)
    cases = [c for c in [*CASES, *planner_cases, *RESUME_CASES] if c.world > 1]
    for world in sorted({case.world for case in cases}):
        root = tmp_path_factory.mktemp(f"world{world}")
        found, logs[world] = run_worker([c for c in cases if c.world == world], world, root)
        merged.update(found)
    return merged, logs


def problems(case: Case, result: dict | None, log: str) -> list[str]:
    """What differs from one process (empty when the case matches)."""
    if result is None:
        return [f"{case.name} did not finish; torchrun output:\n{log}"]
    found = []
    for name in ("losses", "grad_norms"):
        for step, (got, want) in enumerate(
            zip(result[name], result[f"ref_{name}"], strict=True), start=1
        ):
            if abs(got - want) > LOSS_RTOL * abs(want):
                found.append(f"{name} step {step}: {got!r} vs one process {want!r}")
    if result["max_param_diff"] > PARAM_ATOL:
        found.append(f"final parameters differ by up to {result['max_param_diff']:.3g}")
    if result["ref_max_update"] < MIN_UPDATE:
        found.append(f"parameters barely moved ({result['ref_max_update']:.3g}): test too weak")
    plan = case.plan()
    replicas = plan.layout.dp * plan.layout.sp * plan.layout.tp
    engines = sum(not layer.keeps_everything for layer in plan.layers) * replicas
    if result["activation_engines"] != engines:
        found.append(f"{result['activation_engines']} layers run the offload engine, not {engines}")
    if result["missing_keys"] or result["unknown_keys"]:
        found.append(
            f"state keys: missing {result['missing_keys']}, {result['unknown_keys']} unknown"
        )
    return found


MULTI_RANK = [c for c in CASES if c.world > 1 and c.policy != "planner"]


@pytest.mark.parametrize("case", MULTI_RANK, ids=[c.name for c in MULTI_RANK])
def test_layout_matches_one_process(case: Case, results) -> None:
    found, logs = results
    assert not problems(case, found.get(case.name), logs[case.world])


PLANNED = [c for c in CASES if c.policy == "planner"]


@pytest.mark.parametrize("case", PLANNED, ids=[c.name for c in PLANNED])
def test_planner_chosen_policies_match_one_process(case: Case, results) -> None:
    layers = case.plan().layers
    offloads = any(layer.offload_fraction or layer.anchor_offload_fraction for layer in layers)
    recomputes = any(layer.recompute != "none" or layer.recompute_fraction for layer in layers)
    # the budgets make the planner choose a policy; the pipelined ones mix both
    assert offloads and (recomputes or "planner.pp=2" not in case.overrides), layers
    found, logs = results
    assert not problems(case, found.get(case.name), logs[case.world])


def test_every_planner_layout_kind_matches_one_process(planner_cases, results) -> None:
    found, logs = results
    failures = {
        case.name: problems(case, found.get(case.name), logs[case.world]) for case in planner_cases
    }
    assert not {name: p for name, p in failures.items() if p}


@pytest.mark.parametrize("case", RESUME_CASES, ids=[c.name for c in RESUME_CASES])
def test_checkpoint_resumes_in_another_layout(case: ResumeCase, results) -> None:
    found, logs = results
    result = found.get(case.name)
    assert result is not None, logs[case.world]
    assert result["start_step"] == RESUME_AT
    assert result["steps"] == list(range(RESUME_AT + 1, STEPS + 1))
    for got, want in zip(result["losses"], result["ref_losses"], strict=True):
        assert abs(got - want) <= LOSS_RTOL * abs(want), (result["losses"], result["ref_losses"])
