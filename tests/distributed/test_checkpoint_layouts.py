"""Checkpoints across layouts: exact resume with dp2 (FSDP2 shards) and pp2 (1F1B), and
resharding 1 -> 2 ranks, 2 -> 1 rank and dp2 -> pp2.

One torchrun (2 ranks) runs every 2-rank case in order (torchrun start-up dominates here);
this file is also that worker:

    python -m torch.distributed.run --nproc-per-node=2 THIS_FILE SPEC_JSON OUT_JSON

A resume case copies another case's checkpoints without those after `resume_step`, which is
exactly what a run stopped (or killed) after that step's commit leaves behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

STEPS = 8
OVERRIDES = [
    "train.steps=8",
    "train.seq_len=32",
    "train.global_batch_size=4",
    "train.warmup_steps=2",
    "logging.every=1",
    "logging.wandb=false",
    "checkpoint.every=2",
    "checkpoint.keep=4",
]


def prepare_resume(run_dir: Path, source: Path, resume_step: int) -> None:
    """run_dir/checkpoints = source's commits up to resume_step (rank 0 only)."""
    target = run_dir / "checkpoints"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source / "checkpoints", target)
    for path in target.glob("step_*"):
        if int(path.name.removeprefix("step_")) > resume_step:
            shutil.rmtree(path)


def worker(spec_path: str, out_path: str) -> None:
    import torch.distributed as dist

    from framework.components.distributed import shutdown_distributed
    from framework.components.logs import setup_logging
    from framework.trainer import train
    from launch.compose import load_resolved
    from planner.plan import Plan

    setup_logging()
    results = {}
    try:
        for case in json.loads(Path(spec_path).read_text()):
            run_dir = Path(case["run_dir"])
            if case.get("resume_from") and int(os.environ["RANK"]) == 0:
                prepare_resume(run_dir, Path(case["resume_from"]), case["resume_step"])
            if dist.is_initialized():
                dist.barrier()
            cfg = load_resolved(str(run_dir / "resolved.yaml"))
            result = train(cfg, Plan.read(run_dir / "plan.json"), run_dir)
            results[case["name"]] = {
                "start_step": result.start_step,
                "losses": {str(k): v for k, v in result.losses.items()},
            }
    finally:
        if int(os.environ["RANK"]) == 0:
            Path(out_path).write_text(json.dumps(results))
        shutdown_distributed()


if __name__ == "__main__":  # torchrun worker
    worker(sys.argv[1], sys.argv[2])
else:  # pytest
    import pytest

    from framework.components.checkpoint import storage
    from framework.trainer import train
    from launch.compose import compose_config, dump_resolved
    from tests.plans import manual_plan

    LAYOUTS = {
        "dp2": ({"dp": 2, "zero_stage": 3, "zero_backend": "fsdp2"}, 2),
        "pp2": ({"pp": 2, "pp_schedule": "1f1b"}, 1),
    }

    def _write_run_dir(run_dir: Path, layout: str) -> Path:
        fields, micro = LAYOUTS[layout]
        cfg = compose_config([*OVERRIDES, "cluster.gpus_per_node=2"])
        run_dir.mkdir(parents=True)
        (run_dir / "resolved.yaml").write_text(dump_resolved(cfg))
        manual_plan(cfg, micro_batch_size=micro, **fields).write(run_dir / "plan.json")
        return run_dir

    def _one_process(run_dir: Path, resume_from: Path | None = None):
        cfg = compose_config(OVERRIDES)
        if resume_from is not None:
            prepare_resume(run_dir, resume_from, 4)
        return train(cfg, manual_plan(cfg), run_dir)

    def _floats(result: dict) -> dict[int, float]:
        return {int(k): v for k, v in result["losses"].items()}

    @pytest.mark.distributed
    @pytest.mark.slow
    def test_resume_is_exact_per_layout_and_reshards_across_world_sizes(tmp_path):
        single = _one_process(tmp_path / "single")  # 8 steps, commits 2, 4, 6, 8
        cases = []
        for layout in LAYOUTS:
            straight = _write_run_dir(tmp_path / f"{layout}_straight", layout)
            cases.append({"name": f"{layout}_straight", "run_dir": str(straight)})
            cases.append(
                {
                    "name": f"{layout}_resumed",
                    "run_dir": str(_write_run_dir(tmp_path / f"{layout}_resumed", layout)),
                    "resume_from": str(straight),
                    "resume_step": 4,
                }
            )
        for name, layout, source in [
            ("1_to_dp2", "dp2", tmp_path / "single"),
            ("dp2_to_pp2", "pp2", tmp_path / "dp2_straight"),
        ]:
            cases.append(
                {
                    "name": name,
                    "run_dir": str(_write_run_dir(tmp_path / name, layout)),
                    "resume_from": str(source),
                    "resume_step": 4,
                }
            )
        spec, out = tmp_path / "spec.json", tmp_path / "out.json"
        spec.write_text(json.dumps(cases))
        repo = Path(__file__).resolve().parents[2]
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
             __file__, str(spec), str(out)],
            capture_output=True, text=True, timeout=420, check=False,
            env={**os.environ, "PYTHONPATH": str(repo)}, cwd=repo,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        results = json.loads(out.read_text())
        tail = range(5, STEPS + 1)

        for layout in LAYOUTS:  # same layout: bitwise
            straight = _floats(results[f"{layout}_straight"])
            resumed = results[f"{layout}_resumed"]
            assert resumed["start_step"] == 4, layout
            assert _floats(resumed) == {s: straight[s] for s in tail}, layout
            # the layout trains the same model as one process (to reduction-order noise)
            assert straight == pytest.approx(single.losses, rel=1e-4), layout

        expected = {s: single.losses[s] for s in tail}
        for name in ("1_to_dp2", "dp2_to_pp2"):  # another world size or layout
            assert results[name]["start_step"] == 4, name
            assert _floats(results[name]) == pytest.approx(expected, rel=1e-4), name
        back = _one_process(tmp_path / "dp2_to_1", resume_from=tmp_path / "dp2_straight")
        assert back.start_step == 4
        assert back.losses == pytest.approx(expected, rel=1e-4)
        resumed_from = tmp_path / "dp2_to_1" / "checkpoints" / "step_000000004"
        assert storage.read_commit(resumed_from)["world_size"] == 2
