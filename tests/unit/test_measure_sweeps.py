"""framework/measure/sweeps.py: the longest-length search and the per-length measurements of
bench/longest_sequence.py and bench/throughput.py."""

import dataclasses

import pytest
import torch

from framework.measure.device import describe_device
from framework.measure.sweeps import longest, throughput_row, try_length
from framework.measure.trainee import Trainee
from launch.compose import compose_config

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _limit(limit: int, seen: list[int]):
    def attempt(seq_len: int) -> bool:
        seen.append(seq_len)
        return seq_len <= limit

    return attempt


def test_longest_doubles_then_bisects_to_the_quantum():
    seen: list[int] = []
    assert longest(_limit(300, seen), 64, 32, 8192) == 288
    assert seen == [64, 128, 256, 512, 384, 320, 288]


def test_longest_below_the_start_and_at_the_cap():
    assert longest(_limit(40, []), 64, 32, 8192) == 32  # the start fails: bisect below it
    assert longest(_limit(10, []), 64, 32, 8192) is None
    assert longest(_limit(10**9, []), 64, 32, 200) == 192  # never past the cap


@pytest.fixture(scope="module")
def trainee():
    cfg = compose_config(["model.num_layers=1", "train.seq_len=64", "train.global_batch_size=1"])
    return Trainee(cfg, CPU)


def test_try_length_holds_the_measured_peak_to_the_emulated_budget(trainee):
    roomy = describe_device(CPU, 2**40, None)
    point = try_length(trainee, "none", trainee.cfg, 64, roomy, steps=1)
    assert point.trainable and point.why == "" and point.peak_bytes > 0
    tight = dataclasses.replace(roomy, memory_bytes=point.peak_bytes - 1)
    point = try_length(trainee, "none", trainee.cfg, 64, tight, steps=1)
    assert not point.trainable and point.why.endswith("> budget")


def test_throughput_row_reports_tokens_per_second_and_mfu(trainee):
    row = throughput_row(trainee, "full", trainee.cfg, 64, steps=2, peak_tflops=0.16)
    assert row["policy"] == "full" and "failure" not in row
    assert row["tokens_per_second"] == pytest.approx(64 / row["step_seconds"])
    assert 0 < row["mfu"] < 1
