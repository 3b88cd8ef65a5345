"""The workflow's stages, in order. Each module owns its config dataclass, its `run(spec, ctx)` and its
`STAGE` facts (workflows/stage.py); adding a stage is one module and one line here.

    fetch | pretrain -> drop_rope -> recalibrate -> fit_temperature -> evaluate
"""

from workflows.stages import drop_rope, evaluate, fetch, fit_temperature, pretrain, recalibrate

PIPELINE = (
    pretrain.STAGE,
    fetch.STAGE,
    drop_rope.STAGE,
    recalibrate.STAGE,
    fit_temperature.STAGE,
    evaluate.STAGE,
)


def enabled(spec) -> list:
    """The stages this spec runs, in order."""
    return [s for s in PIPELINE if s.enabled(spec)]


def by_name(name: str):
    return next(s for s in PIPELINE if s.name == name)
