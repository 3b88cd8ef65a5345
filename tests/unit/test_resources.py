"""What a stage asks Ray for: worker counts from the cluster, unit resources, one model per task."""

import pytest

from drope_ops.errors import SpecError
from workflows.stages.evaluate import EvalConfig, evaluation_units, model_key
from workflows.recalibrate.config import RecalibrateConfig, workers_for
from workflows.tasks import placeable, task_options


def test_placeable_counts_whole_tasks_per_node():
    nodes = [{"CPU": 16, "GPU": 8, "memory": 64e9}, {"CPU": 16, "GPU": 8}, {"CPU": 0}]  # head: no CPUs
    assert placeable({"CPU": 8, "GPU": 1}, 100, nodes) == 4  # CPUs bind: 2 a node
    assert placeable({"CPU": 1, "GPU": 1}, 100, nodes) == 16
    assert placeable({"CPU": 1, "GPU": 1}, 3, nodes) == 3
    assert placeable({"CPU": 1, "memory": 40e9}, 100, nodes) == 1  # only the first node says its memory
    assert placeable({"CPU": 1, "GPU": 1}, 1, [{"CPU": 2}]) == 0  # a CPU cluster holds no GPU task


def test_auto_workers_keep_the_global_batch_by_accumulation():
    cfg = RecalibrateConfig(global_batch=512, micro_batch=2, num_workers="auto", steps=10)
    assert workers_for(cfg, 16) == 16
    assert workers_for(cfg, 12) == 8  # 256 sequences split evenly: 8 workers, accumulation 16
    small = RecalibrateConfig(global_batch=4, micro_batch=1, num_workers="auto", steps=10)
    assert workers_for(small, 3) == 2
    assert workers_for(small, 64) == 4  # never more workers than sequences


def test_num_workers_is_auto_or_a_positive_divisor():
    with pytest.raises(SpecError, match="num_workers"):
        RecalibrateConfig(global_batch=8, micro_batch=2, num_workers=3, steps=10)
    with pytest.raises(SpecError, match="micro_batch"):
        RecalibrateConfig(global_batch=9, micro_batch=2, num_workers="auto", steps=10)


def test_task_options_carry_gpus_and_memory():
    assert task_options(2, 1, 3 * 2**30) == {"num_cpus": 2, "num_gpus": 1, "memory": 3 * 2**30}
    assert task_options(1) == {"num_cpus": 1, "num_gpus": 0}


def test_one_model_per_variant_and_length_for_all_its_tasks():
    cfg = EvalConfig(variants=["drope", "rope", "yarn"], tasks=["niah_single_1", "perplexity"],
                     extension_factors=[1, 2])
    units = evaluation_units(cfg, drope_checkpoint="s3://b/fitted", base_checkpoint="s3://b/base", original_context=64)
    models = {model_key(u) for u in units}
    # drope/rope/yarn x 2 lengths, crop sharing the base model as is (rope at factor 1)
    assert len(units) == 3 * 2 * 2 + 2
    assert len(models) == 6
    assert ("s3://b/base", "rope", 1.0) == model_key(next(u for u in units if u["variant"] == "crop"))
    assert all(u["checkpoint"].startswith("s3://") for u in units)  # URIs, never a node's path


def test_a_multi_node_run_needs_storage_and_tracking_every_node_reaches():
    from workflows.pipeline import check_cluster_reach
    from workflows.spec import load_spec

    spec = load_spec("debug")
    check_cluster_reach(spec, "/home/u/.drope/runs/r1", "sqlite:////home/u/.drope/mlflow.db", nodes=1)  # one box
    check_cluster_reach(spec, "s3://b/runs/r1", "http://mlflow:5000", nodes=3)
    with pytest.raises(SpecError, match=r"storage.root /home/u/.drope/runs is a local directory.*3 nodes.*s3://"):
        check_cluster_reach(spec, "/home/u/.drope/runs/r1", "http://mlflow:5000", nodes=3)
    with pytest.raises(SpecError, match=r"tracking.uri sqlite:.*MLflow server"):
        check_cluster_reach(spec, "s3://b/runs/r1", "sqlite:////home/u/.drope/mlflow.db", nodes=2)
    shared = load_spec("debug", ["storage.shared_filesystem=true"])
    check_cluster_reach(shared, "/nfs/drope/runs/r1", "http://mlflow:5000", nodes=2)
