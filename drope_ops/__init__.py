"""drope_ops: the library. Model surgery, DroPE attention, RoPE-scaling baselines, temperature fitting,
data packing and long-context evaluation. Imports no Ray, MLflow or DeepSpeed.

Importing the package registers the `drope` model type with transformers' Auto classes.
"""

from drope_ops.modeling import DropeConfig, DropeForCausalLM, DropeModel, register

register()

__all__ = ["DropeConfig", "DropeForCausalLM", "DropeModel"]
