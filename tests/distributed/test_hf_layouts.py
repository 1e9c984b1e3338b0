"""Hugging Face weights under parallel layouts (torchrun, 2 ranks, gloo, fp32):
- model.init=hf under FSDP2 dp2 (ZeRO-3), tp2 and pp2 (1F1B, tied embeddings: the last
  stage's copy loads the embedding) gives the first step's loss that transformers computes
  on the same batch, as one process does;
- the dp2 run's committed checkpoint, exported by `memplan export`, loads in transformers
  with the logits of memplan's model restored from that checkpoint.

One torchrun runs every case in order, through tests/distributed/test_checkpoint_layouts.py's
worker.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

from framework.components.checkpoint import storage
from framework.components.data import TokenLoader, open_tokens
from framework.components.model import build_model
from framework.trainer import train
from launch.compose import compose_config, dump_resolved
from tests.cli import memplan
from tests.distributed import test_checkpoint_layouts as checkpoint_layouts
from tests.distributed.layouts import torchrun
from tests.hf_models import build_hf_model
from tests.plans import manual_plan

transformers = pytest.importorskip("transformers")

OVERRIDES = [
    "train.steps=2",
    "train.seq_len=32",
    "train.global_batch_size=4",
    "logging.every=1",
    "logging.wandb=false",
    "checkpoint.every=2",
]

# name -> (family, layout fields, micro-batch size)
LAYOUTS = {
    "dp2_zero3": ("llama_llama3", {"dp": 2, "zero_stage": 3, "zero_backend": "fsdp2"}, 2),
    "tp2": ("qwen2_bias_tied", {"tp": 2}, 4),
    "pp2_tied": ("qwen2_bias_tied", {"pp": 2, "pp_schedule": "1f1b"}, 2),
}


def _overrides(model_dir: Path) -> list[str]:
    return [*OVERRIDES, f"model.hf_config={model_dir}", "model.init=hf"]


def _first_batch_loss(hf_model, cfg) -> float:
    """transformers' mean cross-entropy on the batch memplan's step 1 trains on."""
    loader = TokenLoader(
        open_tokens(cfg.data),
        cfg.train.seq_len,
        cfg.train.global_batch_size,
        cfg.train.seed,
        cfg.model.vocab_size,
    )
    inputs, targets = loader.batch(0)
    with torch.no_grad():
        logits = hf_model(inputs).logits
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()


@pytest.mark.distributed
@pytest.mark.slow
def test_hf_weights_load_under_every_layout_and_export_round_trips(tmp_path):
    models, references, cases = {}, {}, []
    for family in {family for family, _, _ in LAYOUTS.values()}:
        models[family] = build_hf_model(family, tmp_path / family, max_shard_size="40KB")
        cfg = compose_config(_overrides(tmp_path / family))
        references[family] = _first_batch_loss(models[family], cfg)
        single = train(cfg, manual_plan(cfg), tmp_path / f"single_{family}")
        assert single.losses[1] == pytest.approx(references[family], rel=1e-5), family
    for name, (family, fields, micro) in LAYOUTS.items():
        cfg = compose_config([*_overrides(tmp_path / family), "cluster.gpus_per_node=2"])
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "resolved.yaml").write_text(dump_resolved(cfg))
        manual_plan(cfg, micro_batch_size=micro, **fields).write(run_dir / "plan.json")
        cases.append({"name": name, "run_dir": str(run_dir)})
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps(cases))
    run = torchrun(checkpoint_layouts.__file__, spec, out)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    for name, (family, _, _) in LAYOUTS.items():
        first = results[name]["losses"]["1"]
        assert first == pytest.approx(references[family], rel=1e-5), name

    # the dp2 run's step-2 checkpoint (FSDP2 shards) -> a Hugging Face directory
    step_dir = tmp_path / "dp2_zero3" / "checkpoints" / storage.step_dir_name(2)
    exported = tmp_path / "exported"
    done = memplan(
        "export", f"export.checkpoint={tmp_path / 'dp2_zero3' / 'checkpoints'}",
        f"export.out={exported}", "export.max_shard_gib=0.00005",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "exported step 2" in done.stdout
    assert (exported / "model.safetensors.index.json").is_file()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert hf_model.config.model_type == "llama"

    cfg = compose_config(_overrides(tmp_path / "llama_llama3"))
    ours = build_model(cfg.model, device="cpu")
    state = {"model": dict(ours.state_dict())}
    dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
    trained = ours.layers["0"].attention.wq.weight
    original = models["llama_llama3"].model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(trained, original)  # two optimizer steps changed it
    batch = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = hf_model(batch).logits
        logits = ours(batch) @ ours.output_weight().T
    assert ((logits - reference).abs().max() / reference.abs().max()).item() < 1e-5
