"""The ledger: atomic records, resume decisions by fingerprint, downstream invalidation."""

from workflows.ledger import FAILED, SUCCEEDED, Ledger, fingerprint


def chain(specs: dict) -> dict:
    """Fingerprints of a 3-stage chain a -> b -> c from per-stage specs."""
    fa = fingerprint("a", specs["a"], [])
    fb = fingerprint("b", specs["b"], [fa])
    fc = fingerprint("c", specs["c"], [fb])
    return {"a": fa, "b": fb, "c": fc}


def test_changed_spec_invalidates_exactly_downstream():
    base = chain({"a": {"x": 1}, "b": {"y": 1}, "c": {"z": 1}})
    mid = chain({"a": {"x": 1}, "b": {"y": 2}, "c": {"z": 1}})
    assert mid["a"] == base["a"] and mid["b"] != base["b"] and mid["c"] != base["c"]
    last = chain({"a": {"x": 1}, "b": {"y": 1}, "c": {"z": 9}})
    assert (last["a"], last["b"]) == (base["a"], base["b"]) and last["c"] != base["c"]


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
