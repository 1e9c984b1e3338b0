"""`memplan job`: a cluster job for the plan, in a directory that holds everything it runs.

The script (job.out, default <run dir>/job.sh) is rendered from a plain template in
launch/templates/; resolved.yaml and plan.json are written beside it, and that directory is the
run directory the workers read and write (logs, checkpoints, wandb), so the job runs exactly
what was planned.

job.scheduler=slurm   an sbatch script: one task per node runs torchrun, the agents meet at a
                      c10d rendezvous on the first node of the allocation (job.submit=true
                      also runs sbatch).
job.scheduler=torchrun  a per-node script for a cluster without SLURM; the command to run on
                      each node is printed (NODE_RANK=i; node 0 hosts the same c10d rendezvous).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from configs.errors import ConfigError
from configs.schema import Config
from configs.schema.launch import sbatch_option
from configs.tokens import check_training_tokens
from launch.compose import compose_config, warn_config
from launch.plan_source import plan_for
from launch.run_dir import (
    check_not_locked,
    check_writable_file,
    default_run_dir,
    pin_paths,
    prepare_run_dir,
)
from launch.train_command import (
    check_validation_tokens,
    redirect_other_local_ranks,
    torchrun_prefix,
)
from planner.plan import Plan

TEMPLATES = {"slurm": "slurm_job.sh", "torchrun": "torchrun_node.sh"}
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
# Characters that `#SBATCH` lines cannot carry (sbatch does not unquote them).
_UNSAFE_IN_DIRECTIVE = re.compile(r"[\s'\"\\$`]")
_NO_SBATCH = (
    "sbatch not found on PATH (is this a SLURM login node?); job.submit=false only writes the"
    " script"
)


def render(template: str, values: dict[str, object]) -> str:
    """Fill `{{name}}` placeholders; every placeholder needs a value and every value a
    placeholder (a typo on either side is an error, not a silently broken script)."""
    text = (resources.files("launch") / "templates" / template).read_text()
    used = set(_PLACEHOLDER.findall(text))
    missing, unused = used - values.keys(), values.keys() - used
    if missing or unused:
        raise ValueError(f"{template}: missing values {sorted(missing)}, unused {sorted(unused)}")
    return _PLACEHOLDER.sub(lambda match: str(values[match.group(1)]), text)


@dataclass(frozen=True)
class JobFiles:
    """Where the job lives: the script and its run directory (the script's directory)."""

    script: Path
    run_dir: Path


def job_files(cfg: Config) -> JobFiles:
    """job.out and its directory, or <run dir>/job.sh; both absolute."""
    if cfg.job.out is None:
        run_dir = default_run_dir(cfg).resolve()
        return JobFiles(run_dir / "job.sh", run_dir)
    script = Path(cfg.job.out).resolve()
    if cfg.launch.run_dir and Path(cfg.launch.run_dir).resolve() != script.parent:
        raise ConfigError(
            "launch.run_dir",
            f"{cfg.launch.run_dir} differs from job.out's directory {script.parent}: the run"
            " directory is where the script is; give one of them",
        )
    if script.is_dir():
        raise ConfigError("job.out", f"{script} is a directory; give the script's file name")
    return JobFiles(script, script.parent)


def sbatch_directives(cfg: Config, files: JobFiles) -> list[str]:
    """The `#SBATCH` lines: one task per node, the GPUs, CPUs, time and where output goes."""
    cluster, job = cfg.cluster, cfg.job
    options = [f"--job-name={job.name or 'memplan-' + cfg.model.name}"]
    options += [f"--nodes={cluster.num_nodes}", "--ntasks-per-node=1"]
    if cluster.device == "cuda":
        options.append(f"--gres=gpu:{cluster.gpus_per_node}")
    options += [f"--cpus-per-task={job.cpus_per_task}", f"--time={job.time}"]
    if job.partition:
        options.append(f"--partition={job.partition}")
    if job.account:
        options.append(f"--account={job.account}")
    if job.exclusive:  # the plan's bandwidths and host RAM are the whole node's
        options.append("--exclusive")
    options += [f"--chdir={files.run_dir}", f"--output={files.run_dir}/slurm-%j.out"]
    # A requeued job keeps its id, appends to the same output and resumes from checkpoint.dir.
    options += ["--open-mode=append", "--requeue" if job.requeue else "--no-requeue"]
    if job.signal_seconds:  # to the job step's processes: the workers checkpoint and requeue
        options.append(f"--signal=USR1@{job.signal_seconds}")
    options += [sbatch_option(entry) for entry in job.sbatch_extra]
    return [f"#SBATCH {option}" for option in options]


def setup_lines(cfg: Config) -> str:
    """job.setup's lines, verbatim, where the script runs them (or a comment saying none)."""
    if not cfg.job.setup:
        return "# (no job.setup lines)"
    # module and activate scripts read variables that may be unset: not under `set -u`
    return "\n".join(["set +u", *cfg.job.setup, "set -u"])


def node_commands(cfg: Config, script: Path) -> list[str]:
    """The command to start on each node of a cluster without SLURM."""
    head = f"HEAD_ADDR={shlex.quote(cfg.job.head_addr)} " if cfg.job.head_addr else ""
    return [
        f"{head}NODE_RANK={node} bash {shlex.quote(str(script))}"
        for node in range(cfg.cluster.num_nodes)
    ]


def script_text(cfg: Config, plan: Plan, files: JobFiles) -> str:
    """The job script for cfg.job.scheduler, rendered from launch/templates/."""
    pinned = pin_paths(cfg, files.run_dir)
    values: dict[str, object] = {
        "run_dir": shlex.quote(str(files.run_dir)),
        "num_nodes": cfg.cluster.num_nodes,
        "gpus_per_node": cfg.cluster.gpus_per_node,
        "world_size": plan.layout.world_size,
        "port": cfg.job.port,
        "max_restarts": cfg.launch.max_restarts,
        "checkpoint_dir": shlex.quote(str(pinned.checkpoint.dir)),
        "resume": cfg.checkpoint.resume,
        "torchrun": shlex.join(torchrun_prefix()),
        # quoted: an unquoted comma inside a bash array reads like a separator (SC2054)
        "redirects": " ".join(
            f"'{flag}'" for flag in redirect_other_local_ranks(cfg.cluster.gpus_per_node)
        ),
        "setup": setup_lines(cfg),
    }
    if cfg.job.scheduler == "slurm":
        if _UNSAFE_IN_DIRECTIVE.search(str(files.run_dir)):
            raise ConfigError(
                "job.out",
                f"{files.run_dir!r}: #SBATCH lines cannot carry whitespace, quotes, $, ` or \\;"
                " choose a directory without them",
            )
        values["sbatch_directives"] = "\n".join(sbatch_directives(cfg, files))
        values["script"] = shlex.quote(str(files.script))
        values["cpus_per_task"] = cfg.job.cpus_per_task
        values["requeue_on_signal"] = int(cfg.job.requeue)
        return render(TEMPLATES["slurm"], values)
    rdzv_id = "memplan-" + re.sub(r"[^A-Za-z0-9_.-]", "_", files.run_dir.name)
    values["rdzv_id"] = shlex.quote(rdzv_id)
    values["head_addr"] = cfg.job.head_addr or ""
    values["node_commands"] = "\n".join(f"#   {line}" for line in node_commands(cfg, files.script))
    return render(TEMPLATES["torchrun"], values)


def restart_notes(cfg: Config) -> list[str]:
    """What a restart or requeue would do with these checkpoint settings, when it is not
    'resume from the newest checkpoint'."""
    restarts = cfg.launch.max_restarts > 0 or (cfg.job.scheduler == "slurm" and cfg.job.requeue)
    if not restarts:
        return []
    if cfg.checkpoint.every == 0:
        if cfg.job.scheduler == "slurm" and cfg.job.signal_seconds:
            return [
                "note: checkpoint.every=0: only the checkpoint saved on SIGUSR1 before the time"
                " limit is resumed from; after a failure or preemption the job starts at step 1"
            ]
        return ["note: checkpoint.every=0: a restarted or requeued job starts again at step 1"]
    if cfg.checkpoint.resume == "none":
        return ["note: checkpoint.resume=none: a restarted or requeued job starts again at step 1"]
    return []


def submit(script: Path) -> str:
    """Run sbatch on the script; returns what sbatch printed (the job id)."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError("job.submit", _NO_SBATCH)
    done = subprocess.run([sbatch, str(script)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        reason = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise ConfigError("job.submit", f"sbatch exited with {done.returncode}: {reason}")
    return done.stdout.strip()


def run(args: list[str]) -> int:
    """Compose, plan, write the script with resolved.yaml and plan.json beside it; print how to
    start it (or submit it with job.submit=true)."""
    cfg = compose_config(args)
    warn_config(cfg)
    if cfg.job.submit and shutil.which("sbatch") is None:
        raise ConfigError("job.submit", _NO_SBATCH)  # before planning: fail fast
    files = job_files(cfg)
    key = "job.out" if cfg.job.out else "launch.run_dir"
    check_writable_file(files.script, key)  # before planning: the real reason, nothing written
    check_not_locked(files.run_dir, key)
    # the tokens, as memplan train checks them: a bad file is found now, not in the queue
    check_training_tokens(cfg.data, cfg.train.seq_len, cfg.model.vocab_size, cfg.model.hf_config)
    check_validation_tokens(cfg)
    plan = plan_for(cfg)
    text = script_text(cfg, plan, files)
    prepare_run_dir(cfg, plan, files.run_dir, key=key)
    try:
        files.script.write_text(text)
        files.script.chmod(0o755)
    except OSError as exc:
        raise ConfigError(key, f"cannot write {files.script}: {exc.strerror}") from exc

    layout, cluster = plan.layout, cfg.cluster
    print(f"memplan job: wrote {files.script}")
    print(
        f"  beside it: resolved.yaml, plan.json (dp={layout.dp} tp={layout.tp} pp={layout.pp}"
        f" sp={layout.sp} zero={layout.zero_stage}; {cluster.num_nodes} node(s) x"
        f" {cluster.gpus_per_node} = {layout.world_size} rank(s))"
    )
    print(f"  run directory (logs, checkpoints, wandb): {files.run_dir}")
    for note in restart_notes(cfg):
        print(f"  {note}")
    if cfg.job.scheduler == "torchrun":
        where = "" if cfg.job.head_addr else " with HEAD_ADDR (an address of node 0) exported"
        print(f"# on each of the {cluster.num_nodes} node(s), at about the same time{where}:")
        for line in node_commands(cfg, files.script):
            print(line)
        return 0
    if not cfg.job.submit:
        print(f"  submit with: sbatch {shlex.quote(str(files.script))}")
        return 0
    print(f"memplan job: {submit(files.script)}")
    return 0
