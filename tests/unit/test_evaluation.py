"""Validation loss: the windows of the file, each rank's padded share, the mean against a
direct torch computation, no effect on training, the offload engine under no_grad, and the
launcher's checks of data.val_path and train.eval_every."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs.errors import ConfigError
from configs.schema import LoggingConfig
from framework.components.data import stdlib_corpus
from framework.components.evaluation import (
    PAD_TARGET,
    ValidationSet,
    open_validation_tokens,
    real_rows,
    summed_loss,
)
from framework.components.model import build_model, materialize
from framework.components.tracking import WandbTracker
from framework.runtime import LocalRuntime, build_local_runtime
from framework.trainer import train
from launch.train_command import check_validation_tokens
from planner.plan import LayerPlan
from tests.plans import manual_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEQ = 16


def _with(cfg, val_path=None, **train_fields):
    fields = {"seq_len": SEQ, "global_batch_size": 4, "steps": 4, "warmup_steps": 1}
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, **{**fields, **train_fields}),
        data=dataclasses.replace(cfg.data, val_path=val_path),
        logging=dataclasses.replace(cfg.logging, every=1),
    )


def _val_file(tmp_path, count, seed=0, high=256):
    tokens = np.random.default_rng(seed).integers(0, high, size=count).astype(np.uint16)
    path = tmp_path / "val.bin"
    tokens.tofile(path)
    return path, tokens


def test_windows_are_consecutive_and_every_rank_runs_the_same_padded_batches():
    tokens = np.arange(5 * (SEQ + 1) + 3)  # five whole windows and a partial one, dropped
    val = ValidationSet(tokens, SEQ, vocab_size=10_000)
    assert val.num_windows == 5 and val.num_tokens == 5 * SEQ
    assert [val.rank_windows(r, 2) for r in range(2)] == [range(0, 3), range(3, 5)]
    assert [val.rank_windows(r, 4) for r in range(4)][-1] == range(5, 5)  # nothing left
    seen = []
    for rank in range(2):
        batches = list(val.batches(rank, 2, rows_per_call=2))
        assert len(batches) == 2  # ceil(3 / 2): the same on both ranks
        for inputs, targets in batches:
            assert inputs.shape == targets.shape == (2, SEQ) and inputs.dtype == torch.int64
            for row in range(real_rows(targets)):
                start = int(inputs[row, 0])
                assert start % (SEQ + 1) == 0
                assert inputs[row].tolist() == list(range(start, start + SEQ))
                assert targets[row].tolist() == list(range(start + 1, start + SEQ + 1))
                seen.append(start // (SEQ + 1))
            pad = slice(real_rows(targets), None)
            assert (targets[pad] == PAD_TARGET).all() and (inputs[pad] == 0).all()
    assert seen == [0, 1, 2, 3, 4]  # every window once, in order


def test_short_file_and_foreign_token_ids_are_config_errors():
    with pytest.raises(ConfigError, match=r"data.val_path"):
        ValidationSet(np.zeros(SEQ, dtype=np.uint16), SEQ, vocab_size=256)
    val = ValidationSet(np.full(SEQ + 1, 300, dtype=np.uint16), SEQ, vocab_size=256)
    with pytest.raises(ConfigError, match=r"data.val_path: token id 300"):
        list(val.batches(0, 1, 1))


def test_padding_before_a_real_row_is_refused():
    targets = torch.tensor([[PAD_TARGET] * 3, [1, 2, 3]])
    with pytest.raises(ValueError, match="padding rows"):
        real_rows(targets)


def test_summed_loss_of_a_padding_only_micro_batch_is_zero_and_finite():
    hidden = torch.randn(2, 3, 4)
    weight = torch.randn(5, 4)
    targets = torch.full((2, 3), PAD_TARGET)
    calls = []

    def loss(h, y):
        calls.append(h.shape[0])
        return F.cross_entropy(h.reshape(-1, 4) @ weight.t(), y.reshape(-1))

    assert summed_loss(loss, hidden, targets).tolist() == [0.0, 0.0]
    assert calls == [1]  # still called: FSDP / ZeRO-3 gather inside the loss


@pytest.mark.parametrize("micro_batch_size", [1, 3])
def test_eval_loss_is_the_torch_cross_entropy_over_every_window(
    tiny_config, tmp_path, micro_batch_size
):
    cfg = _with(tiny_config)
    _, tokens = _val_file(tmp_path, 7 * (SEQ + 1) + 5)
    model = materialize(build_model(cfg.model), "cpu", cfg.train.seed)
    runtime = LocalRuntime(model, cfg.train, micro_batch_size, torch.device("cpu"), torch.float32)
    sums = runtime.evaluate(ValidationSet(tokens, SEQ, cfg.model.vocab_size))

    windows = torch.from_numpy(tokens[: 7 * (SEQ + 1)].astype(np.int64)).view(7, SEQ + 1)
    with torch.no_grad():
        logits = model(windows[:, :-1]) @ model.output_weight().t()
        want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert sums.tokens == 7 * SEQ
    assert sums.loss == pytest.approx(float(want), rel=1e-6)
    assert all(p.grad is None for p in model.parameters())  # no gradients
    assert model.training  # the training flag comes back


def test_eval_under_offload_and_recompute_policies_is_the_plain_model(tiny_config, tmp_path):
    cfg = _with(tiny_config)
    _, tokens = _val_file(tmp_path, 4 * (SEQ + 1))
    val = ValidationSet(tokens, SEQ, cfg.model.vocab_size)
    plain = manual_plan(cfg, micro_batch_size=2)
    layers = tuple(
        LayerPlan(layer.index, layer.stage, 0.5, "none", 0.25, anchor_offload_fraction=1.0)
        if layer.index % 2
        else LayerPlan(layer.index, layer.stage, 0.0, "selective", 0.5)
        for layer in plain.layers
    )
    policied = dataclasses.replace(plain, layers=layers)
    losses, engines = [], []
    for plan in (plain, policied):
        runtime = build_local_runtime(
            cfg.model, cfg.train, plan, torch.device("cpu"), torch.float32
        )
        losses.append(runtime.evaluate(val).loss)
        engines.append(len(runtime.activation_runtime.engines))
        runtime.close()
    assert engines == [0, 4]  # every layer of the second runs through the engine
    assert losses[0] == losses[1]


def test_eval_changes_no_training_loss_and_prints_its_lines(tiny_config, tmp_path, caplog):
    # Python source, as the training corpus (the embedded one): the loss on it can fall
    val_path = tmp_path / "val.bin"
    stdlib_corpus(1 << 16)[-5 * (SEQ + 1) :].astype(np.uint16).tofile(val_path)
    without = _with(tiny_config)
    with_eval = _with(tiny_config, str(val_path), eval_every=2)
    caplog.set_level("INFO")
    base = train(without, manual_plan(without, micro_batch_size=2), tmp_path / "a")
    evaluated = train(with_eval, manual_plan(with_eval, micro_batch_size=2), tmp_path / "b")
    assert base.losses == evaluated.losses  # bitwise: eval touched no training state
    assert sorted(evaluated.eval_losses) == [0, 2, 4]
    assert evaluated.eval_losses[4] < evaluated.eval_losses[0]  # it learned something
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval ")]
    assert lines == [f"eval {s} | loss {evaluated.eval_losses[s]:.4f}" for s in (0, 2, 4)]
    assert not base.eval_losses


def test_worker_side_missing_val_path_names_eval_every(tiny_config):
    with pytest.raises(ConfigError, match=r"train.eval_every"):
        open_validation_tokens(tiny_config.data)


@pytest.mark.parametrize(
    ("count", "high", "eval_every", "given", "match"),
    [
        (None, 256, 1, False, "train.eval_every: 1 needs data.val_path"),
        (None, 256, 1, True, "data.val_path: no such token file"),
        (SEQ, 256, 1, True, "data.val_path: .* holds 16 tokens, less than one window"),
        (4 * SEQ, 300, 1, True, "data.val_path: .* holds token id 2\\d\\d >= model.vocab_size"),
        (SEQ + 1, 200, 0, True, None),  # one whole window: enough
    ],
)
def test_launcher_checks_val_path(tiny_config, tmp_path, count, high, eval_every, given, match):
    path = tmp_path / "missing.bin"
    if count is not None:
        path, _ = _val_file(tmp_path, count, high=high)
    cfg = _with(tiny_config, str(path) if given else None, eval_every=eval_every)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=200))
    if match is None:
        check_validation_tokens(cfg)
        return
    with pytest.raises(ConfigError, match=match):
        check_validation_tokens(cfg)


def test_negative_eval_every_is_refused(tiny_config):
    with pytest.raises(ConfigError, match=r"train.eval_every: must be >= 0"):
        dataclasses.replace(tiny_config.train, eval_every=-1)


def test_a_resumed_run_evaluates_at_its_resumed_step_first(tiny_config, tmp_path):
    val_path, _ = _val_file(tmp_path, 3 * (SEQ + 1))
    cfg = _with(tiny_config, str(val_path), eval_every=3)
    saving = dataclasses.replace(
        cfg.checkpoint, dir=str(tmp_path / "ckpt"), every=2, exit_after=2, resume="none"
    )
    first = train(dataclasses.replace(cfg, checkpoint=saving), manual_plan(cfg), tmp_path / "a")
    assert sorted(first.eval_losses) == [0]
    resuming = dataclasses.replace(saving, every=0, exit_after=0, resume="auto")
    second = train(dataclasses.replace(cfg, checkpoint=resuming), manual_plan(cfg), tmp_path / "b")
    assert second.start_step == 2
    assert sorted(second.eval_losses) == [2, 3]  # the resumed step, then every 3rd


def test_wandb_gets_eval_loss_at_its_step(tmp_path):
    logged = []

    class Run:
        def log(self, values, step):
            logged.append((values, step))

    tracker = WandbTracker(LoggingConfig(wandb=False), tmp_path, "run", {})
    tracker.run = Run()
    tracker.log_eval(4, 2.5)
    assert logged == [({"eval/loss": 2.5}, 4)]
