"""The micro reproduction's chain with a CI-sized budget: a pretrain stage from random init (BPE
tokenizer trained on Shakespeare, copy warm-up phase, then text + needles + copy documents) feeding
drop_rope -> recalibrate -> fit_temperature -> evaluate. The full run: `drope run micro-repro`."""

import json
import os
import sqlite3
from pathlib import Path

from tests.fixtures.workflow_services import VENV_BIN, run_drope

CI_BUDGET = [
    "--set", "pretrain.vocab_size=512",
    "--set", "pretrain.warmup={steps: 3, seq_len: 64, copies: 48, global_batch: 8, micro_batch: 4}",
    "--set", "pretrain.train={steps: 3, global_batch: 8, micro_batch: 4, num_workers: 2, cpus_per_worker: 1, "
             "lr: 3.0e-3, warmup_steps: 1, checkpoint_every: 3, loss_spike_factor: null}",
    "--set", "data.max_tokens=30000", "--set", "data.needles=16", "--set", "data.copies=16",
    "--set", "recalibrate.steps=3", "--set", "recalibrate.global_batch=8", "--set", "recalibrate.micro_batch=4",
    "--set", "recalibrate.checkpoint_every=3", "--set", "recalibrate.warmup_steps=1",
    "--set", "fit_temperature.extension_factors=[2]", "--set", "fit_temperature.max_evals=3",
    "--set", "fit_temperature.sequences_per_length=1",
    "--set", "evaluate.variants=[drope, rope]", "--set", "evaluate.extension_factors=[1, 2]",
    "--set", "evaluate.samples_per_cell=2",
]


def test_micro_repro_chain_starts_at_random_init(tmp_path):
    env = {**os.environ, "DROPE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    run_drope(["run", "micro-repro", "--run-id", "micro-ci", *CI_BUDGET], env, timeout=1800, check=True)

    status = json.loads(run_drope(["status", "micro-ci", "--json"], env, check=True).stdout)
    recs = {s["stage"]: s for s in status["stages"]}
    assert list(recs) == ["pretrain", "drop_rope", "recalibrate", "fit_temperature", "evaluate"]
    assert all(r["status"] == "succeeded" for r in recs.values()), recs

    # the pretrained model carries its own BPE (digits split), sized into the model's config
    from transformers import AutoConfig, AutoTokenizer

    pretrained = Path(recs["pretrain"]["output"])
    tok, cfg = AutoTokenizer.from_pretrained(pretrained), AutoConfig.from_pretrained(pretrained)
    assert cfg.vocab_size == len(tok) <= 512 and cfg.max_position_embeddings == 256
    assert len(tok("4229316", add_special_tokens=False)["input_ids"]) == 7

    # both phases tracked in the pretrain stage's MLflow run: warm-up metrics under their own prefix
    db = sqlite3.connect(tmp_path / "home" / "mlflow.db")
    keys = {k for (k,) in db.execute("select distinct key from metrics")}
    assert {"warmup_loss", "loss"} <= keys, keys
    warm = [v for (v,) in db.execute("select value from metrics where key = 'warmup_loss'")]
    assert len(warm) >= 3 and all(0 < v < 20 for v in warm)
    assert all(s == "FINISHED" for (s,) in db.execute("select status from runs"))

    table = json.loads((Path(recs["evaluate"]["output"]) / "results.json").read_text())
    cells = {(r["variant"], r["task"], r["length"]) for r in table["results"]}
    assert {("drope", "niah_single_1", 256), ("rope", "niah_single_1", 512), ("drope", "perplexity", 512)} <= cells
