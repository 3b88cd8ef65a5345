"""Fit the DroPE softmax temperature: beta per target length, then c in beta(s) = 1 + c ln s.

For a target length L = s * C_train, beta(L) is the static logit scale minimising the mean next-token
loss on held-out packed sequences of length L, found by scipy's bounded Brent search
(`minimize_scalar(method="bounded")`) capped at `max_evals` loss evaluations. Then c is the least
squares fit of beta - 1 = c ln s over the lengths (a line through (s=1, beta=1): at the training
context the model needs no correction). The paper's fits: c = 0.103 (SmolLM-DroPE), 0.412 (from
scratch).

    fit = fit_beta(lambda b: loss_at_scale(model, blocks, b), bounds=(0.5, 3.0), max_evals=12)
    c = fit_c({2: fit2.beta, 4: fit4.beta})
    fits = fit_lengths(model, blocks, [4096, 8192])   # {L: BetaFit}; blocks (N, 8192), forwards shared

Several lengths fitted on the same held-out sequences (the first L tokens of each) share forwards: the
scale is static during the search and the model causal, so one forward at L at scale beta also gives
the loss of every shorter length at beta, and a shorter length's search that asks for a beta a longer
one evaluated gets its loss without a forward of its own. Bounded Brent's first two points depend on
the bounds alone, so each length after the longest saves at least two forwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from drope_ops.errors import SpecError

MAX_EVALS_CAP = 12


@dataclass
class BetaFit:
    """Result of one bounded scalar search."""

    beta: float
    """The logit scale with the lowest loss seen."""
    loss: float
    """Mean next-token loss (nats/token) at `beta`."""
    evals: list[tuple[float, float]] = field(default_factory=list)
    """Every (beta, loss) evaluated, in order; len(evals) <= max_evals."""
    shared: int = 0
    """Evaluations whose loss came from a longer length's forward (fit_lengths), not a forward of this length."""


def fit_beta(
    loss_at: Callable[[float], float],
    bounds: tuple[float, float] = (0.5, 3.0),
    max_evals: int = MAX_EVALS_CAP,
    xatol: float = 1e-3,
    progress: Callable[[float, float], None] | None = None,
) -> BetaFit:
    """Minimise loss_at(beta) over `bounds` with bounded Brent, at most `max_evals` evaluations.

    scipy's bounded method evaluates once per iteration (maxiter caps evaluations); a counter guards
    the cap regardless, and the best point seen (not scipy's last iterate) is returned.
    """
    from scipy.optimize import minimize_scalar

    lo, hi = float(bounds[0]), float(bounds[1])
    if not 0 < lo < hi:
        raise SpecError(f"temperature bounds {bounds} must satisfy 0 < low < high, e.g. [0.5, 3.0]")
    if not 3 <= max_evals <= MAX_EVALS_CAP:
        raise SpecError(f"max_evals={max_evals} must be in 3..{MAX_EVALS_CAP}")
    evals: list[tuple[float, float]] = []

    class _Budget(Exception):
        pass

    def counted(beta: float) -> float:
        if len(evals) >= max_evals:
            raise _Budget
        loss = float(loss_at(float(beta)))
        evals.append((float(beta), loss))
        if progress:
            progress(float(beta), loss)
        return loss

    try:
        minimize_scalar(counted, bounds=(lo, hi), method="bounded",
                        options={"maxiter": max_evals, "xatol": xatol})
    except _Budget:
        pass
    beta, loss = min(evals, key=lambda e: e[1])
    return BetaFit(beta=beta, loss=loss, evals=evals)


def fit_c(betas: dict[float, float]) -> float:
    """Least squares c in beta(s) - 1 = c ln s over {s: beta} (lengths with s > 1 carry the fit)."""
    pairs = [(math.log(float(s)), float(b) - 1.0) for s, b in betas.items() if float(s) > 1.0]
    if not pairs:
        raise SpecError("fitting c needs at least one extension factor above 1, e.g. [2, 4]")
    return sum(x * y for x, y in pairs) / sum(x * x for x, _ in pairs)


def beta_of(s: float, c: float) -> float:
    """beta(s) = 1 + c ln s, the fitted scale at extension factor s (1.0 at s <= 1)."""
    return 1.0 + c * math.log(s) if s > 1 else 1.0


def loss_at_scale(model, blocks, beta: float) -> float:
    """Mean next-token loss of a DroPE model on `blocks` (N, L) with static logit scale `beta`."""
    L = blocks.shape[-1]
    return prefix_losses(model, blocks, beta, [L])[L]


def prefix_losses(model, blocks, beta: float, lengths) -> dict[int, float]:
    """{L: mean next-token loss on the first L tokens of `blocks`} at static logit scale `beta`, one
    forward of each row.

    beta multiplies the checkpoint's own static scale (as the dynamic scale does in the model): it sets
    config.logit_scale = logit_scale * beta and switches the dynamic scale off for the call (the
    attention layers read the shared config at every forward), then restores both.
    """
    from drope_ops.evals.perplexity import prefix_nll

    cfg = model.config
    if getattr(cfg, "model_type", None) != "drope":
        raise SpecError(f"temperature fitting needs a DroPE checkpoint (model_type 'drope'), "
                        f"got {getattr(cfg, 'model_type', None)!r}; run drop-rope first")
    saved = (cfg.logit_scale, cfg.logit_scale_c)
    cfg.logit_scale, cfg.logit_scale_c = saved[0] * float(beta), None
    try:
        return {L: total / count for L, (total, count) in prefix_nll(model, blocks, lengths).items()}
    finally:
        cfg.logit_scale, cfg.logit_scale_c = saved


def fit_length(model, blocks, bounds=(0.5, 3.0), max_evals: int = MAX_EVALS_CAP, progress=None) -> BetaFit:
    """beta for one target length: the bounded search over loss_at_scale on `blocks` (N, L)."""
    return fit_beta(lambda b: loss_at_scale(model, blocks, b), bounds, max_evals, progress=progress)


def fit_lengths(model, blocks, lengths, bounds=(0.5, 3.0), max_evals: int = MAX_EVALS_CAP,
                progress: Callable[[int, float, float, bool], None] | None = None) -> dict[int, BetaFit]:
    """{L: beta fit} for every L in `lengths` on the first L tokens of `blocks` (N, >= max(lengths)),
    longest first; each forward scores every shorter length too, and a search reuses those losses.
    `progress(L, beta, loss, shared)` after each evaluation (shared: no forward of its own)."""
    lengths = sorted({int(L) for L in lengths}, reverse=True)
    seen: dict[float, dict[int, float]] = {}  # beta -> {L: loss}

    def search(L: int) -> BetaFit:
        shared = []

        def loss_at(beta: float) -> float:
            hit = L in seen.get(beta, {})
            if hit:
                shared.append(beta)
            else:
                seen.setdefault(beta, {}).update(prefix_losses(model, blocks, beta, [x for x in lengths if x <= L]))
            if progress:
                progress(L, beta, seen[beta][L], hit)
            return seen[beta][L]

        fit = fit_beta(loss_at, bounds, max_evals)
        fit.shared = len(shared)
        return fit

    return {L: search(L) for L in lengths}
