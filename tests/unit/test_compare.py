"""`drope compare` on two runs' ledgers whose MLflow store is not on this box (another box's sqlite
file): the ledger's facts and the results.json cells, side by side; an unknown run id is one line.
The MLflow path (cells from the evaluate run's metrics) runs in tests/e2e/test_concurrency.py."""

import json

import pytest
import yaml

from workflows.cli import main
from workflows.ledger import Ledger, StageRecord
from workflows.spec import load_spec, to_dict


def write_run(root, run_id, c, final_loss, scores):
    ledger = Ledger(str(root / run_id))
    ledger.write_run({"run_id": run_id, "status": "succeeded", "tracking_uri": f"sqlite:///{root}/elsewhere.db"})
    ledger.write_spec(yaml.safe_dump(to_dict(load_spec("debug", []))))
    out = root / run_id / "stages" / "evaluate"
    out.mkdir(parents=True)
    results = [{"variant": v, "task": t, "factor": L / 128, "length": L, "score": s} for (t, v, L), s in scores.items()]
    (out / "results.json").write_text(json.dumps({"results": results}))
    records = {"recalibrate": {"steps": 4, "final_loss": final_loss}, "fit_temperature": {"c": c}, "evaluate": {}}
    for stage, result in records.items():
        ledger.put(StageRecord(stage=stage, status="succeeded", result=result,
                               output=str(out) if stage == "evaluate" else ""))


@pytest.fixture
def runs(tmp_path):
    write_run(tmp_path, "run-a", 0.103, 5.25, {("niah_single_1", "drope", 512): 50.0, ("perplexity", "drope", 256): 188.5})
    write_run(tmp_path, "run-b", 0.412, 4.5, {("niah_single_1", "drope", 512): 75.0, ("niah_single_1", "rope", 512): None})
    return tmp_path


def test_two_runs_side_by_side(runs, capsys):
    assert main(["compare", "run-a", "run-b", "--storage", str(runs)]) == 0
    lines = {ln.rsplit(None, 2)[0].strip(): ln.split()[-2:] for ln in capsys.readouterr().out.splitlines()[1:]}
    assert lines["logit_scale_c"] == ["0.103", "0.412"] and lines["final loss"] == ["5.25", "4.5"]
    assert lines["niah_single_1/drope @512"] == ["50", "75"]
    assert lines["perplexity/drope @256"] == ["188.5", "-"]  # a cell one run lacks
    assert "niah_single_1/rope @512" not in lines  # no score: no row

    assert main(["compare", "run-a", "run-b", "--storage", str(runs), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    a, b = out["runs"]
    assert (a["run_id"], a["logit_scale_c"], a["cells_from"]) == ("run-a", 0.103, "results.json")
    assert b["cells"] == {"niah_single_1/drope": {"512": 75.0}} and b["recalibration_tokens"] is None
    assert not (runs / "elsewhere.db").exists()  # another box's store is not created here


def test_unknown_run_id_is_one_line(runs, capsys):
    assert main(["compare", "run-a", "no-such-run", "--storage", str(runs)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "unknown run id 'no-such-run'" in err
    assert main(["compare"]) == 2 and "RUN_ID" in capsys.readouterr().err
