"""The workflow's stages, in order. Each module owns its config dataclass, its `run(spec, ctx)` and its
`STAGE` facts (workflows/stage.py); adding a stage is one module and one line here.

    fetch | pretrain -> drop_rope -> recalibrate -> fit_temperature -> evaluate
    fetch_drope -> fetch_base -> fit_temperature -> evaluate          (model.already_drope)
"""

from workflows.stages import drop_rope, evaluate, fetch, fit_temperature, pretrain, recalibrate

PIPELINE = (
    pretrain.STAGE,
    fetch.STAGE,
    fetch.RELEASE_STAGE,
    fetch.BASE_STAGE,
    drop_rope.STAGE,
    recalibrate.STAGE,
    fit_temperature.STAGE,
    evaluate.STAGE,
)


MAKE_DROPE = ("drop_rope", "recalibrate")
"""What a checkpoint that is already DroPE (model.already_drope) skips."""


def enabled(spec) -> list:
    """The stages this spec runs, in order."""
    skipped = MAKE_DROPE if spec.model.already_drope else ()
    return [s for s in PIPELINE if s.enabled(spec) and s.name not in skipped]


def by_name(name: str):
    return next(s for s in PIPELINE if s.name == name)
