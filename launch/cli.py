"""`memplan <command> [HYDRA OVERRIDES]`: the one console script.

Exit codes (docs/ARCHITECTURE.md): 0 success; 2 bad input, one line naming the key and what
is allowed; 3 no feasible plan, naming the binding constraint and what would make it
feasible.
Each command lives in its own module so that `memplan plan` never imports torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from configs.errors import ConfigError
from planner.errors import NoFeasiblePlan

COMMANDS = {
    "plan": ("launch.plan_command", "dry run: plan and print tables (no GPU needed)"),
    "train": ("launch.train_command", "plan (or plan.path=PATH), then run torchrun"),
    "profile": ("launch.profile_command", "run steps here; predicted vs measured memory"),
    "job": ("launch.job_command", "write a SLURM batch script (job.out=PATH)"),
    "export": ("launch.export_command", "a plan as a DeepSpeed JSON / accelerate YAML"),
    "data": ("launch.data_command", "tokenize a corpus into a token file (prepare.*)"),
}

USAGE = f"usage: memplan {{{','.join(COMMANDS)}}} [-m] [HYDRA OVERRIDES ...]\n\n" + "\n".join(
    f"  {name:<8} {help_text}" for name, (_, help_text) in COMMANDS.items()
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `memplan` console script; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(
            f"memplan: error: unknown command {command!r}; allowed: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.run(rest))
    except ConfigError as exc:
        print(f"memplan {command}: error: {exc}", file=sys.stderr)
        return 2
    except NoFeasiblePlan as exc:
        print(f"memplan {command}: no feasible plan: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:  # a file the checks above missed: still one line, the file named
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"memplan {command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
