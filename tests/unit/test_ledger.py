"""The ledger: atomic records, resume decisions by fingerprint, downstream invalidation."""

from workflows.ledger import FAILED, SUCCEEDED, Ledger, fingerprint
from workflows.pipeline import chain
from workflows.spec import load_spec


def fingerprints(overrides: list[str]) -> dict:
    """The fingerprint of every stage of the debug workflow, as the pipeline computes them for resume."""
    return {stage.name: fp for stage, _, fp in chain(load_spec("debug", overrides))}


def test_changed_spec_invalidates_exactly_downstream():
    """fetch -> drop_rope -> recalibrate -> fit_temperature -> evaluate (which reads fetch's model too):
    a changed section changes its stage's fingerprint and every stage downstream, none upstream."""
    base = fingerprints([])
    order = list(base)
    assert order == ["fetch", "drop_rope", "recalibrate", "fit_temperature", "evaluate"]
    assert len(set(base.values())) == len(base), "every stage has a fingerprint of its own"
    for override, first_changed in [("drop_rope.qk_norm=q", "drop_rope"), ("recalibrate.lr=3e-4", "recalibrate"),
                                    ("data.seq_len=48", "recalibrate"), ("evaluate.samples_per_cell=3", "evaluate")]:
        changed = fingerprints([override])
        split = order.index(first_changed)
        assert [changed[s] == base[s] for s in order] == [True] * split + [False] * (len(order) - split), override
    # recomputed alike: the fingerprint is a pure function of the spec
    assert fingerprints([]) == base
    assert fingerprint("a", {"x": 1}, ["f"]) != fingerprint("a", {"x": 1}, ["g"]), "inputs must count"


def test_skip_only_succeeded_with_same_fingerprint(tmp_path):
    ledger = Ledger(str(tmp_path / "run"))
    rec = ledger.start("a", "fp1", "mlflow-1")
    assert ledger.should_skip("a", "fp1") is None  # running (or interrupted) is not done
    ledger.finish(rec, FAILED, error="boom")
    assert ledger.should_skip("a", "fp1") is None
    rec = ledger.start("a", "fp1", "mlflow-2")
    assert rec.attempts == 2
    ledger.finish(rec, SUCCEEDED, output="/out", result={"loss": 1.5})
    done = ledger.should_skip("a", "fp1")
    assert done is not None and done.output == "/out" and done.result == {"loss": 1.5}
    assert ledger.should_skip("a", "fp2") is None


def test_records_are_whole_json_files(tmp_path):
    ledger = Ledger(str(tmp_path / "run"))
    ledger.finish(ledger.start("a", "fp", ""), SUCCEEDED)
    files = sorted(p.name for p in (tmp_path / "run" / "ledger").iterdir())
    assert files == ["a.json"]  # no temporary leftovers
