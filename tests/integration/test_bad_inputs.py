"""Bad input to `memplan plan`, `memplan train`, `memplan profile` and `memplan job`, as a
table: each row is the command line a user types, the exit code (2 bad input, 3 no feasible
plan, 0 for a warning), and what the one line on stderr must name (the key or the file). No
row may print a traceback, and a refused row writes nothing: `memplan train` rows use
launch.dry_run=true (nothing would start anyway: each is refused before the run directory is
written); `memplan profile` rows are refused before any step runs.

Run in-process through launch.cli.main, as the console script does (a few seconds in all).
Left out, for the planner: train.seq_len=1000000000000 (IndexError inside HiGHS) and
train.global_batch_size=1000000000000 (the search does not end).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from launch.cli import main
from launch.compose import compose_config
from launch.run_dir import lock_run_dir
from tests.plans import manual_plan

pytestmark = pytest.mark.integration

DRY = "launch.dry_run=true"

# Edits of a plan the planner made for the default config (tiny model, cluster=cpu,
# 16 sequences x 256 tokens): name -> function changing its JSON.
PLAN_EDITS = {
    "micro5": lambda p: p["layout"].update(micro_batch_size=5, num_microbatches=1),
    "off15": lambda p: p["layers"][0].update(offload_fraction=1.5),
    "nanfrac": lambda p: p["layers"][0].update(offload_fraction=float("nan")),
    "strfrac": lambda p: p["layers"][0].update(offload_fraction="half"),
    "recbogus": lambda p: p["layers"][0].update(recompute="sometimes"),
    "layers3": lambda p: p.update(layers=p["layers"][:3]),
    "index": lambda p: p["layers"][1].update(index=7),
    "stage": lambda p: p["layers"][1].update(stage=3),
    "budget": lambda p: p["memory"].update(gpu_budget_bytes=100 * 2**30),
    "small": lambda p: p["cluster"].update(gpu_memory_gib=0.03),
    "schema2": lambda p: p.update(schema_version=2),
    "nolayout": lambda p: p.pop("layout"),
    "dp2": lambda p: p["layout"].update(dp=2),
    "hidden": lambda p: p["model"].update(hidden_size=64),
    "zero5": lambda p: p["layout"].update(zero_stage=5),
    "backend": lambda p: p["layout"].update(zero_backend="megatron"),
    "sched": lambda p: p["layout"].update(pp_schedule="1f1b"),
    "extra": lambda p: p.update(comment="edited by hand"),
    "microdiff": lambda p: p["train"].update(micro_batch_size=8),
}

# fmt: off
CASES: list[tuple[str, list[str], int, str]] = [
    # ------------------------------------------------------------- memplan plan: overrides
    ("plan", ["=5"], 2, "override: '=5' has no key"),
    ("plan", ["train.seq_len"], 2, "train.seq_len: cannot parse"),
    ("plan", ["model=tiny,"], 2, "model: cannot parse"),
    ("plan", ["job.name=a,b;"], 2, "job.name: cannot parse"),
    ("plan", ["train.no_such_key=1"], 2, "train.no_such_key: unknown key"),
    ("plan", ["nothing=1"], 2, "nothing: unknown key"),
    ("plan", ["+train.seq_len=5"], 2, "+train.seq_len: train.seq_len exists already"),
    ("plan", ["++train.foo=5"], 2, "train.foo: unknown key"),
    ("plan", ["train.seq_len=abc"], 2, "train.seq_len"),
    ("plan", ["train.seq_len=0"], 2, "train.seq_len: must be >= 1"),
    ("plan", ["train.seq_len=1.5"], 2, "train.seq_len"),
    ("plan", ["train.seq_len=1,2"], 2, "train.seq_len: 1,2 is a sweep"),
    ("plan", ["train.global_batch_size=0"], 2, "train.global_batch_size"),
    ("plan", ["train.micro_batch_size=3"], 2, "train.micro_batch_size"),
    ("plan", ["train.steps=true"], 2, "train.steps"),
    ("plan", ["train.dtype=fp8"], 2, "train.dtype"),
    ("plan", ["model=nope"], 2, "model=nope: unknown preset; available:"),
    ("plan", ["model=[tiny,nope]"], 2, "model=nope: unknown preset"),
    ("plan", ["cluster=nope"], 2, "cluster=nope: unknown preset"),
    ("plan", ["cluster.gpus_per_node=0"], 2, "cluster.gpus_per_node"),
    ("plan", ["cluster.gpu_memory_gib=-1"], 2, "cluster.gpu_memory_gib"),
    ("plan", ["cluster.num_nodes=1.5"], 2, "cluster.num_nodes"),
    ("plan", ["planner.solver=gurobi"], 2, "planner.solver"),
    ("plan", ["planner.pp_schedules=[]"], 2, "planner.pp_schedules"),
    ("plan", ["model.num_heads=3"], 2, "model.num_kv_heads"),
    ("plan", ["model.vocab_size=0"], 2, "model.vocab_size"),
    ("plan", ["logging.every=0"], 2, "logging.every"),
    ("plan", ["checkpoint.keep=0"], 2, "checkpoint.keep"),
    ("plan", ["checkpoint.resume=maybe"], 2, "checkpoint.resume"),
    ("plan", ["data.dtype=int8"], 2, "data.dtype"),
    ("plan", ["model.hf_config={d}/absent.json"], 2, "model.hf_config"),
    ("plan", ["model.hf_config={d}/binary.dat"], 2, "model.hf_config"),
    ("plan", ["-m", "train.seq_len=128,abc"], 2, "train.seq_len"),
    ("plan", ["-m", "model=tiny,"], 2, "model: cannot parse"),
    ("plan", ["cluster.gpu_memory_gib=0.0001"], 3, "no feasible plan: needs"),
    # ------------------------------------------- memplan plan: numbers, deletions, lengths
    ("plan", ["train.lr=nan"], 2, "train.lr: must be > 0, got nan"),
    ("plan", ["train.lr=-1"], 2, "train.lr: must be > 0, got -1.0"),
    ("plan", ["train.lr=inf"], 2, "train.lr: must be > 0, got inf"),
    ("plan", ["train.lr=0"], 2, "train.lr: must be > 0, got 0.0"),
    ("plan", ["train.beta2=1"], 2, "train.beta2: must be in [0, 1), got 1.0"),
    ("plan", ["train.adam_eps=0"], 2, "train.adam_eps: must be > 0"),
    ("plan", ["train.weight_decay=nan"], 2, "train.weight_decay: must be >= 0, got nan"),
    ("plan", ["train.seed=-1"], 2, "train.seed: must be >= 0"),
    ("plan", ["model.rope_theta=0"], 2, "model.rope_theta: must be > 0"),
    ("plan", ["model.norm_eps=-1e-5"], 2, "model.norm_eps: must be > 0"),
    ("plan", ["model.rope_scaling=llama3", "model.rope_high_freq_factor=1"], 2,
     "model.rope_high_freq_factor: must be > model.rope_low_freq_factor=1"),
    ("plan", ["cluster.peak_tflops=inf"], 2, "cluster.peak_tflops: must be > 0, got inf"),
    ("plan", ["~model"], 2, "~model: a config group cannot be deleted"),
    ("plan", ["~cluster=cpu"], 2, "~cluster: a config group cannot be deleted"),
    ("plan", ["~data"], 2, "~data: a config node cannot be deleted"),
    ("plan", ["~train.lr"], 2, "~train.lr: keys cannot be deleted"),
    ("plan", ["~train.foo"], 2, "~train.foo: unknown key"),
    ("plan", ["train.seq_len=8192"], 0, "warning: train.seq_len: 8192 is longer than"
     " model.max_seq_len=4096"),
    # ---------------------------------------------------------- memplan plan: output files
    ("plan", ["plan.out={d}/file/p.json"], 2, "plan.out: cannot create {d}/file/p.json: {d}/file"
     " is a file, not a directory"),
    ("plan", ["plan.out={d}/dir"], 2, "plan.out: {d}/dir is a directory"),
    ("plan", ["plan.out=/proc/memplan/p.json"], 2, "plan.out: cannot write /proc/memplan/p.json:"
     " No such file or directory"),
    ("plan", ["plan.plot={d}/dir"], 2, "plan.plot: {d}/dir is a directory"),
    ("plan", ["plan.plot={d}/plot.txt"], 2, "plan.plot: {d}/plot.txt: allowed file types"),
    ("plan", ["plan.plot={d}/file/x.png"], 2, "plan.plot: cannot create {d}/file/x.png"),
    # ------------------------------------------------------------- memplan plan: plan.path
    ("plan", ["plan.path={d}/absent.json"], 2, "plan.path: cannot read {d}/absent.json"),
    ("plan", ["plan.path={d}/binary.dat"], 2, "plan.path: {d}/binary.dat is not a plan JSON"),
    ("plan", ["plan.path={d}/text.txt"], 2, "plan.path: {d}/text.txt is not valid JSON"),
    ("plan", ["plan.path={d}/array.json"], 2, "plan.path: {d}/array.json does not hold a JSON"),
    ("plan", ["plan.path={d}/dir"], 2, "plan.path: cannot read {d}/dir"),
    ("plan", ["plan.path={d}/micro5.json"], 2, "plan.path: {d}/micro5.json: layout: dp*micro_"
     "batch_size*num_microbatches=1*5*1 != global_batch_size=16"),
    ("plan", ["plan.path={d}/off15.json"], 2, "layers[0].offload_fraction: must be in [0, 1]"),
    ("plan", ["plan.path={d}/nanfrac.json"], 2, "layers[0].offload_fraction"),
    ("plan", ["plan.path={d}/strfrac.json"], 2, "layers[0].offload_fraction"),
    ("plan", ["plan.path={d}/recbogus.json"], 2, "layers[0].recompute: got 'sometimes'; allowed"),
    ("plan", ["plan.path={d}/layers3.json"], 2, "layers: 3 entries for a model with 4 layers"),
    ("plan", ["plan.path={d}/index.json"], 2, "layers: entry 1 has index 7"),
    ("plan", ["plan.path={d}/stage.json"], 2, "layers[1].stage: 3 outside 0..0"),
    ("plan", ["plan.path={d}/budget.json"], 2, "plan.path: {d}/budget.json budgets 100.00 GiB"),
    ("plan", ["plan.path={d}/small.json"], 0, "plan.path: {d}/small.json was planned for 0.03 GiB"),
    ("plan", ["plan.path={d}/schema2.json"], 2, "schema_version: got 2"),
    ("plan", ["plan.path={d}/nolayout.json"], 2, "plan.path: {d}/nolayout.json: missing layout"),
    ("plan", ["plan.path={d}/dp2.json"], 2, "plan.path: plan needs 2 ranks"),
    ("plan", ["plan.path={d}/hidden.json"], 2, "plan has model.hidden_size=64"),
    ("plan", ["plan.path={d}/zero5.json"], 2, "layout.zero_stage: got 5"),
    ("plan", ["plan.path={d}/backend.json"], 2, "layout.zero_backend"),
    ("plan", ["plan.path={d}/sched.json"], 2, "layout.pp_schedule"),
    ("plan", ["plan.path={d}/extra.json"], 2, "comment: unknown key"),
    ("plan", ["plan.path={d}/microdiff.json"], 2, "train.micro_batch_size=8 differs"),
    ("plan", ["plan.path={d}/good.json", "train.seq_len=128"], 2, "train.seq_len: 128 differs"),
    ("plan", ["plan.path={d}/pp2.json", "cluster.gpus_per_node=2"], 2, "contiguous"),
    # -------------------------------------------------------- memplan train (dry run)
    ("train", ["data.path={d}/absent.bin"], 2, "data.path: no such token file"),
    ("train", ["data.path={d}/odd.bin"], 2, "data.path: {d}/odd.bin is not a flat uint16"),
    ("train", ["data.path={d}/big_ids.bin"], 2, "data.path: {d}/big_ids.bin holds token id 300"
     " >= model.vocab_size=256"),
    ("train", ["data.path={d}/short.bin"], 2, "data.path: {d}/short.bin holds 3 tokens, shorter"),
    ("train", ["data.path={d}/dir"], 2, "data.path: {d}/dir is a directory"),
    ("train", ["data.embedded_max_bytes=4096", "train.seq_len=4095"], 2,
     "data.embedded_max_bytes: 4096 bytes is shorter than one sequence"),
    ("train", ["model.vocab_size=100"], 2, "model.vocab_size: 100, but the embedded corpus"),
    ("train", ["launch.run_dir={d}/file/run"], 2, "launch.run_dir: cannot create {d}/file/run"),
    ("train", ["launch.run_dir={d}/file"], 2, "launch.run_dir: {d}/file is a file"),
    ("train", ["checkpoint.dir={d}/file/ck", "checkpoint.every=1"], 2,
     "checkpoint.dir: cannot create {d}/file/ck: {d}/file is a file, not a directory"),
    ("train", ["checkpoint.dir={d}/file", "checkpoint.every=1"], 2, "checkpoint.dir: {d}/file"),
    ("train", ["checkpoint.dir=/proc/memplan-ck", "checkpoint.every=1"], 2,
     "checkpoint.dir: cannot write /proc/memplan-ck"),
    ("train", ["launch.max_restarts=-1"], 2, "launch.max_restarts"),
    ("train", ["cluster.num_nodes=2"], 2, "cluster.num_nodes: 2 nodes"),
    ("train", ["checkpoint.exit_after=2"], 2, "checkpoint.exit_after"),
    ("train", ["launch.run_dir={d}/live"], 2, "launch.run_dir: {d}/live is in use by a live run"),
    ("train", ["plan.path={d}/binary.dat"], 2, "plan.path: {d}/binary.dat is not a plan JSON"),
    ("train", ["plan.path={d}/micro5.json"], 2, "plan.path: {d}/micro5.json: layout:"),
    ("train", ["plan.path={d}/budget.json"], 2, "plan.path: {d}/budget.json budgets"),
    ("train", ["train.seq_len=1,2"], 2, "train.seq_len: 1,2 is a sweep"),
    ("train", ["~model"], 2, "~model: a config group cannot be deleted"),
    ("train", ["train.lr=nan"], 2, "train.lr: must be > 0, got nan"),
    # --------------------------------------------------------------------- memplan profile
    ("profile", ["data.path={d}/absent.bin"], 2, "data.path: no such token file"),
    ("profile", ["data.path={d}/big_ids.bin"], 2, "data.path: {d}/big_ids.bin holds token id"),
    ("profile", ["data.path={d}/short.bin"], 2, "data.path: {d}/short.bin holds 3 tokens"),
    ("profile", ["~model"], 2, "~model: a config group cannot be deleted"),
    # ------------------------------------------------------------------------ memplan job
    ("job", ["job.scheduler=pbs"], 2, "job.scheduler"),
    ("job", ["job.time=tomorrow"], 2, "job.time: 'tomorrow' is not a SLURM time"),
    ("job", ["job.out={d}/file/job.sh"], 2, "job.out: cannot create {d}/file/job.sh: {d}/file is"
     " a file, not a directory"),
    ("job", ["job.out={d}/dir"], 2, "job.out: {d}/dir is a directory"),
    ("job", ["job.out=/proc/memplan/job.sh"], 2, "job.out: cannot write /proc/memplan/job.sh"),
    ("job", ["job.out={d}/live/job.sh"], 2, "job.out: {d}/live is in use by a live run"),
    ("job", ["job.port=0"], 2, "job.port"),
    ("job", ["job.cpus_per_task=0"], 2, "job.cpus_per_task"),
    ("job", ["job.submit=true"], 2, "job.submit: sbatch not found"),
    ("job", ["job.submit=true", "job.scheduler=torchrun"], 2, "job.submit: true needs"),
    ("job", ["launch.run_dir={d}/x", "job.out={d}/y/job.sh"], 2, "launch.run_dir: {d}/x differs"),
    ("job", ["job.head_addr=a/b"], 2, "job.head_addr"),
    ("job", ["job.out={d}/j/job.sh", "plan.path={d}/binary.dat"], 2, "plan.path: {d}/binary.dat"),
    ("job", ["job.out={d}/j/job.sh", "plan.path={d}/dp2.json"], 2, "plan.path: plan needs 2"),
    ("job", ["job.out={d}/j/job.sh", "plan.path={d}/micro5.json"], 2, "plan.path: {d}/micro5"),
]
# fmt: on


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Bad files of every kind, edited plans, and a run directory a live run holds."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "file").write_text("a regular file\n")
    (d / "dir").mkdir()
    (d / "binary.dat").write_bytes(bytes(range(256)) * 8)
    (d / "text.txt").write_text("not json\n")
    (d / "array.json").write_text("[1, 2]\n")
    (d / "odd.bin").write_bytes(b"abc")
    np.array([1, 2, 300, 4] * 1000, dtype=np.uint16).tofile(d / "big_ids.bin")
    np.array([1, 2, 3], dtype=np.uint16).tofile(d / "short.bin")
    assert main(["plan", f"plan.out={d / 'good.json'}"]) == 0
    good = json.loads((d / "good.json").read_text())
    for name, edit in PLAN_EDITS.items():
        plan = json.loads(json.dumps(good))
        edit(plan)
        (d / f"{name}.json").write_text(json.dumps(plan))
    pp2 = manual_plan(compose_config(["cluster.gpus_per_node=2"]), pp=2).to_dict()
    for layer, stage in zip(pp2["layers"], (0, 1, 0, 1), strict=True):
        layer["stage"] = stage
    (d / "pp2.json").write_text(json.dumps(pp2))
    (d / "live" / "resolved.yaml").parent.mkdir()
    (d / "live" / "resolved.yaml").write_text("the live run's config\n")
    with lock_run_dir(d / "live", who="memplan train"):
        yield d


def _expand(text: str, d: Path) -> str:
    return text.replace("{d}", str(d))


@pytest.mark.parametrize(
    ("command", "args", "code", "needle"),
    CASES,
    ids=[f"{i:02d}-{c}-{' '.join(a)[:40]}" for i, (c, a, _, _) in enumerate(CASES)],
)
def test_bad_input_one_line_naming_the_key(
    inputs, capsys, monkeypatch, command, args, code, needle
):
    monkeypatch.chdir(inputs)
    monkeypatch.setenv("PATH", str(inputs / "dir"))  # no sbatch here
    argv = [command, *(_expand(arg, inputs) for arg in args)]
    run_dir = inputs / "runs" / f"run-{abs(hash(tuple(argv)))}"
    if command == "train":
        given = any(arg.startswith("launch.run_dir") for arg in args)
        argv += [DRY] + ([] if given else [f"launch.run_dir={run_dir}"])
    returned = main(argv)  # an exception escaping here is a traceback for the user
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert returned == code, (out, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("memplan"), lines[0]
    assert _expand(needle, inputs) in lines[0], lines[0]
    assert "Traceback" not in out + err
    if code:
        assert not run_dir.exists(), "refused, yet the run directory was written"
    assert (inputs / "live" / "resolved.yaml").read_text() == "the live run's config\n"


def test_the_table_is_large_and_distinct():
    assert len(CASES) >= 60
    assert len({(c, tuple(a)) for c, a, _, _ in CASES}) == len(CASES)
