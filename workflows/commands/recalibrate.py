"""`drope recalibrate`: run the recalibration stage alone, from a preset, a YAML file and/or flags.

    drope recalibrate CKPT OUT --preset debug --run-name r1 --storage /tmp/ray-results
    drope recalibrate CKPT OUT --config recal.yaml --set recalibrate.steps=40 --set data.seq_len=128
    drope recalibrate --presets                    # list the presets

The YAML holds two sections, `recalibrate:` (RecalibrateConfig fields) and `data:` (DataConfig
fields); --set overrides any of them. Relaunching with the same --run-name and --storage resumes
from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import yaml

from drope_ops.errors import SpecError
from workflows.commands.parser import Parser


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="drope recalibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", help="local DroPE (or Llama-family) checkpoint directory")
    p.add_argument("output", nargs="?", help="local directory for the consolidated checkpoint")
    p.add_argument("--preset", help="named preset (see --presets); the YAML and --set apply on top")
    p.add_argument("--config", help="YAML file with `recalibrate:` and `data:` sections")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one field, e.g. recalibrate.steps=40 or data.source=shakespeare")
    p.add_argument("--run-name", help="Ray Train run name; the same name resumes (default: output dir name)")
    p.add_argument("--storage", default=str(Path.home() / "ray_results"),
                   help="Ray Train storage_path: a local directory or s3://bucket/prefix")
    p.add_argument("--presets", action="store_true", help="list the presets and exit")
    return p


def build_configs(preset_name: str | None, config_file: str | None, overrides: list[str]):
    """(RecalibrateConfig, DataConfig) from a preset, then a YAML file, then --set overrides: the same
    loader as `drope run` (apply_overrides, from_dict), so a value parses and is refused alike."""
    from drope_ops.data import DataConfig
    from workflows.config import apply_overrides, from_dict
    from workflows.recalibrate.config import RecalibrateConfig, preset_sections

    tree: dict = {"recalibrate": {}, "data": {}}
    if preset_name:
        tree["recalibrate"], tree["data"] = preset_sections(preset_name)
    if config_file:
        for section, values in _config_sections(config_file, tuple(tree)).items():
            tree[section].update(values)
    for item in overrides:
        section, dot, name = item.partition("=")[0].strip().partition(".")
        if "=" not in item or section not in tree or not dot or not name:
            raise SpecError(f"--set {item!r} must look like recalibrate.FIELD=VALUE or data.FIELD=VALUE")
    tree = apply_overrides(tree, overrides)
    return (from_dict(RecalibrateConfig, tree["recalibrate"], "recalibrate."),
            from_dict(DataConfig, tree["data"], "data."))


def _config_sections(config_file: str, sections: tuple[str, ...]) -> dict:
    """The `recalibrate:` and `data:` sections of a --config YAML file, refused in one line otherwise."""
    from workflows.config import load_yaml

    try:
        with open(config_file) as f:
            loaded = load_yaml(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(f"--config {config_file}: cannot read it as YAML ({e.__class__.__name__})") from None
    unknown = set(loaded) - set(sections)
    if unknown:
        raise SpecError(f"--config {config_file}: unknown sections {sorted(unknown)}; use recalibrate: and data:")
    return {section: loaded.get(section) or {} for section in sections}


def main_recalibrate(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.presets:
        from workflows.config import preset_names
        from workflows.recalibrate.config import preset

        for name in preset_names():
            train, data = preset(name)
            print(f"{name:18s} steps={train.steps} batch={train.global_batch} seq={data.seq_len} "
                  f"workers={train.num_workers} zero={train.zero_stage} data={data.source}")
        return 0
    if not args.checkpoint or not args.output:
        raise SpecError("give CHECKPOINT and OUTPUT directories, e.g. drope recalibrate ckpt/ out/ --preset debug")
    cfg, data = build_configs(args.preset, args.config, args.set)
    from workflows.recalibrate.launch import recalibrate

    run_name = args.run_name or Path(args.output).resolve().name
    result = recalibrate(cfg, data, args.checkpoint, args.output, run_name=run_name, storage_path=args.storage)
    summary = {k: v for k, v in result.items() if k != "history"}
    print(json.dumps({"config": asdict(cfg), "data": asdict(data), **summary}, indent=1, default=str))
    return 0
