"""The drope CLI's cheap faces: help, presets, plan, and one-line errors for unknown commands."""

import subprocess
import sys

import pytest

from workflows.cli import main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ["run", "submit", "resume", "status", "lineage", "plan", "presets", "fetch", "drop-rope", "export",
                "import-gguf", "recalibrate", "fit-temperature", "eval"]:
        assert f"  {cmd} " in out


def test_unknown_command_is_one_line(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip()
    assert "frobnicate" in err and "\n" not in err


def test_presets_lists_with_descriptions(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "llama-2-7b" in out and "smollm2-135m-cpu" in out and "20B-token" in out


def test_plan_estimates_tokens_and_gpu_hours(capsys):
    assert main(["plan", "llama-2-7b"]) == 0
    out = capsys.readouterr().out
    # 9537 steps x 512 seqs x 4096 tokens = 20.0B tokens, the paper's Llama-2-7B budget
    assert "20.00B tokens" in out and "GPU-hours" in out and "ZeRO-3" in out
    assert "fetch -> drop_rope -> recalibrate -> fit_temperature -> evaluate" in out


def test_plan_rejects_bad_override(capsys):
    assert main(["plan", "debug", "--set", "recalibrate.lr=-1"]) == 2
    assert "lr" in capsys.readouterr().err


@pytest.mark.parametrize("argv, not_loaded", [
    (["drop-rope", "--help"], ("torch", "transformers")),  # transformers loads later, while the shards copy
    (["presets"], ("transformers",)),
    (["status", "--help"], ("transformers",)),
])
def test_commands_that_need_no_model_do_not_import_it(argv, not_loaded):
    """A fresh interpreter: what `drope ARGV` leaves in sys.modules (seconds of import each)."""
    code = (f"import sys\nfrom workflows.cli import main\ntry:\n    rc = main({argv!r})\n"
            f"except SystemExit as e:  # --help\n    rc = e.code\n"
            f"print(rc, [m for m in {not_loaded!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "0 []", out[-300:]


def test_recalibrate_set_parses_values_as_drope_run_does(capsys, tmp_path):
    """`--set recalibrate.lr=1e-3` (YAML 1.1 reads it as a string) is parsed by the one spec loader, so the
    command gets past its configs to the checkpoint check; it crashed with a TypeError traceback when the
    command built RecalibrateConfig itself."""
    from workflows.commands.recalibrate import build_configs

    ckpt = tmp_path / "no-such-checkpoint"
    assert main(["recalibrate", str(ckpt), str(tmp_path / "out"), "--preset", "debug",
                 "--set", "recalibrate.lr=1e-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{ckpt} has no config.json" in err and "\n" not in err
    assert main(["recalibrate", str(ckpt), str(tmp_path / "out"), "--preset", "debug",
                 "--set", "recalibrate.lr=fast"]) == 2
    assert "recalibrate.lr='fast': must be a number" in capsys.readouterr().err
    cfg, _ = build_configs("debug", None, ["recalibrate.lr=1e-3"])
    assert cfg.lr == 0.001 and isinstance(cfg.lr, float)
