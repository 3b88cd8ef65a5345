"""The fit_temperature and evaluate stages on the tiny debug model, in-process (no Ray): the fitted
checkpoint carries logit_scale_c and a fresh manifest, and evaluation writes table, heatmaps and plot."""

import json

import pytest

from drope_ops.data import DataConfig
from drope_ops.errors import SpecError
from drope_ops.manifest import verify_manifest
from drope_ops.surgery import drop_rope
from workflows.stages.evaluate import EvalConfig, evaluate, evaluation_units, run_unit
from workflows.stages.fit_temperature import TemperatureConfig, fit_temperature


@pytest.fixture(scope="module")
def drope_checkpoint(debug_checkpoint, tmp_path_factory):
    return drope_ops_drop(debug_checkpoint, tmp_path_factory.mktemp("drope") / "ckpt")


def drope_ops_drop(src, dst):
    return drop_rope(src, dst, progress=False)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    for i in range(8):
        (root / f"doc{i}.txt").write_text(f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * 60)
    return DataConfig(source=str(root), heldout_docs=4)


def test_fit_temperature_writes_the_fitted_checkpoint(drope_checkpoint, text_data, tmp_path):
    cfg = TemperatureConfig(extension_factors=[2], sequences_per_length=1, max_evals=4)
    logged = []
    sink = type("Sink", (), {"log_metrics": lambda self, m, step: logged.append((m, step))})()
    res = fit_temperature(cfg, text_data, str(drope_checkpoint), str(tmp_path / "fitted"), metrics_sink=sink)
    out = tmp_path / "fitted"
    config = json.loads((out / "config.json").read_text())
    assert config["logit_scale_c"] == pytest.approx(res["c"])
    assert res["c"] == pytest.approx((res["betas"][2.0] - 1) / 0.6931471805599453)
    assert verify_manifest(out) == []
    assert (out / "model.safetensors").stat().st_ino == (drope_checkpoint / "model.safetensors").stat().st_ino
    assert any("beta" in m for m, _ in logged) and any("logit_scale_c" in m for m, _ in logged)
    assert not list(tmp_path.glob(".fitted.partial-*"))


def test_units_are_plain_and_evaluate_writes_outputs(debug_checkpoint, drope_checkpoint, text_data, tmp_path):
    import pickle

    cfg = EvalConfig(variants=["drope", "yarn"], tasks=["niah_single_1", "perplexity"],
                     extension_factors=[4], samples_per_cell=2, depths=[0, 100], max_new_tokens=4,
                     perplexity_sequences=1, dtype="float32")
    units = evaluation_units(cfg, drope_checkpoint=str(drope_checkpoint), base_checkpoint=str(debug_checkpoint),
                             original_context=128, data=text_data)
    assert len(units) == 2 * 2 + 1  # + the crop reference per length
    assert pickle.loads(pickle.dumps(units)) == units
    one = run_unit(units[0])
    assert one["variant"] == "drope" and one["length"] == 512 and set(one["by_depth"]) == {0, 100}
    res = evaluate(cfg, drope_checkpoint=str(drope_checkpoint), base_checkpoint=str(debug_checkpoint),
                   output_dir=str(tmp_path / "eval"), data=text_data)
    table = json.loads(open(res["table_json"]).read())
    assert set(table["rows"]) == {"drope", "crop", "yarn"}
    assert table["columns"] == ["niah_single_1@512", "perplexity@512"]
    assert table["rows"]["crop"]["perplexity@512"] > 1 and "niah_single_1@512" not in table["rows"]["crop"]
    assert len(res["heatmaps"]) == 2 and res["ppl_plot"].endswith(".png")
    assert "| drope |" in open(res["table_md"]).read()


def test_factor_one_baselines_are_computed_once_and_equal_rope(debug_checkpoint, text_data, tmp_path, capsys):
    cfg = EvalConfig(variants=["rope", "pi", "ntk", "yarn"], tasks=["perplexity"], extension_factors=[1, 2],
                     perplexity_sequences=1, dtype="float32", original_context=128)
    res = evaluate(cfg, drope_checkpoint=None, base_checkpoint=str(debug_checkpoint),
                   output_dir=str(tmp_path / "eval"), data=text_data)
    assert "10 cells, 6 to compute" in capsys.readouterr().out  # 1x: rope only; 2x: rope pi ntk yarn crop
    by = {(r["variant"], r["length"]): r for r in res["results"]}
    for v in ("pi", "ntk", "yarn", "crop"):
        assert by[(v, 128)]["same_as"] == "rope" and by[(v, 128)]["score"] == by[("rope", 128)]["score"]
        assert "same_as" not in by[(v, 256)]
    # the shortcut is exact: each baseline at factor 1, really computed, gives rope's number
    units = evaluation_units(cfg, drope_checkpoint=None, base_checkpoint=str(debug_checkpoint),
                             original_context=128, data=text_data)
    for u in units:
        if u["length"] == 128 and u["variant"] != "rope":
            assert run_unit(u)["score"] == pytest.approx(by[("rope", 128)]["score"], rel=1e-6), u["variant"]


def test_eval_config_names_bad_fields():
    with pytest.raises(SpecError, match="evaluate.variants"):
        EvalConfig(variants=["longrope"])
    with pytest.raises(SpecError, match="longbench_path"):
        EvalConfig(tasks=["longbench"])
    with pytest.raises(SpecError, match="max_evals"):
        TemperatureConfig(max_evals=13)
