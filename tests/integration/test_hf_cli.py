"""Hugging Face weights through the CLI as a user runs it: `memplan train` from a model
directory (model.init=hf) prints transformers' loss at step 1, `memplan export` turns its
checkpoint into a directory transformers loads with the same logits as memplan's restored
model (one process here; the dp2 round trip is tests/distributed/test_hf_layouts.py), and bad
input is exit 2 with one line naming the key and the file."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from configs.hf import read_hf_config
from framework.components.data import TokenLoader, open_tokens
from launch.compose import compose_config
from tests.cli import memplan
from tests.hf_models import build_hf_model

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")

TRAIN = [
    "train.steps=2", "train.seq_len=32", "train.global_batch_size=4", "logging.every=1",
    "logging.wandb=false", "checkpoint.every=2",
]  # fmt: skip


def one_line_error(done, key: str, *words: str) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def step_one_loss(done) -> float:
    """The loss of the `step 1 | loss X` line a run printed."""
    match = re.search(r"step\s+1 \| loss (\d+\.\d+)", done.stdout + done.stderr)
    assert match is not None, (done.stdout + done.stderr)[-2000:]
    return float(match.group(1))


def test_train_from_hf_weights_then_export_for_transformers(tmp_path):
    model_dir = tmp_path / "qwen2"
    hf_model = build_hf_model("qwen2_bias_tied", model_dir, max_shard_size="40KB")
    (model_dir / "tokenizer.json").write_text("{}")  # copied beside the export as it is
    overrides = [*TRAIN, f"model.hf_config={model_dir}", "model.init=hf"]
    run_dir = tmp_path / "run"
    done = memplan("train", *overrides, f"launch.run_dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = compose_config(overrides)
    inputs, targets = TokenLoader(
        open_tokens(cfg.data), 32, 4, cfg.train.seed, cfg.model.vocab_size
    ).batch(0)
    with torch.no_grad():
        expected = F.cross_entropy(hf_model(inputs).logits.flatten(0, 1), targets.flatten())
    assert step_one_loss(done) == pytest.approx(expected.item(), abs=1e-4)  # printed digits

    out = tmp_path / "exported"
    exported = memplan(
        "export", f"export.checkpoint={run_dir / 'checkpoints'}", f"export.out={out}", cwd=tmp_path
    )
    assert exported.returncode == 0, exported.stderr
    assert "as a Hugging Face qwen2 model" in exported.stdout
    # generation_config.json: save_pretrained wrote it beside the model (bos/eos ids)
    files = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in out.iterdir()) == files
    # memplan's own reader gives back the model it trained
    assert {k: v for k, v in read_hf_config(str(out)).items() if k != "name"} == {
        k: v for k, v in read_hf_config(str(model_dir)).items() if k != "name"
    }
    trained = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert trained.config.tie_word_embeddings
    changed = trained.model.layers[0].self_attn.q_proj.bias
    assert not torch.equal(changed, hf_model.model.layers[0].self_attn.q_proj.bias)
    # memplan loads its own export: step 1 of a new run is transformers' loss of the export
    again = memplan(
        "train", *TRAIN, "train.steps=1", f"model.hf_config={out}", "model.init=hf",
        f"launch.run_dir={tmp_path / 'again'}", cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    with torch.no_grad():
        continued = F.cross_entropy(trained(inputs).logits.flatten(0, 1), targets.flatten())
    assert abs(continued.item() - expected.item()) > 1e-3  # the two steps are visible
    assert step_one_loss(again) == pytest.approx(continued.item(), abs=1e-4)


def test_bad_hf_directories_exit_2_with_one_line(tmp_path):
    model_dir = tmp_path / "mistral"
    build_hf_model("mistral", model_dir, max_shard_size="40KB")
    victim = sorted(model_dir.glob("model-*.safetensors"))[0]
    victim.rename(tmp_path / victim.name)
    plan = memplan("plan", f"model.hf_config={model_dir}", "model.init=hf")
    one_line_error(plan, "model.hf_config", victim.name, "missing")
    (tmp_path / victim.name).rename(victim)
    mismatch = memplan("plan", f"model.hf_config={model_dir}", "model.init=hf", "model.ffn_size=8")
    one_line_error(mismatch, "model.hf_config", "model-0000", "mlp.gate_proj.weight", "shape")
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(gpt2)
    one_line_error(memplan("plan", f"model.hf_config={gpt2}"), "model.hf_config", "gpt2")


def test_bad_export_inputs_exit_2_with_one_line(tmp_path):
    missing = memplan("export", f"export.checkpoint={tmp_path / 'nope'}", "export.out=o")
    one_line_error(missing, "export.checkpoint", "no such checkpoint directory")
    (tmp_path / "empty").mkdir()
    none = memplan("export", f"export.checkpoint={tmp_path / 'empty'}", f"export.out={tmp_path}/o")
    one_line_error(none, "export.checkpoint", "holds no committed checkpoint")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    occupied = memplan(
        "export", f"export.checkpoint={tmp_path / 'empty'}", f"export.out={tmp_path / 'full'}"
    )
    one_line_error(occupied, "export.out", "is not empty")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    wrong = memplan(
        "export", "export.format=deepspeed", f"export.checkpoint={tmp_path}", "export.out=x.json"
    )
    one_line_error(wrong, "export.checkpoint", "export.format=hf only")
