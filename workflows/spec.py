"""The workflow spec: typed dataclasses, loaded from YAML (a preset name or a file) with --set overrides.

    spec = load_spec("smollm2-135m-cpu", overrides=["recalibrate.steps=4", "evaluate.samples_per_cell=2"])

Every section is a dataclass with a docstring per field and validation in __post_init__ that names the
field and the fix. Stage sections come from the stage modules that own them (ModelConfig in fetch,
PretrainConfig, DropRopeConfig, RecalibrateConfig, TemperatureConfig, EvalConfig), the data section from
drope_ops.data; this file joins them. The naming rule: a section's dataclass is `<Section>Config`
(RecalibrateConfig, StorageConfig, ...); `WorkflowSpec` is the whole spec they make up. Loading YAML and --set lives in workflows/config.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from drope_ops.data import DataConfig
from drope_ops.errors import SpecError
from workflows.config import PRESETS_DIR, apply_overrides, from_dict, load_tree, load_yaml, preset_names, to_dict  # noqa: F401
from workflows.stages.drop_rope import DropRopeConfig
from workflows.stages.evaluate import EvalConfig
from workflows.stages.fetch import ModelConfig
from workflows.stages.fit_temperature import TemperatureConfig
from workflows.stages.pretrain import PretrainConfig
from workflows.recalibrate.config import RecalibrateConfig


@dataclass
class StorageConfig:
    root: str = ""
    """Where runs live: a local directory or s3://BUCKET/PREFIX shared by all nodes ('' = $DROPE_HOME/runs)."""
    shared_filesystem: bool = False
    """The local `root` is a file system every Ray node mounts (NFS, Lustre): allow it on a multi-node
    cluster. Off: a multi-node run needs s3:// storage."""

    def __post_init__(self):
        scheme = self.root.partition("://")[0] if "://" in self.root else ""
        if scheme and scheme != "s3":
            raise SpecError(f"storage.root={self.root!r}: {scheme}:// is not supported; use a local directory "
                            f"or s3://BUCKET/PREFIX")


TRACKING_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks")
"""URI schemes MLflow tracks to (a database scheme may carry a driver: postgresql+psycopg2)."""


@dataclass
class TrackingConfig:
    uri: str = ""
    """MLflow tracking URI ('' = $MLFLOW_TRACKING_URI, else a sqlite file under $DROPE_HOME)."""
    experiment: str = ""
    """MLflow experiment ('' = the spec's name, i.e. one experiment per model preset)."""

    def __post_init__(self):
        scheme = self.uri.partition(":")[0] if ":" in self.uri else ""
        if scheme and scheme.split("+")[0] not in TRACKING_SCHEMES:
            raise SpecError(f"tracking.uri={self.uri!r}: {scheme}: is not an MLflow tracking URI; use "
                            f"http(s)://HOST:PORT, sqlite:///FILE, file:///DIR or a database URI")


@dataclass
class RayConfig:
    address: str = ""
    """Ray cluster to join from the driver: HOST:PORT of its head's GCS (6379), ray://HOST:PORT or auto
    ('' = inside a Ray job: its cluster; else a local one)."""
    num_cpus: int | None = None
    """CPUs of the local Ray instance `drope run` starts (None = all)."""

    def __post_init__(self):
        target = self.address.removeprefix("ray://")
        host, _, port = target.rpartition(":")
        if self.address not in ("", "auto", "local") and (not host or "/" in target or not port.isdigit()):
            raise SpecError(f"ray.address={self.address!r}: give HOST:PORT of the head's GCS (e.g. 10.0.0.5:6379), "
                            "ray://HOST:10001 or auto; a dashboard URL (http://HEAD:8265) goes to `drope submit "
                            "--address`")
        if self.num_cpus is not None and not (isinstance(self.num_cpus, int) and self.num_cpus >= 1):
            raise SpecError(f"ray.num_cpus={self.num_cpus!r}: give a whole number >= 1, or leave it unset for all")


@dataclass
class ArchitectureConfig:
    """The base model's shape, in its config.json names (for `drope plan`'s FLOPs and memory)."""

    hidden_size: int = 0
    intermediate_size: int = 0
    num_hidden_layers: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    vocab_size: int = 0
    tie_word_embeddings: bool = False

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise SpecError(f"plan.architecture.{name}={getattr(self, name)!r}: give the config.json value")
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads

    @property
    def known(self) -> bool:
        return all((self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size))


@dataclass
class PlanConfig:
    """What `drope plan` assumes about the hardware, and the model's shape when it cannot read it."""

    gpu_memory_gb: float = 80.0
    """Memory of one GPU; `drope run` / `submit` refuse a GPU spec whose plan does not fit (unless --force)."""
    gpus: int | None = None
    """GPUs recalibration runs on (None: recalibrate.num_workers, or gpus_per_node when it is auto)."""
    gpus_per_node: int = 8
    """GPUs of one node (host RAM is given per node)."""
    peak_tflops: float = 989.0
    """Dense bf16 peak of one GPU, TFLOP/s (H100 SXM: 989)."""
    mfu: float = 0.35
    """Share of the peak a step achieves, counting recomputed FLOPs (GPU-hours = FLOPs / (peak * mfu))."""
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    """The base model's shape; unset (zeros): read from model.source's config.json when it is on disk."""

    def __post_init__(self):
        if not self.gpu_memory_gb > 0 or not 0 < self.mfu <= 1 or not self.peak_tflops > 0:
            raise SpecError("plan: gpu_memory_gb and peak_tflops must be > 0 and mfu in (0, 1]")
        if self.gpus is not None and self.gpus < 1 or self.gpus_per_node < 1:
            raise SpecError("plan.gpus and plan.gpus_per_node must be >= 1")


@dataclass
class WorkflowSpec:
    name: str = ""
    """Run family name: the MLflow experiment and the prefix of run ids (e.g. smollm2-135m-cpu)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base checkpoint."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """Optional from-scratch RoPE pretraining before DroPE (micro reproduction)."""
    drop_rope: DropRopeConfig = field(default_factory=DropRopeConfig)
    """How RoPE is dropped and QK-norm inserted."""
    data: DataConfig = field(default_factory=DataConfig)
    """Text for recalibration, temperature fitting and perplexity."""
    recalibrate: RecalibrateConfig = field(default_factory=RecalibrateConfig)
    """Recalibration at the original context (DeepSpeed ZeRO on Ray Train)."""
    fit_temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    """Softmax temperature (logit scale) fitting for longer contexts."""
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    """Long-context evaluation against RoPE-scaling baselines."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Where stage outputs and the ledger live."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray cluster."""
    plan: PlanConfig = field(default_factory=PlanConfig)
    """`drope plan`'s hardware assumptions (GPU memory, MFU) and the model's shape."""

    def __post_init__(self):
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise SpecError(f"name={self.name!r}: give the spec a name of letters, digits, '-', '_' or '.'")
        if self.pretrain.enabled and self.model.already_drope:
            raise SpecError("pretrain.enabled and model.already_drope exclude each other: a release is already "
                            "DroPE; unset one")
        if not self.pretrain.enabled and not self.model.source:
            raise SpecError("model.source is empty: give hf://ORG/NAME, s3://BUCKET/PREFIX, a directory or a .gguf")
        targets = [f for f in self.fit_temperature.extension_factors]
        bad = [f for f in targets if f <= 1]
        if bad:
            raise SpecError(
                f"fit_temperature.extension_factors {bad}: target lengths must exceed the training length "
                "(factors > 1, e.g. [2, 4])"
            )
        if self.data.heldout_docs == 1 and "perplexity" in self.evaluate.tasks:
            # held-out documents alternate: validation (the fit's), test (the evaluation's perplexity)
            raise SpecError("data.heldout_docs=1 leaves the evaluation's perplexity no held-out document of its "
                            "own (the temperature is fitted on the first); give data.heldout_docs >= 2")


def load_spec(spec_or_preset: str, overrides: list[str] | None = None) -> WorkflowSpec:
    tree = apply_overrides(load_tree(spec_or_preset), overrides or [])
    return from_dict(WorkflowSpec, tree)


def spec_from_yaml(text: str) -> WorkflowSpec:
    """The WorkflowSpec a run's spec.yaml holds."""
    return from_dict(WorkflowSpec, load_yaml(text))
