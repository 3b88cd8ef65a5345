"""drope_ops: the library. Model surgery, DroPE attention, RoPE-scaling baselines, temperature fitting,
data packing and long-context evaluation. Imports no Ray, MLflow or DeepSpeed.

The `drope` model type is registered with transformers' Auto classes as soon as transformers is
imported (now, if it already is; otherwise right after its first import), so code that needs no model
(storage, fetch, the CLI's parsers) does not pay for importing transformers (several seconds).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__all__ = ["DropeConfig", "DropeForCausalLM", "DropeModel"]


def _register() -> None:
    partial = sys.modules.get("drope_ops.modeling")
    if partial is not None and not hasattr(partial, "register"):
        return  # modeling is importing transformers right now; it registers at its own end
    from drope_ops.modeling import register

    register()


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds `transformers` once, wrapping its loader so the drope type is registered after it loads."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_and_register
        return spec


def __getattr__(name: str):
    if name in __all__:
        from drope_ops import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'drope_ops' has no attribute {name!r}")


if "transformers" in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
