"""Spec trees: YAML presets and files, --set overrides, and plain dicts turned into typed dataclasses.

    tree = apply_overrides(load_tree("debug"), ["recalibrate.steps=2"])
    cfg = from_dict(RecalibrateConfig, tree["recalibrate"], "recalibrate.")

Generic on purpose: it knows no stage. workflows/spec.py joins the stages' config dataclasses into
the WorkflowSpec; a stage that needs a preset's section (recalibrate --preset) reads it from here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path

import yaml

from drope_ops.errors import SpecError

PRESETS_DIR = Path(__file__).parent / "presets"


class SpecLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with a key twice (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                where = key_node.start_mark.name
                raise SpecError(f"{'' if where.startswith('<') else where + ': '}duplicate key {key!r} on line "
                                f"{line} (first on line {seen[key]}); keep one of them")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text_or_file) -> object:
    """YAML through SpecLoader: every spec, preset, --set value and ledger spec loads here."""
    return yaml.load(text_or_file, Loader=SpecLoader)

def _field_types(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _number_type(tp) -> type | None:
    """int or float for fields typed int / float / (int | None) / (float | None), else None."""
    args = set(typing.get_args(tp)) - {type(None)} if typing.get_args(tp) else {tp}
    return next(iter(args)) if len(args) == 1 and next(iter(args)) in (int, float) else None


def _check_scalar(field: str, tp, value) -> None:
    """What a dataclass does not check itself: true/false given for a number (bool is an int to
    Python), .nan / .inf for a float, a fixed-length tuple (AdamW betas) given another length."""
    number = _number_type(tp)
    if number is not None and isinstance(value, bool):
        raise SpecError(f"spec field {field}={str(value).lower()}: must be a number, e.g. {field}="
                        f"{'1e-3' if number is float else '10'}")
    if number is float and isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"spec field {field}={value}: must be a finite number")
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and Ellipsis not in args and isinstance(value, (list, tuple)) \
            and len(value) != len(args):
        raise SpecError(f"spec field {field}={list(value)}: give a list of exactly {len(args)} values")


def _is_list(tp) -> bool:
    """Fields typed list[...] (or list[...] | None)."""
    return typing.get_origin(tp) is list or any(typing.get_origin(a) is list for a in typing.get_args(tp))


def from_dict(cls, data: dict | None, where: str = ""):
    """Build dataclass `cls` from a plain dict; unknown keys are refused with the closest known name."""
    data = dict(data or {})
    types = _field_types(cls)
    unknown = [k for k in data if k not in types]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, types, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(types)}"
        raise SpecError(f"unknown spec field {where}{key!r}: {hint}")
    kwargs = {}
    for name, value in data.items():
        tp = types[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value, f"{where}{name}.")
        elif dataclasses.is_dataclass(tp) and value is not None:
            raise SpecError(f"spec field {where}{name} must be a mapping, got {value!r}")
        elif _is_list(tp) and value is not None and not isinstance(value, (list, tuple)):
            raise SpecError(f"spec field {where}{name}={value!r}: must be a list, e.g. {where}{name}=[{value}]")
        elif isinstance(value, str) and _number_type(tp):
            # YAML 1.1 reads 1e-3 (no dot) as a string: convert, or name the field
            try:
                value = _number_type(tp)(value)
            except ValueError:
                raise SpecError(f"spec field {where}{name}={value!r}: must be a number, e.g. "
                                f"{where}{name}={'1e-3' if _number_type(tp) is float else '10'}") from None
        _check_scalar(f"{where}{name}", tp, value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # wrong value types that __post_init__ trips over
        raise SpecError(f"spec section {where or 'top level'}: {e}") from None


def to_dict(spec) -> dict:
    return dataclasses.asdict(spec)


def _set_path(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise SpecError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        if "=" not in item:
            raise SpecError(f"--set {item!r}: write it as section.field=value, e.g. recalibrate.steps=10")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), load_yaml(raw) if raw.strip() else "")
    return tree


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_tree(spec_or_preset: str) -> dict:
    path = Path(spec_or_preset)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SpecError(f"spec file {spec_or_preset} not found: give a YAML path or a preset ({', '.join(preset_names())})")
    else:
        path = PRESETS_DIR / f"{spec_or_preset}.yaml"
        if not path.is_file():
            raise SpecError(f"unknown preset {spec_or_preset!r}: choose one of {', '.join(preset_names())} or give a YAML file")
    try:
        with open(path) as f:  # a stream, so errors name the file
            tree = load_yaml(f) or {}
    except yaml.YAMLError as e:
        raise SpecError(f"spec file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise SpecError(f"spec file {path}: the top level must be a mapping of sections")
    base = tree.pop("extends", None)
    if base:  # a preset may extend another: shallow-merge each section
        parent = load_tree(base)
        for k, v in tree.items():
            parent[k] = {**parent.get(k, {}), **v} if isinstance(v, dict) and isinstance(parent.get(k), dict) else v
        tree = parent
    return tree


