"""An official DroPE release evaluated as it is, through the real CLI: `drope run sakana-debug-eval` fetches
the tiny llama_drope checkpoint (imported as data), fetches its RoPE base, fits the temperature and scores
DroPE against the baselines; drop_rope and recalibrate do not run."""

import json
from pathlib import Path

from mlflow import MlflowClient

from tests.e2e.test_workflow import env  # noqa: F401  (the CLI's environment: DROPE_HOME, MLflow server)
from tests.fixtures.workflow_services import evaluation_cells, run_drope


def test_release_is_fitted_and_scored_without_recalibration(env, mlflow_server):
    run_drope(["run", "sakana-debug-eval", "--run-id", "rel-1"], env, check=True)
    proc = run_drope(["status", "rel-1", "--json"], env, timeout=120, check=True)
    stages = {s["stage"]: s for s in json.loads(proc.stdout)["stages"]}
    assert list(stages) == ["fetch_drope", "fetch_base", "fit_temperature", "evaluate"]
    assert all(s["status"] == "succeeded" for s in stages.values()), stages
    config = json.loads((Path(stages["fetch_drope"]["output"]) / "config.json").read_text())
    assert config["model_type"] == "drope" and config["source_layout"] == "llama_drope/qk_norm_nope"
    cells = evaluation_cells(stages["evaluate"]["output"])
    assert {("perplexity/drope", 256), ("perplexity/yarn", 256), ("niah_single_1/drope", 512)} <= set(cells), cells
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("sakana-debug-eval")
    runs = client.search_runs([exp.experiment_id], "tags.`drope.run_id` = 'rel-1' and tags.`drope.kind` = 'workflow'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
