"""The fit_temperature and evaluate stages on the tiny debug model, in-process (no Ray): the fitted
checkpoint carries logit_scale_c and a fresh manifest, and evaluation writes table, heatmaps and plot."""

import json

import pytest

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


def _hf_loss(model, blocks) -> float:
    """Mean next-token cross-entropy by transformers' own loss (labels = inputs), not drope_ops'."""
    import torch

    with torch.no_grad():
        losses = [model(input_ids=row.view(1, -1), labels=row.view(1, -1)).loss.item() for row in blocks]
    return sum(losses) / len(losses)


def _with_static_scale(checkpoint, scale):
    """The DroPE checkpoint with a fixed logit scale and no dynamic one: the model the fit evaluates."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="float32").eval()
    model.config.logit_scale, model.config.logit_scale_c = model.config.logit_scale * float(scale), None
    return model


def test_fit_temperature_writes_the_fitted_checkpoint(drope_checkpoint, text_data, tmp_path):
    import hashlib
    import math

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drope_ops.data import heldout_blocks

    cfg = TemperatureConfig(extension_factors=[2, 4], sequences_per_length=1, max_evals=4, bounds=[0.5, 3.0])
    logged = []
    sink = type("Sink", (), {"log_metrics": lambda self, m, step: logged.append((m, step))})()
    res = fit_temperature(cfg, text_data, str(drope_checkpoint), str(tmp_path / "fitted"), metrics_sink=sink)
    out = tmp_path / "fitted"
    assert res["output"] == str(out) and sorted(res["betas"]) == [2.0, 4.0]
    c_train = json.loads((drope_checkpoint / "config.json").read_text())["original_max_position_embeddings"]
    assert res["lengths"] == {2.0: 2 * c_train, 4.0: 4 * c_train}
    assert all(0.5 <= b <= 3.0 for b in res["betas"].values())

    # c: least squares of beta - 1 = c ln s, through numpy (not drope_ops.temperature)
    ln_s = np.log([2.0, 4.0])[:, None]
    (c_np,), *_ = np.linalg.lstsq(ln_s, np.array([res["betas"][2.0], res["betas"][4.0]]) - 1, rcond=None)
    assert res["c"] == pytest.approx(c_np, rel=1e-9, abs=1e-12)

    # each loss is transformers' loss of the checkpoint at that beta, on held-out text of that length
    tok = AutoTokenizer.from_pretrained(drope_checkpoint)
    for s in (2.0, 4.0):
        blocks = heldout_blocks(text_data, tok, res["lengths"][s], 1, split="validation")
        assert res["losses"][s] == pytest.approx(_hf_loss(_with_static_scale(drope_checkpoint, res["betas"][s]), blocks),
                                                 rel=1e-4)

    # the fitted checkpoint: same config but logit_scale_c = c, byte-identical weights, fresh manifest
    src_config = json.loads((drope_checkpoint / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["logit_scale_c"] == res["c"]
    assert {k: v for k, v in config.items() if k != "logit_scale_c"} == \
        {k: v for k, v in src_config.items() if k != "logit_scale_c"}
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    weights = sorted(p.name for p in drope_checkpoint.glob("*.safetensors"))
    assert weights and sorted(p.name for p in out.glob("*.safetensors")) == weights
    assert all(digest(out / w) == digest(drope_checkpoint / w) for w in weights)
    assert verify_manifest(out) == []
    fit_file = json.loads((out / "temperature_fit.json").read_text())
    assert fit_file["c"] == res["c"] and [f["beta"] for f in fit_file["fits"]] == [res["betas"][2.0], res["betas"][4.0]]
    for f in fit_file["fits"]:  # beta is the best of the (<= max_evals) losses evaluated
        assert 1 <= len(f["evals"]) <= 4 and min(f["evals"], key=lambda e: e[1])[0] == f["beta"]
    assert not list(tmp_path.glob(".fitted.partial-*"))

    # loaded, it applies beta(L) = max(1, 1 + c ln(L / C_train)) by itself (DropeConfig's rule):
    # logits equal the unfitted model's with that static scale, and are unchanged up to C_train
    fitted = AutoModelForCausalLM.from_pretrained(out, dtype="float32").eval()
    assert fitted.config.logit_scale_c == pytest.approx(res["c"])
    ids = heldout_blocks(text_data, tok, 4 * c_train, 1, split="validation")[0]
    with torch.no_grad():
        for length in (c_train // 2, c_train, 2 * c_train, 4 * c_train):
            x = ids[:length].view(1, -1)
            beta = max(1.0, 1.0 + res["c"] * math.log(length / c_train)) if length > c_train else 1.0
            expected = _with_static_scale(drope_checkpoint, beta)(input_ids=x).logits
            assert torch.allclose(fitted(input_ids=x).logits, expected, atol=1e-5), length
            if beta != 1.0:  # the scale makes a difference the check could see
                assert not torch.allclose(_with_static_scale(drope_checkpoint, 1.0)(input_ids=x).logits, expected,
                                          atol=1e-3), length

    # the metrics logged per length, then c
    assert [m for m, _ in logged[:2]] == [
        {"beta": res["betas"][s], "heldout_loss": res["losses"][s], "length": res["lengths"][s]} for s in (2.0, 4.0)]
    assert logged[-1] == ({"logit_scale_c": res["c"]}, 2)


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


def test_the_base_model_scores_every_length_in_one_pass(debug_checkpoint, text_data):
    """rope's perplexity at 1x / 2x / 4x is one forward a row at 4x, crop's 2x and 4x one pass of windows;
    each equals the loss computed on its own over the first L tokens of the same held-out sequences."""
    from transformers import AutoTokenizer

    from drope_ops.data import heldout_blocks
    from drope_ops.evals.perplexity import cropped_nll
    from workflows.stages import evaluate as stage

    cfg = EvalConfig(variants=["rope"], tasks=["perplexity"], extension_factors=[1, 2, 4], perplexity_sequences=2,
                     dtype="float32", original_context=128)
    units = evaluation_units(cfg, drope_checkpoint=None, base_checkpoint=str(debug_checkpoint), original_context=128,
                             data=text_data)
    rope = [u for u in units if u["variant"] == "rope"]
    crop = [u for u in units if u["variant"] == "crop" and u["length"] > 128]
    assert len({stage.model_key(u) for u in rope}) == 1 and [u["length"] for u in rope] == [128, 256, 512]
    blocks = heldout_blocks(text_data, AutoTokenizer.from_pretrained(debug_checkpoint), 512, 2, split="test")
    for group, window in ((rope, 512), (crop, 128)):
        model, _ = stage._model_for(group[0])
        forwards = []
        hook = model.model.register_forward_hook(
            lambda mod, args, kwargs, out: forwards.append(kwargs["input_ids"].shape[-1]), with_kwargs=True)
        results = stage.run_group(group)
        hook.remove()
        if window == 512:
            assert forwards == [512, 512]  # one forward a row for the three lengths
            alone = [_hf_loss(model, blocks[:, :u["length"]]) for u in group]
        else:  # windows of 128 at stride 64 over 512 tokens: 7 a row, 2x's 3 among them
            assert forwards == [128] * 7 * 2
            alone = [(lambda t, n: t / n)(*cropped_nll(model, blocks[:, :u["length"]], 128)[u["length"]]) for u in group]
        assert [r["loss"] for r in results] == pytest.approx(alone, rel=1e-5)
        assert [r["length"] for r in results] == [u["length"] for u in group]
