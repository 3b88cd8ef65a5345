"""Bad input never hurts: each case goes through the real CLI and must end in ONE error line naming
the field or file and the fix, a non-zero exit, the ledger and MLflow runs FAILED (none RUNNING), and
no half-written checkpoint. (NaN loss mid-recalibration: tests/e2e/test_workflow.py.)

Cost: spec cases are refused in a second in-process; stage cases in-process share one local Ray;
the SUBPROCESS cases pay a fresh interpreter (and a Ray start) each, as a user's shell does."""

import json
import os
import shutil
from types import SimpleNamespace
from pathlib import Path

import pytest
from mlflow import MlflowClient

from drope_ops.manifest import write_manifest
from tests.fixtures.lm_eval_tasks import write_task_sets
from tests.fixtures.logs import tracebacks
from tests.fixtures.services import s3_env_vars
from tests.fixtures.workflow_services import VENV_BIN, run_drope
from workflows.cli import main as cli_main


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory, debug_checkpoint, moto_server):
    """Broken copies of the tiny debug checkpoint, one per way a user's checkpoint can be wrong."""
    root = tmp_path_factory.mktemp("bad")
    out = {}

    gpt2 = root / "gpt2"
    shutil.copytree(debug_checkpoint, gpt2)
    cfg = json.loads((gpt2 / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_positions=128, n_embd=64)
    cfg.pop("rope_parameters", None)
    (gpt2 / "config.json").write_text(json.dumps(cfg))
    out["gpt2"] = gpt2

    no_config = root / "no-config"
    shutil.copytree(debug_checkpoint, no_config)
    (no_config / "config.json").unlink()
    out["no_config"] = no_config

    pickle_only = root / "pickle-only"
    shutil.copytree(debug_checkpoint, pickle_only)
    for p in pickle_only.glob("*.safetensors"):
        p.rename(p.with_name("pytorch_model.bin"))
    out["pickle"] = pickle_only

    bad_sha = root / "bad-sha"
    shutil.copytree(debug_checkpoint, bad_sha)
    write_manifest(bad_sha)
    shard = next(bad_sha.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    out["bad_sha"] = bad_sha

    bad_yaml = root / "bad.yaml"
    bad_yaml.write_text("name: x\nmodel: [unclosed\n")
    out["bad_yaml"] = bad_yaml
    unknown_field = root / "unknown-field.yaml"
    unknown_field.write_text("extends: debug\nname: debug\nrecalibrate: {stepz: 3}\n")
    out["unknown_field"] = unknown_field
    wrong_column = root / "corpus.jsonl"  # rows carry "body", the spec asks for "content"
    wrong_column.write_text("".join(json.dumps({"body": "to be or not to be " * 40}) + "\n" for _ in range(20)))
    out["wrong_column"] = wrong_column
    import boto3  # a plain HF layout in S3 (no drope-manifest.json) that lacks its tokenizer

    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                      **{k.lower(): v for k, v in s3_env_vars(moto_server).items() if k.startswith("AWS_") and "KEY" in k})
    bucket = "drope-bad-inputs"
    s3.create_bucket(Bucket=bucket)
    for p in debug_checkpoint.iterdir():  # a plain HF layout fetch accepts, but without its tokenizer
        if p.is_file() and p.name not in ("drope-manifest.json", "tokenizer.json"):
            s3.upload_file(str(p), bucket, f"models/no-tokenizer/{p.name}")
    out["s3_no_tokenizer"] = f"s3://{bucket}/models/no-tokenizer"

    no_tokenizer = root / "no-tokenizer"
    shutil.copytree(debug_checkpoint, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    out["no_tokenizer"] = no_tokenizer
    duplicate_key = root / "duplicate-key.yaml"
    duplicate_key.write_text("extends: debug\nname: debug\nrecalibrate:\n  steps: 3\n  lr: 1e-3\n  steps: 30\n")
    out["duplicate_key"] = duplicate_key
    earlier_eval = root / "earlier-eval"  # results a user already has: never overwritten without --overwrite
    earlier_eval.mkdir()
    (earlier_eval / "results.json").write_text('{"earlier": true}')
    out["earlier_eval"] = earlier_eval
    out["debug"] = debug_checkpoint
    out["lm_eval_tasks"] = write_task_sets(root / "lm-eval-tasks")  # toy_mc, toy_long (longcxt), toy_offline (no data)
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory, mlflow_server, moto_server):
    e = {**os.environ, "DROPE_HOME": str(tmp_path_factory.mktemp("home")), "MLFLOW_TRACKING_URI": mlflow_server,
         "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
         **s3_env_vars(moto_server)}  # S3 cases talk to moto, never to AWS
    e.pop("RAY_ADDRESS", None)
    return e


# A representative handful runs as real subprocesses (`python -m workflows.cli`); the rest call the
# same entry point, workflows.cli.main, in this process (the same code path, seconds instead of a
# fresh interpreter each).
SUBPROCESS = {"unknown-preset", "zero-steps", "mlflow-unreachable", "ray-nothing-listening", "resume-unknown-run",
              "gpt2-architecture", "ray-address-unreachable",
              # lm-eval logs through the root logger, whose handler an earlier in-process case left on a closed stream
              "eval-lm-eval-data-not-there", "eval-lm-eval-rope-past-positions", "lm-eval"}


@pytest.fixture(scope="module")
def inproc_ray():
    """In-process stage cases share the one local Ray the first of them starts; stopped at the end."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def drope(case, argv, env, monkeypatch, capsys, timeout=300):
    if case in SUBPROCESS:
        return run_drope(argv, env, timeout=timeout)
    for k in ("DROPE_HOME", "MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE", *s3_env_vars("x")):
        monkeypatch.setenv(k, env[k])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    capsys.readouterr()
    rc = cli_main(list(argv))
    out = capsys.readouterr()
    return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)


# (id, argv builder, words the one error line must contain, does a run get created?)
SPEC_CASES = [
    ("unknown-preset", lambda b: ["run", "smollm-9b"], ["unknown preset", "smollm-9b", "debug"]),
    ("unknown-field", lambda b: ["run", str(b["unknown_field"])], ["stepz", "steps"]),
    ("bad-yaml", lambda b: ["run", str(b["bad_yaml"])], ["bad.yaml", "YAML"]),
    ("target-not-longer", lambda b: ["run", "debug", "--set", "fit_temperature.extension_factors=[1]"],
     ["fit_temperature.extension_factors", "> 1"]),
    ("zero-steps", lambda b: ["run", "debug", "--set", "recalibrate.steps=0"], ["steps"]),
    ("negative-steps", lambda b: ["run", "debug", "--set", "recalibrate.steps=-5"], ["steps"]),
    ("batch-not-divisible", lambda b: ["run", "debug", "--set", "recalibrate.global_batch=3"], ["global_batch"]),
    ("lr-zero", lambda b: ["run", "debug", "--set", "recalibrate.lr=0"], ["lr"]),
    ("weight-decay-negative", lambda b: ["run", "debug", "--set", "recalibrate.weight_decay=-1"],
     ["recalibrate.weight_decay=-1", ">= 0"]),
    ("betas-out-of-range", lambda b: ["run", "debug", "--set", "recalibrate.betas=[0.9,1.5]"],
     ["betas=[0.9, 1.5]", "[0, 1)"]),
    ("eval-factor-twice", lambda b: ["run", "debug", "--set", "evaluate.extension_factors=[1,2,2]"],
     ["evaluate.extension_factors", "twice"]),
    ("fit-factor-twice", lambda b: ["run", "debug", "--set", "fit_temperature.extension_factors=[2,2.0]"],
     ["fit_temperature.extension_factors", "twice"]),
    ("set-without-equals", lambda b: ["run", "debug", "--set", "recalibrate.steps"], ["--set", "="]),
    ("mlflow-unreachable", lambda b: ["run", "debug", "--set", "tracking.uri=http://127.0.0.1:9"],
     ["tracking.uri", "unreachable"]),
    ("no-such-bucket", lambda b: ["run", "debug", "--set", "storage.root=s3://drope-no-such-bucket-x1/runs"],
     ["drope-no-such-bucket-x1"]),
    ("ray-nothing-listening", lambda b: ["submit", "debug", "--address", "http://127.0.0.1:9"],
     ["--address", "127.0.0.1:9"]),
    ("resume-unknown-run", lambda b: ["resume", "no-such-run-42"], ["no-such-run-42"]),
    ("status-unknown-run", lambda b: ["status", "no-such-run-42"], ["no-such-run-42"]),
    ("unknown-asset", lambda b: ["run", "debug", "--set", "model.source=asset:gpt-5"], ["asset:gpt-5"]),
    # more that users plausibly get wrong
    ("spec-file-missing", lambda b: ["run", "no-such-spec.yaml"], ["no-such-spec.yaml", "preset"]),
    ("lr-negative", lambda b: ["run", "debug", "--set", "recalibrate.lr=-1e-3"], ["recalibrate.lr", "> 0"]),
    ("steps-not-a-number", lambda b: ["run", "debug", "--set", "recalibrate.steps=ten"],
     ["recalibrate.steps", "number"]),
    ("qk-norm-typo", lambda b: ["run", "debug", "--set", "drop_rope.qk_norm=both"], ["drop_rope.qk_norm", "qk"]),
    ("negative-context", lambda b: ["run", "debug", "--set", "model.original_context=-1"],
     ["model.original_context"]),
    ("set-unknown-section", lambda b: ["run", "debug", "--set", "recalibrat.steps=3"], ["recalibrat"]),
    ("plan-unknown-field", lambda b: ["plan", "debug", "--set", "data.seqlen=64"], ["seqlen"]),
    ("lineage-unknown-run", lambda b: ["lineage", "no-such-run-42"], ["no-such-run-42"]),
    # issue 17: mistakes caught before any work
    ("duplicate-key", lambda b: ["run", str(b["duplicate_key"])], ["duplicate-key.yaml", "'steps'", "line 6"]),
    ("duplicate-key-in-set", lambda b: ["plan", "debug", "--set", "recalibrate={steps: 1, steps: 2}"],
     ["duplicate key 'steps'"]),
    ("eval-existing-output", lambda b: ["eval", str(b["earlier_eval"]), "--base", str(b["debug"]), "--variants",
                                        "rope", "--original-context", "128"], ["earlier-eval", "--overwrite"]),
    ("eval-no-tokenizer", lambda b: ["eval", str(b["no_tokenizer"]) + "-eval", "--base", str(b["no_tokenizer"]),
                                     "--variants", "rope", "--original-context", "128"],
     ["--base", "no tokenizer files", "tokenizer.json"]),
    ("eval-base-not-a-directory", lambda b: ["eval", "/tmp/drope-never-written", "--base", "/nonexistent/ckpt",
                                             "--variants", "rope", "--original-context", "128"],
     ["--base", "/nonexistent/ckpt"]),
    ("fetch-no-tokenizer", lambda b: ["fetch", str(b["no_tokenizer"]), str(b["no_tokenizer"]) + "-fetched"],
     ["no tokenizer files", "tokenizer.json"]),
    ("eval-zero-context", lambda b: ["eval", "/tmp/drope-never-written", "--base", str(b["debug"]), "--variants",
                                     "rope", "--original-context", "0"], ["evaluate.original_context", ">= 1"]),
    ("eval-negative-ppl-sequences", lambda b: ["eval", "/tmp/drope-never-written", "--base", str(b["debug"]),
                                               "--variants", "rope", "--original-context", "128",
                                               "--ppl-sequences", "-1"], ["evaluate.perplexity_sequences"]),
    ("eval-zero-longbench-limit", lambda b: ["eval", "/tmp/drope-never-written", "--base", str(b["debug"]),
                                             "--original-context", "128", "--variants", "rope",
                                             "--longbench-limit", "0"], ["evaluate.longbench_limit"]),
    # lm-evaluation-harness tasks (evaluate.tasks lm_eval:<name>), refused before a result is written
    ("eval-lm-eval-unknown-task", lambda b: ["eval", "/tmp/drope-never-written", "--base", str(b["debug"]),
                                             "--variants", "rope", "--original-context", "128", "--tasks",
                                             "lm_eval:arc_eazy"], ["lm_eval:arc_eazy", "no task", "arc_easy"]),
    ("eval-lm-eval-data-not-there", lambda b: ["eval", "/tmp/drope-never-written", "--base", str(b["debug"]),
                                               "--variants", "rope", "--original-context", "128", "--tasks",
                                               "lm_eval:toy_offline", "--lm-eval-include-path", str(b["lm_eval_tasks"])],
     ["lm_eval:toy_offline", "missing/toy.jsonl", "evaluate.lm_eval_include_path"]),
    ("eval-lm-eval-rope-past-positions", lambda b: ["eval", "/tmp/drope-never-written", "--base", str(b["debug"]),
                                                    "--variants", "rope", "--original-context", "128", "--tasks",
                                                    "lm_eval:toy_long", "--factors", "1", "2", "--lm-eval-include-path",
                                                    str(b["lm_eval_tasks"])],
     ["lm_eval:toy_long at 256 tokens", "max_position_embeddings is 128", "evaluate.variants"]),
    ("drop-rope-zero-context", lambda b: ["drop-rope", str(b["debug"]), "/tmp/drope-never-written",
                                          "--original-context", "0"], ["original_context=0"]),
    ("list-given-a-number", lambda b: ["run", "debug", "--set", "fit_temperature.extension_factors=4"],
     ["fit_temperature.extension_factors", "list", "[4]"]),
    ("list-given-a-word", lambda b: ["run", "debug", "--set", "evaluate.variants=rope"],
     ["evaluate.variants", "list", "[rope]"]),
    ("ray-zero-cpus", lambda b: ["run", "debug", "--set", "ray.num_cpus=0"], ["ray.num_cpus", ">= 1"]),
    ("storage-unknown-scheme", lambda b: ["run", "debug", "--set", "storage.root=gs://b/runs"],
     ["storage.root", "gs://", "s3://"]),
    ("tracking-unknown-scheme", lambda b: ["run", "debug", "--set", "tracking.uri=ftp://x"], ["tracking.uri", "ftp"]),
    ("source-unknown-scheme", lambda b: ["run", "debug", "--set", "model.source=gs://b/m"], ["model.source", "gs://"]),
    ("fetch-without-dest", lambda b: ["fetch", str(b["debug"])], ["dest", "drope fetch --help"]),
    ("recalibrate-unknown-flag", lambda b: ["recalibrate", str(b["debug"]), "/tmp/drope-never-written", "--stepz",
                                            "3"], ["--stepz", "drope recalibrate --help"]),
    # the workflow commands' flags, through the same one-line Parser
    ("run-unknown-flag", lambda b: ["run", "debug", "--run-idd", "x"], ["--run-idd", "drope run --help"]),
    ("submit-without-address", lambda b: ["submit", "debug"], ["--address", "drope submit --help"]),
    ("status-without-run-id", lambda b: ["status"], ["run_id", "drope status --help"]),
    ("resume-flag-typo", lambda b: ["resume", "x", "--takeover"], ["--takeover", "drope resume --help"]),
    ("run-id-a-path", lambda b: ["run", "debug", "--run-id", "../escaped"], ["run id '../escaped'", "letters"]),
    ("resume-run-id-a-path", lambda b: ["resume", "a/b"], ["run id 'a/b'"]),
    ("ray-address-dashboard-url", lambda b: ["run", "debug", "--set", "ray.address=http://127.0.0.1:8265"],
     ["ray.address", "HOST:PORT", "drope submit"]),
    ("steps-given-true", lambda b: ["run", "debug", "--set", "recalibrate.steps=true"],
     ["recalibrate.steps=true", "number"]),
    ("lr-infinite", lambda b: ["run", "debug", "--set", "recalibrate.lr=.inf"], ["recalibrate.lr", "finite"]),
    ("betas-one-value", lambda b: ["run", "debug", "--set", "recalibrate.betas=[0.9]"],
     ["recalibrate.betas", "exactly 2"]),
    ("rope-layer-negative", lambda b: ["run", "debug", "--set", "drop_rope.rope_layers=[-1]"],
     ["drop_rope.rope_layers", "-1"]),
    ("eval-drope-without-checkpoint", lambda b: ["eval", "/tmp/drope-never-written", "--base", str(b["debug"]),
                                                 "--variants", "drope", "rope", "--original-context", "128"],
     ["--variants drope", "--drope CHECKPOINT"]),
    ("eval-baselines-without-base", lambda b: ["eval", "/tmp/drope-never-written", "--drope", str(b["debug"]),
                                               "--variants", "drope", "yarn"], ["--variants yarn", "--base"]),
    ("fit-temperature-bounds-reversed", lambda b: ["fit-temperature", str(b["debug"]), "/tmp/drope-never-written",
                                                   "--bounds", "3", "0.5"], ["fit_temperature.bounds", "low < high"]),
]

# These pass spec validation, so a run starts and the failing stage must be recorded as FAILED.
STAGE_CASES = [
    ("gpt2-architecture", lambda b: ["--set", f"model.source={b['gpt2']}"], "fetch", ["gpt2"]),
    ("no-config-json", lambda b: ["--set", f"model.source={b['no_config']}"], "fetch", ["config.json"]),
    ("pickle-only", lambda b: ["--set", f"model.source={b['pickle']}"], "fetch", ["allow_pickle"]),
    ("sha256-mismatch", lambda b: ["--set", f"model.source={b['bad_sha']}"], "fetch", ["sha256"]),
    ("rope-layer-out-of-range", lambda b: ["--set", "drop_rope.rope_layers=[7]"], "drop_rope", ["7"]),
    ("seq-len-above-context", lambda b: ["--set", "data.seq_len=4096"], "recalibrate", ["seq_len"]),
    ("missing-data-file", lambda b: ["--set", "data.source=/nonexistent/corpus.txt"], "recalibrate",
     ["/nonexistent/corpus.txt"]),
    ("missing-gguf", lambda b: ["--set", "model.source=/nonexistent/model.Q4_1.gguf"], "fetch",
     ["/nonexistent/model.Q4_1.gguf"]),
    ("s3-checkpoint-without-tokenizer", lambda b: ["--set", f"model.source={b['s3_no_tokenizer']}"], "fetch",
     ["s3://drope-bad-inputs/models/no-tokenizer", "no tokenizer files"]),
    ("hf-source-offline", lambda b: ["--set", "model.source=hf://HuggingFaceTB/SmolLM2-135M"], "fetch",
     ["HuggingFaceTB/SmolLM2-135M"]),
    ("data-text-field-missing", lambda b: ["--set", f"data.source={b['wrong_column']}", "--set",
                                           "data.text_field=content"], "recalibrate", ["data.text_field"]),
]


def one_error_line(proc, command: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"drope {command}: error:")]
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert len(lines) == 1, f"expected one error line, got:\n{proc.stderr[-3000:]}"
    assert tracebacks(proc.stderr) == 0, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("case, argv, words", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_refused_before_anything_runs(case, argv, words, bad_checkpoints, env, monkeypatch, capsys):
    runs_before = set(Path(env["DROPE_HOME"]).glob("runs/*"))
    proc = drope(case, argv(bad_checkpoints), env, monkeypatch, capsys)
    line = one_error_line(proc, argv(bad_checkpoints)[0])
    for w in words:
        assert w in line, line
    assert set(Path(env["DROPE_HOME"]).glob("runs/*")) == runs_before  # nothing created
    assert not (Path(env["DROPE_HOME"]) / "escaped").exists()
    assert not Path("/tmp/drope-never-written").exists()
    assert json.loads((bad_checkpoints["earlier_eval"] / "results.json").read_text()) == {"earlier": True}


@pytest.mark.parametrize("case, extra, stage, words", STAGE_CASES, ids=[c[0] for c in STAGE_CASES])
def test_failing_stage_is_recorded(case, extra, stage, words, bad_checkpoints, env, mlflow_server, inproc_ray,
                                   monkeypatch, capsys):
    run_id = f"bad-{case}"
    proc = drope(case, ["run", "debug", "--run-id", run_id, *extra(bad_checkpoints)], env, monkeypatch, capsys,
                 timeout=600)
    line = one_error_line(proc, "run")
    for w in words:
        assert w in line, line
    status = json.loads(drope("status", ["status", run_id, "--json"], env, monkeypatch, capsys).stdout)
    recs = {s["stage"]: s for s in status["stages"]}
    assert status["run"]["status"] == "failed"
    assert recs[stage]["status"] == "failed" and recs[stage]["error"]
    assert not any(r["status"] == "running" for r in recs.values())
    # no half-written checkpoint: the failed stage's output does not exist
    run_dir = Path(env["DROPE_HOME"]) / "runs" / run_id / "stages" / stage
    assert not any(p.is_file() for p in run_dir.rglob("*")), list(run_dir.rglob("*"))
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("debug")
    runs = client.search_runs([exp.experiment_id], f"tags.`drope.run_id` = '{run_id}'")
    assert runs and all(r.info.status != "RUNNING" for r in runs)
    failed = [r for r in runs if r.data.tags.get("drope.stage") == stage]
    assert failed and failed[0].info.status == "FAILED" and failed[0].data.tags.get("drope.error")


def test_lm_eval_mistakes_fail_the_evaluate_stage(bad_checkpoints, env, mlflow_server, inproc_ray, monkeypatch, capsys):
    """The three lm-eval mistakes in a workflow: the first run fails at evaluate; each resume with the next
    mistake (`--set`, which reruns only evaluate) fails again, one line each, records FAILED."""
    run_id, tasks = "bad-lm-eval", str(bad_checkpoints["lm_eval_tasks"])
    attempts = [
        (["run", "debug", "--run-id", run_id, "--set", "evaluate.tasks=[lm_eval:no_such_task_x]"],
         ["lm_eval:no_such_task_x", "no task"]),
        (["resume", run_id, "--set", "evaluate.tasks=[lm_eval:toy_offline]", "--set",
          f"evaluate.lm_eval_include_path={tasks}"], ["lm_eval:toy_offline", "missing/toy.jsonl"]),
        (["resume", run_id, "--set", "evaluate.tasks=[lm_eval:toy_long]"],  # debug: rope at 2x and 4x of 128
         ["lm_eval:toy_long at 256 tokens", "max_position_embeddings is 128"]),
    ]
    client = MlflowClient(mlflow_server)
    for argv, words in attempts:
        line = one_error_line(drope("lm-eval", argv, env, monkeypatch, capsys, timeout=600), argv[0])
        assert all(w in line for w in words), line
        status = json.loads(drope("status", ["status", run_id, "--json"], env, monkeypatch, capsys).stdout)
        recs = {s["stage"]: s for s in status["stages"]}
        assert status["run"]["status"] == "failed" and recs["evaluate"]["status"] == "failed"
        assert recs["fit_temperature"]["status"] == "succeeded" and recs["fit_temperature"]["attempts"] == 1
        exp = client.get_experiment_by_name("debug")
        runs = client.search_runs([exp.experiment_id], f"tags.`drope.run_id` = '{run_id}'", order_by=["start_time DESC"])
        assert runs and all(r.info.status != "RUNNING" for r in runs)
        latest = next(r for r in runs if r.data.tags.get("drope.stage") == "evaluate")
        assert latest.info.status == "FAILED" and words[0] in latest.data.tags.get("drope.error", "")


def test_unreachable_ray_address_fails_the_run_in_one_line(env, monkeypatch, capsys):
    """ray.init retries a head that is not there for over five minutes: the driver checks ray.address
    first (a TCP connect, then a bounded GCS probe) and the run record ends FAILED with the line;
    so does a resume given the same address."""
    run_id = "bad-ray-address"
    for argv in (["run", "debug", "--run-id", run_id, "--set", "ray.address=127.0.0.1:1"],
                 ["resume", run_id, "--set", "ray.address=127.0.0.1:1"]):
        proc = drope("ray-address-unreachable", argv, env, monkeypatch, capsys, timeout=120)
        line = one_error_line(proc, argv[0])
        for w in ("ray.address 127.0.0.1:1", "nothing answers there", "ray start --head"):
            assert w in line, line
        run = json.loads(drope("status", ["status", run_id, "--json"], env, monkeypatch, capsys).stdout)["run"]
        assert run["status"] == "failed" and "ray.address 127.0.0.1:1" in run["error"], run
    assert run["attempts"] == 2
    assert not (Path(env["DROPE_HOME"]) / "runs" / run_id / "lease.json").exists()  # released
