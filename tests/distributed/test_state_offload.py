"""Model states in host memory train the same model: dp2 FSDP2 ZeRO-2 and ZeRO-3 with
layout.state_offload=all (CPUOffloadPolicy, the optimizer step on the CPU) give the losses of
the same layouts without, and so do DeepSpeed ZeRO-2/3 with state_offload=optimizer
(offload_optimizer) against DeepSpeed ZeRO-2 (fp32, relative difference <= 1e-6 over eight
steps); runs resumed from an asynchronous checkpoint of offloaded state continue bitwise;
the host bytes the runtime allocates for the offloaded states are the plan's (within 3%).
One torchrun (2 ranks) runs the training cases through tests/distributed/
test_checkpoint_layouts.py's worker; this file is the worker of the host-bytes measurement:

    python -m torch.distributed.run --nproc-per-node=2 THIS_FILE OUT_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MEASURED = ["model=tiny", "cluster.gpus_per_node=2", "train.global_batch_size=4"]


MEASURED_LAYOUTS = {
    "fsdp2_zero3_all": {"zero_stage": 3, "state_offload": "all"},
    "deepspeed_zero2_optimizer": {
        "zero_stage": 2, "zero_backend": "deepspeed", "state_offload": "optimizer",
    },
    "deepspeed_zero3_optimizer": {
        "zero_stage": 3, "zero_backend": "deepspeed", "state_offload": "optimizer",
    },
}  # fmt: skip


def _host_tensors(runtime) -> list:
    """Every host tensor holding offloaded model states of this rank after a step and a
    backward: FSDP2's parameter and gradient shards and optimizer state; DeepSpeed's fp32
    partitions, their gradients, its optimizer state and its host gradient buffers."""
    import torch
    from torch.distributed.tensor import DTensor

    def local(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    if hasattr(runtime, "engine"):  # DeepSpeed's optimizer keeps the host copies
        zero = runtime.optimizer
        masters = [
            *getattr(zero, "single_partition_of_fp32_groups", []),
            *getattr(zero, "fp32_partitioned_groups_flat", []),
        ]
        tensors = [*masters, *(m.grad for m in masters if m.grad is not None)]
        tensors += list(getattr(zero, "param_buffer_of_bit16_for_cpu_offload_groups", []))
        for name in ("temp_grad_buffer_for_cpu_offload", "grad_partitions_flat_buffer"):
            buffer = getattr(zero, name, None)
            if isinstance(buffer, torch.Tensor):
                tensors.append(buffer)
        optimizers = [zero.optimizer]
    else:
        params = runtime.parameters()
        tensors = [local(p) for p in params] + [local(p.grad) for p in params if p.grad is not None]
        optimizers = runtime.optimizers
    for optimizer in optimizers:
        for state in optimizer.state.values():
            tensors += [local(v) for k, v in state.items() if k != "step"]  # step: a scalar
    return tensors


def measure_host_states(out_path: str) -> None:
    """Host bytes of the offloaded model states per layout, beside the plan's prediction."""
    import torch

    from framework.components.distributed import init_distributed, shutdown_distributed
    from framework.runtime.build import build_runtime
    from launch.compose import compose_config
    from planner.memory import predict_stage_memory
    from tests.plans import manual_plan

    cfg = compose_config(MEASURED)
    device = torch.device("cpu")
    context = init_distributed(device)
    results = {}
    for name, layout in MEASURED_LAYOUTS.items():
        plan = manual_plan(cfg, micro_batch_size=2, dp=2, **layout)
        runtime = build_runtime(cfg.model, cfg.train, plan, device, torch.float32, context)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.train.seq_len + 1))
        runtime.train_step(tokens[:, :-1], tokens[:, 1:])  # optimizer state exists from here
        runtime.forward_backward(tokens[:, :-1], tokens[:, 1:])  # and the gradients
        tensors = _host_tensors(runtime)
        assert tensors and all(t.device.type == "cpu" for t in tensors), name
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        predicted = predict_stage_memory(plan, cfg)[0].host_states_bytes
        results[name] = {"measured": sum(storages.values()), "predicted": predicted}
        runtime.close()
    if torch.distributed.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))
    shutdown_distributed()


if __name__ == "__main__":  # torchrun worker of the host-bytes measurement
    measure_host_states(sys.argv[1])
    sys.exit(0)

import pytest  # noqa: E402

from launch.compose import compose_config, dump_resolved  # noqa: E402
from tests.distributed import test_checkpoint_layouts as checkpoint_layouts  # noqa: E402
from tests.distributed.layouts import torchrun  # noqa: E402
from tests.plans import manual_plan  # noqa: E402

pytestmark = pytest.mark.distributed

TIED = {"model.tie_embeddings": "true"}
PIPELINED = {"pp": 2, "pp_schedule": "1f1b", "zero_stage": 3}
CASES = {
    "zero3": {"zero_stage": 3},
    "zero3_offloaded": {"zero_stage": 3, "state_offload": "all"},
    "zero2_offloaded": {"zero_stage": 2, "state_offload": "all"},
    "deepspeed_zero2": {"zero_stage": 2, "zero_backend": "deepspeed"},
    "deepspeed_zero2_offloaded": {
        "zero_stage": 2, "zero_backend": "deepspeed", "state_offload": "optimizer",
    },
    "deepspeed_zero3_offloaded": {
        "zero_stage": 3, "zero_backend": "deepspeed", "state_offload": "optimizer",
    },
    # the tied embedding's gradient is summed over the two pipeline ends from host shards
    "pp2_tied": {**PIPELINED, **TIED},
    "pp2_tied_offloaded": {**PIPELINED, **TIED, "state_offload": "all"},
}  # fmt: skip
RESUMED = ("zero3_offloaded", "deepspeed_zero3_offloaded")


def _run_dir(path: Path, layout: dict) -> Path:
    layout = dict(layout)
    extra = [f"{k}={layout.pop(k)}" for k in list(layout) if k.startswith("model.")]
    cfg = compose_config([*checkpoint_layouts.OVERRIDES, "cluster.gpus_per_node=2", *extra])
    path.mkdir(parents=True)
    (path / "resolved.yaml").write_text(dump_resolved(cfg))
    dp = 1 if layout.get("pp", 1) > 1 else 2
    plan = manual_plan(cfg, micro_batch_size=2, dp=dp, **layout)
    plan.write(path / "plan.json")
    return path


@pytest.mark.slow
def test_offloaded_states_train_the_same_model_and_resume_exactly(tmp_path):
    cases = [
        {"name": name, "run_dir": str(_run_dir(tmp_path / name, layout))}
        for name, layout in CASES.items()
    ]
    for name in RESUMED:
        cases.append(
            {
                "name": f"{name}_resumed",
                "run_dir": str(_run_dir(tmp_path / f"{name}_resumed", CASES[name])),
                "resume_from": str(tmp_path / name),
                "resume_step": 4,
            }
        )
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps(cases))
    run = torchrun(checkpoint_layouts.__file__, spec, out)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = {name: r["losses"] for name, r in json.loads(out.read_text()).items()}
    for reference, offloaded in (
        ("zero3", ("zero3_offloaded", "zero2_offloaded")),
        ("deepspeed_zero2", ("deepspeed_zero2_offloaded", "deepspeed_zero3_offloaded")),
        ("pp2_tied", ("pp2_tied_offloaded",)),
    ):
        assert len(results[reference]) == checkpoint_layouts.STEPS
        for name in offloaded:
            assert results[name] == pytest.approx(results[reference], rel=1e-6, abs=0), name
    for name in RESUMED:
        resumed, straight = results[f"{name}_resumed"], results[name]
        assert resumed == {step: straight[step] for step in resumed}, name  # bitwise
        steps = sorted(int(step) for step in resumed)
        assert steps == list(range(5, checkpoint_layouts.STEPS + 1)), name


def test_host_bytes_of_offloaded_states_are_the_plans(tmp_path):
    out = tmp_path / "host.json"
    run = torchrun(__file__, out)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == set(MEASURED_LAYOUTS)
    for name, result in results.items():
        assert result["predicted"] > 0, name
        assert result["measured"] == pytest.approx(result["predicted"], rel=0.03), (name, result)
