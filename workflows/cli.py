"""The `drope` command line.

    drope presets | plan SPEC | run SPEC | submit SPEC --address URL | resume RUN_ID | status RUN_ID
    drope lineage RUN_ID | compare RUN_ID [RUN_ID ...]
    drope fetch SOURCE DEST | drop-rope SRC DST | export SRC DST | import-gguf FILE DST
    drope recalibrate ... | fit-temperature ... | eval ...

Each subcommand lives in workflows/commands/<area>.py as `main_<name>(argv) -> int` with its own
argparse parser; this file only dispatches. User mistakes raise DropeError and end here as one line
on stderr with a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

from drope_ops.errors import DropeError

# name -> (module in workflows.commands, function, one-line help)
COMMANDS = {
    "presets": ("workflow", "main_presets", "list the workflow presets"),
    "plan": ("workflow", "main_plan", "print a spec's stages, resources and cost estimate"),
    "run": ("workflow", "main_run", "run a workflow here (embedded Ray, MLflow, local storage)"),
    "submit": ("workflow", "main_submit", "submit a workflow to a Ray cluster as a Ray job"),
    "resume": ("workflow", "main_resume", "finish a run: skip finished stages, rerun the rest"),
    "status": ("workflow", "main_status", "print each stage's state of a run"),
    "lineage": ("workflow", "main_lineage", "print a run's model lineage with MLflow ids"),
    "compare": ("compare", "main_compare", "runs side by side: evaluation cells, fitted c, tokens, final loss"),
    "fetch": ("storage", "main_fetch", "fetch a checkpoint from hf:// s3:// a directory or .gguf"),
    "drop-rope": ("model", "main_drop_rope", "drop RoPE from a checkpoint and insert QK-norm"),
    "export": ("model", "main_export", "export a DroPE checkpoint natively or with remote code"),
    "import-gguf": ("model", "main_import_gguf", "convert a GGUF file to a safetensors checkpoint"),
    "recalibrate": ("recalibrate", "main_recalibrate", "recalibrate a DroPE checkpoint on Ray Train"),
    "fit-temperature": ("evaluate", "main_fit_temperature", "fit the logit scale for longer contexts"),
    "eval": ("evaluate", "main_eval", "NIAH / perplexity / LongBench against RoPE-scaling baselines"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: drope COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"drope: error: unknown command {name!r}; run `drope --help` for the list", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    try:
        handler = getattr(importlib.import_module(f"workflows.commands.{module}"), func)
        return int(handler(rest) or 0)
    except DropeError as e:
        print(f"drope {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"drope {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
