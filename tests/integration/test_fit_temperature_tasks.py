"""fit_temperature on a real local Ray (4 CPUs): lengths that fit side by side run as one task each;
lengths that would queue one after another run in one task whose shorter length reuses the longer's
forwards. Both ways fit the same betas on the same held-out text."""

import json

import pytest

from drope_ops.surgery import drop_rope
from workflows.stages.fit_temperature import TemperatureConfig, fit_temperature
from workflows.tasks import units_at_once


@pytest.fixture(scope="module")
def drope_checkpoint(debug_checkpoint, tmp_path_factory):
    return drop_rope(debug_checkpoint, tmp_path_factory.mktemp("drope") / "ckpt", progress=False)


def test_units_at_once_without_ray_is_one():
    assert units_at_once(3, cpus=1) == 1


def test_lengths_share_forwards_only_where_they_would_queue(ray_local, drope_checkpoint, text_data, tmp_path):
    assert units_at_once(2, cpus=1) == 2 and units_at_once(2, cpus=4) == 1 and units_at_once(2, cpus=2) == 2
    fits = {}
    for cpus in (1, 4):  # 1: both lengths side by side, a task each; 4: one task fills the node
        cfg = TemperatureConfig(extension_factors=[2, 4], sequences_per_length=2, max_evals=5, cpus_per_length=cpus)
        res = fit_temperature(cfg, text_data, str(drope_checkpoint), str(tmp_path / f"fitted-{cpus}"))
        written = json.loads((tmp_path / f"fitted-{cpus}" / "temperature_fit.json").read_text())
        fits[cpus] = {f["factor"]: f for f in written["fits"]}
        assert sorted(res["betas"]) == [2.0, 4.0]
    assert all(f["forwards"] == len(f["evals"]) for f in fits[1].values())  # side by side: nothing to share
    assert fits[4][4.0]["forwards"] == len(fits[4][4.0]["evals"])
    assert fits[4][2.0]["forwards"] <= len(fits[4][2.0]["evals"]) - 2  # Brent's first two betas: 8x's forwards
    for s in (2.0, 4.0):  # the same held-out prefixes either way: the same search, to the summation order
        assert fits[4][s]["beta"] == pytest.approx(fits[1][s]["beta"], abs=1e-5)
        assert fits[4][s]["loss"] == pytest.approx(fits[1][s]["loss"], rel=1e-5)
