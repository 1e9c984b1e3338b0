"""The single-process train loop: learning, determinism, accumulation, the metrics line."""

import dataclasses
import re
import time

import pytest

from framework.trainer import train
from tests.plans import manual_plan

METRICS_LINE = re.compile(
    r"^step (\d+) \| loss (\d+\.\d{4}) \| grad_norm \d+\.\d{4} \| mem \d+\.\d{2} GiB "
    r"\(\d+\.\d%\) \| tok/s [\d,]+ \| TFLOP/s \d+\.\d{2} \| MFU \d+\.\d%$"
)


def _short(cfg, **train_fields):
    fields = {"steps": 12, "seq_len": 64, "global_batch_size": 8, "warmup_steps": 2, **train_fields}
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, **fields),
        logging=dataclasses.replace(cfg.logging, every=4),
    )


def test_loss_decreases_and_lines_parse(tiny_config, tmp_path, caplog):
    cfg = _short(tiny_config, steps=40)
    caplog.set_level("INFO")
    result = train(cfg, manual_plan(cfg), tmp_path)
    assert set(result.losses) == {1, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40}
    assert result.losses[40] < 0.8 * result.losses[1]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == len(result.losses)
    assert all(METRICS_LINE.match(line) for line in lines), lines[0]


def test_same_seed_gives_bitwise_identical_losses(tiny_config, tmp_path):
    cfg = _short(tiny_config)
    first = train(cfg, manual_plan(cfg), tmp_path / "a").losses
    second = train(cfg, manual_plan(cfg), tmp_path / "b").losses
    assert first == second


def test_gradient_accumulation_matches_one_big_micro_batch(tiny_config, tmp_path):
    cfg = _short(tiny_config)
    whole = train(cfg, manual_plan(cfg, micro_batch_size=8), tmp_path / "a").losses
    accumulated = train(cfg, manual_plan(cfg, micro_batch_size=2), tmp_path / "b").losses
    assert whole.keys() == accumulated.keys()
    for step, loss in whole.items():
        assert accumulated[step] == pytest.approx(loss, rel=1e-5), step


def test_wandb_offline_writes_a_local_run(tiny_config, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = _short(tiny_config, steps=2)
    cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, wandb=True))
    train(cfg, manual_plan(cfg), tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "the offline run holds its history file"


def test_first_step_throughput_does_not_count_tracker_start_up(
    tiny_config, tmp_path, caplog, monkeypatch
):
    import framework.components.metrics as metrics
    import framework.trainer as trainer
    from framework.components.tracking import WandbTracker

    # The metrics clock jumps by an hour while the tracker starts (what wandb.init costs,
    # exaggerated): counted, the first step would take over an hour, however busy the machine.
    start_up_seconds = 3600.0
    offset = [0.0]
    real_clock = time.perf_counter
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: real_clock() + offset[0])

    class SlowStartTracker(WandbTracker):
        def __init__(self, *args, **kwargs):
            offset[0] += start_up_seconds
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(trainer, "WandbTracker", SlowStartTracker)
    cfg = _short(tiny_config, steps=1)
    caplog.set_level("INFO")
    train(cfg, manual_plan(cfg), tmp_path)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 1 ")]
    tokens_per_second = float(re.search(r"tok/s ([\d,]+)", line).group(1).replace(",", ""))
    step_seconds = cfg.train.global_batch_size * cfg.train.seq_len / tokens_per_second
    assert step_seconds < start_up_seconds, line
