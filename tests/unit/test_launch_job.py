"""`memplan job` pieces in-process: templates, #SBATCH lines, job paths, schema validation."""

from pathlib import Path

import pytest

from configs.errors import ConfigError
from launch import job_command
from launch.compose import compose_config, load_resolved
from launch.job_command import (
    JobFiles,
    job_files,
    node_commands,
    render,
    restart_notes,
    sbatch_directives,
    script_text,
)
from tests.plans import manual_plan


def _cfg(*overrides: str):
    return compose_config(["logging.wandb=false", *overrides])


def _directives(cfg, run_dir: Path) -> list[str]:
    return sbatch_directives(cfg, JobFiles(run_dir / "job.sh", run_dir))


def test_render_refuses_missing_and_unused_values():
    cfg = _cfg("cluster.gpus_per_node=2")
    plan = manual_plan(cfg, dp=2)
    text = script_text(cfg, plan, JobFiles(Path("/j/job.sh"), Path("/j")))
    assert "{{" not in text and "}}" not in text
    values = {name: 1 for name in ("run_dir", "num_nodes", "gpus_per_node", "world_size")}
    with pytest.raises(ValueError, match=r"missing values \[.*'port'"):
        render("slurm_job.sh", values)
    full = dict.fromkeys(job_command._PLACEHOLDER.findall(_template("slurm_job.sh")), 1)
    assert render("slurm_job.sh", full)  # every placeholder given: renders
    with pytest.raises(ValueError, match=r"unused \['typo'\]"):
        render("slurm_job.sh", {**full, "typo": 1})


def _template(name: str) -> str:
    return (Path(job_command.__file__).parent / "templates" / name).read_text()


def test_sbatch_directives_for_a_gpu_cluster(tmp_path):
    cfg = _cfg(
        "cluster=h100_8x",
        "cluster.num_nodes=4",
        "job.partition=gpu",
        "job.account=proj-42",
        "job.time=2-00:00:00",
        "job.cpus_per_task=64",
        "job.name=llama-run",
    )
    assert _directives(cfg, tmp_path) == [
        "#SBATCH --job-name=llama-run",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gres=gpu:8",
        "#SBATCH --cpus-per-task=64",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj-42",
        "#SBATCH --exclusive",
        f"#SBATCH --chdir={tmp_path}",
        f"#SBATCH --output={tmp_path}/slurm-%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR1@120",
    ]


def test_extra_sbatch_lines_exclusive_and_signal_follow_the_job_keys(tmp_path):
    cfg = _cfg(
        'job.sbatch_extra=["--mem=0","#SBATCH --constraint=h100","--qos=high"]',
        "job.exclusive=false",
        "job.signal_seconds=300",
    )
    lines = _directives(cfg, tmp_path)
    assert lines[-4:] == [
        "#SBATCH --signal=USR1@300",
        "#SBATCH --mem=0",
        "#SBATCH --constraint=h100",
        "#SBATCH --qos=high",
    ]
    assert "#SBATCH --exclusive" not in lines
    quiet = _directives(_cfg("job.signal_seconds=0"), tmp_path)
    assert not [line for line in quiet if "--signal" in line]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('["--nodes=8"]', "job.sbatch_extra[0]: --nodes is set from cluster.num_nodes"),
        ('["--mem=0","-N8"]', "job.sbatch_extra[1]: -N is set from cluster.num_nodes"),
        ('["--time=1:00:00"]', "--time is set from job.time"),
        ('["--signal=B:USR1@60"]', "--signal is set from job.signal_seconds"),
        ('["--output=x.out"]', "--output is set from job.out"),
        ('["mem=0"]', "'mem=0' is not one #SBATCH option"),
    ],
)
def test_extra_sbatch_lines_that_would_break_the_job_are_refused(extra, message):
    with pytest.raises(ConfigError) as err:
        _cfg(f"job.sbatch_extra={extra}")
    assert message in str(err.value)


def test_setup_lines_run_before_srun_outside_set_u(tmp_path):
    cfg = _cfg('job.setup=["module load cuda/12.4","source /opt/venv/bin/activate"]')
    text = script_text(cfg, manual_plan(cfg), JobFiles(tmp_path / "job.sh", tmp_path))
    block = "set +u\nmodule load cuda/12.4\nsource /opt/venv/bin/activate\nset -u\n"
    assert block in text
    assert text.index(block) < text.index("\nsrun ") < text.index("-m launch.worker")
    assert "export MEMPLAN_REQUEUE_ON_SIGNAL=1\n" in text  # job.requeue=true
    no_requeue = _cfg("job.requeue=false")
    assert "export MEMPLAN_REQUEUE_ON_SIGNAL=0\n" in script_text(
        no_requeue, manual_plan(no_requeue), JobFiles(tmp_path / "job.sh", tmp_path)
    )
    # torchrun itself ignores SIGUSR1 (it would end the agent); the workers catch it
    assert 'bash -c \'trap "" USR1; exec "$@"\' memplan-node' in text
    node = _cfg('job.setup=["module load cuda/12.4"]', "job.scheduler=torchrun")
    text = script_text(node, manual_plan(node), JobFiles(tmp_path / "job.sh", tmp_path))
    assert text.index("module load cuda/12.4") < text.index('exec "${TORCHRUN[@]}"')
    with pytest.raises(ConfigError, match=r"^job.setup\[0\]: must be one non-empty line"):
        _cfg('job.setup=[""]')


def test_sbatch_directives_for_cpu_nodes_without_partition(tmp_path):
    lines = _directives(_cfg("job.requeue=false"), tmp_path)
    assert "#SBATCH --job-name=memplan-tiny" in lines
    assert "#SBATCH --no-requeue" in lines and "#SBATCH --requeue" not in lines
    assert not [line for line in lines if "--gres" in line or "--partition" in line]
    assert not [line for line in lines if "--account" in line]


def test_job_files_default_and_explicit(tmp_path):
    files = job_files(_cfg(f"launch.run_dir={tmp_path}/run"))
    assert files == JobFiles(tmp_path / "run" / "job.sh", tmp_path / "run")
    files = job_files(_cfg(f"job.out={tmp_path}/jobs/a.sbatch"))
    assert files == JobFiles(tmp_path / "jobs" / "a.sbatch", tmp_path / "jobs")
    same = job_files(_cfg(f"job.out={tmp_path}/j/a.sh", f"launch.run_dir={tmp_path}/j"))
    assert same.run_dir == tmp_path / "j"


def test_job_files_refuses_two_different_run_directories(tmp_path):
    with pytest.raises(ConfigError, match=r"^launch.run_dir: .* differs from job.out"):
        job_files(_cfg(f"job.out={tmp_path}/a/job.sh", f"launch.run_dir={tmp_path}/b"))
    with pytest.raises(ConfigError, match=r"^job.out: .* is a directory"):
        job_files(_cfg(f"job.out={tmp_path}"))


def test_slurm_refuses_a_directory_that_sbatch_lines_cannot_carry(tmp_path):
    cfg = _cfg()
    bad = tmp_path / "my runs"
    with pytest.raises(ConfigError, match=r"^job.out: .*whitespace"):
        script_text(cfg, manual_plan(cfg), JobFiles(bad / "job.sh", bad))
    # the torchrun scheduler quotes paths instead
    cfg = _cfg("job.scheduler=torchrun")
    assert "RUN_DIR='" in script_text(cfg, manual_plan(cfg), JobFiles(bad / "job.sh", bad))


@pytest.mark.parametrize(
    ("override", "key", "hint"),
    [
        ("job.time=forever", "job.time", "D-H:M:S"),
        ("job.time=1:2:3:4", "job.time", "H:M:S"),
        ("job.partition='gpu a'", "job.partition", "letters, digits"),
        ("job.account='a;b'", "job.account", "letters, digits"),
        ("job.head_addr='a b'", "job.head_addr", "host name"),
        ("job.port=70000", "job.port", "65535"),
        ("job.cpus_per_task=0", "job.cpus_per_task", ">= 1"),
        ("job.scheduler=pbs", "job.scheduler", "slurm"),
        ("launch.max_restarts=-1", "launch.max_restarts", ">= 0"),
    ],
)
def test_bad_job_settings_name_the_key(override, key, hint):
    with pytest.raises(ConfigError) as err:
        _cfg(override)
    assert str(err.value).startswith(f"{key}:")
    assert hint in str(err.value)


def test_submit_needs_the_slurm_scheduler():
    with pytest.raises(ConfigError, match=r"^job.submit: true needs job.scheduler=slurm"):
        _cfg("job.submit=true", "job.scheduler=torchrun")


@pytest.mark.parametrize("time", ["30", "30:00", "24:00:00", "2-00", "2-12:00", "2-12:00:00"])
def test_slurm_time_formats_are_accepted(time):
    assert _cfg(f"job.time={time}").job.time == time


def test_node_commands_with_and_without_a_head_address(tmp_path):
    script = tmp_path / "job.sh"
    cfg = _cfg("cluster.num_nodes=3", "job.head_addr=10.0.0.1")
    assert node_commands(cfg, script) == [
        f"HEAD_ADDR=10.0.0.1 NODE_RANK={i} bash {script}" for i in range(3)
    ]
    assert node_commands(_cfg("cluster.num_nodes=2"), script) == [
        f"NODE_RANK={i} bash {script}" for i in range(2)
    ]


def test_restart_notes_follow_the_checkpoint_settings():
    assert "checkpoint.every=0" in restart_notes(_cfg())[0]  # requeue on, no checkpoints
    assert "saved on SIGUSR1" in restart_notes(_cfg())[0]
    assert "starts again at step 1" in restart_notes(_cfg("job.signal_seconds=0"))[0]
    assert restart_notes(_cfg("job.requeue=false")) == []
    assert restart_notes(_cfg("checkpoint.every=50")) == []
    resume_none = restart_notes(_cfg("checkpoint.every=50", "checkpoint.resume=none"))
    assert "checkpoint.resume=none" in resume_none[0]
    assert restart_notes(_cfg("job.scheduler=torchrun")) == []  # no restarts, no requeue
    assert restart_notes(_cfg("job.scheduler=torchrun", "launch.max_restarts=2"))


def test_job_run_writes_script_config_and_plan_side_by_side(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg("cluster.gpus_per_node=2", "checkpoint.every=5")
    plan_path = tmp_path / "plan.json"
    manual_plan(cfg, dp=2).write(plan_path)
    code = job_command.run(
        [
            "logging.wandb=false",
            "cluster.gpus_per_node=2",
            "checkpoint.every=5",
            "checkpoint.dir=ckpt",  # relative: pinned to an absolute path for the job
            f"plan.path={plan_path}",
            "job.out=jobs/run1/job.sh",
        ]
    )
    job_dir = tmp_path / "jobs" / "run1"
    assert code == 0
    assert sorted(p.name for p in job_dir.iterdir()) == ["job.sh", "plan.json", "resolved.yaml"]
    assert (job_dir / "plan.json").read_text() == plan_path.read_text()
    resolved = load_resolved(str(job_dir / "resolved.yaml"))
    assert resolved.checkpoint.dir == str(tmp_path / "ckpt")
    assert resolved.launch.run_dir == str(job_dir)
    assert resolved.cluster.gpus_per_node == 2
    assert f"CHECKPOINT_DIR={tmp_path / 'ckpt'}\n" in (job_dir / "job.sh").read_text()
    assert (job_dir / "job.sh").stat().st_mode & 0o111
    out = capsys.readouterr().out
    assert f"memplan job: wrote {job_dir / 'job.sh'}" in out
    assert f"submit with: sbatch {job_dir / 'job.sh'}" in out
