"""Model states in host memory (layout.state_offload=all: FSDP2's CPUOffloadPolicy, the
optimizer step on the CPU) train the same model: dp2 ZeRO-2 and ZeRO-3 with offloaded states
give the losses of the same layouts without (fp32, relative difference <= 1e-6 over eight
steps), and a run resumed from an asynchronous checkpoint of offloaded state continues
bitwise; the host bytes the runtime allocates for the offloaded states are the plan's
(within 3%). One torchrun (2 ranks) runs the training cases through tests/distributed/
test_checkpoint_layouts.py's worker; this file is the worker of the host-bytes measurement:

    python -m torch.distributed.run --nproc-per-node=2 THIS_FILE OUT_JSON
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MEASURED = ["model=tiny", "cluster.gpus_per_node=2", "train.global_batch_size=4"]


def measure_host_states(out_path: str) -> None:
    """Bytes of this rank's parameter shards, gradient shards and optimizer state after a
    step and a backward (every one of them on the CPU), beside the plan's prediction."""
    import torch
    from torch.distributed.tensor import DTensor

    from framework.components.distributed import init_distributed, shutdown_distributed
    from framework.runtime.build import build_runtime
    from launch.compose import compose_config
    from planner.memory import predict_stage_memory
    from tests.plans import manual_plan

    cfg = compose_config(MEASURED)
    device = torch.device("cpu")
    context = init_distributed(device)
    plan = manual_plan(cfg, micro_batch_size=2, dp=2, zero_stage=3, state_offload="all")
    runtime = build_runtime(cfg.model, cfg.train, plan, device, torch.float32, context)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.train.seq_len + 1))
    runtime.train_step(tokens[:, :-1], tokens[:, 1:])  # optimizer state exists from here
    runtime.forward_backward(tokens[:, :-1], tokens[:, 1:])  # and the gradient shards

    def local(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    tensors = [local(p) for p in runtime.parameters()]
    tensors += [local(p.grad) for p in runtime.parameters() if p.grad is not None]
    for optimizer in runtime.optimizers:
        for state in optimizer.state.values():
            tensors += [local(v) for k, v in state.items() if k != "step"]  # step: a scalar
    assert all(t.device.type == "cpu" for t in tensors)
    measured = sum(t.numel() * t.element_size() for t in tensors)
    predicted = predict_stage_memory(plan, cfg)[0].host_states_bytes
    if torch.distributed.get_rank() == 0:
        Path(out_path).write_text(json.dumps({"measured": measured, "predicted": predicted}))
    runtime.close()
    shutdown_distributed()


if __name__ == "__main__":  # torchrun worker of the host-bytes measurement
    measure_host_states(sys.argv[1])
    sys.exit(0)

import pytest  # noqa: E402

from launch.compose import compose_config, dump_resolved  # noqa: E402
from tests.distributed import test_checkpoint_layouts as checkpoint_layouts  # noqa: E402
from tests.plans import manual_plan  # noqa: E402

pytestmark = pytest.mark.distributed

CASES = {
    "zero3": {"zero_stage": 3},
    "zero3_offloaded": {"zero_stage": 3, "state_offload": "all"},
    "zero2_offloaded": {"zero_stage": 2, "state_offload": "all"},
}


def _run_dir(path: Path, layout: dict) -> Path:
    cfg = compose_config([*checkpoint_layouts.OVERRIDES, "cluster.gpus_per_node=2"])
    path.mkdir(parents=True)
    (path / "resolved.yaml").write_text(dump_resolved(cfg))
    plan = manual_plan(cfg, micro_batch_size=2, dp=2, zero_backend="fsdp2", **layout)
    plan.write(path / "plan.json")
    return path


@pytest.mark.slow
def test_offloaded_states_train_the_same_model_and_resume_exactly(tmp_path):
    cases = [
        {"name": name, "run_dir": str(_run_dir(tmp_path / name, layout))}
        for name, layout in CASES.items()
    ]
    cases.append(
        {
            "name": "zero3_offloaded_resumed",
            "run_dir": str(_run_dir(tmp_path / "resumed", CASES["zero3_offloaded"])),
            "resume_from": str(tmp_path / "zero3_offloaded"),
            "resume_step": 4,
        }
    )
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps(cases))
    repo = Path(__file__).resolve().parents[2]
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         checkpoint_layouts.__file__, str(spec), str(out)],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "PYTHONPATH": str(repo)}, cwd=repo,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = {name: r["losses"] for name, r in json.loads(out.read_text()).items()}
    reference = results["zero3"]
    assert len(reference) == checkpoint_layouts.STEPS
    for name in ("zero3_offloaded", "zero2_offloaded"):
        assert results[name] == pytest.approx(reference, rel=1e-6, abs=0), name
    resumed = results["zero3_offloaded_resumed"]
    straight = results["zero3_offloaded"]
    assert resumed == {step: straight[step] for step in resumed}  # bitwise
    assert sorted(int(step) for step in resumed) == list(range(5, checkpoint_layouts.STEPS + 1))


def test_host_bytes_of_offloaded_states_are_the_plans(tmp_path):
    out = tmp_path / "host.json"
    repo = Path(__file__).resolve().parents[2]
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         __file__, str(out)],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "PYTHONPATH": str(repo)}, cwd=repo,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["predicted"] > 0
    assert result["measured"] == pytest.approx(result["predicted"], rel=0.03), result
