"""The final weights' writer: shards streamed tensor by tensor read back as safetensors and as a model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from workflows.recalibrate.weights import full_weights, ShardWriter, weight_layout


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 50, bias=False)
        self.head.weight = self.embed.weight  # tied: written once, under its first name
        self.register_buffer("steps", torch.tensor(7, dtype=torch.int64))
        self.register_buffer("scratch", torch.ones(3), persistent=False)
        self.scale = torch.nn.Parameter(torch.tensor(0.5))  # 0-dim


def write(tmp_path, model, dtype, max_bytes):
    layout = weight_layout(model, 2, dtype)
    writer = ShardWriter(tmp_path, layout, max_bytes)
    for name, t in full_weights(SimpleNamespace(module=model), 2, rank=0):
        writer.add(name, t)
    writer.finish()
    return layout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_streamed_shards_hold_every_tensor_once_in_the_base_dtype(tmp_path, dtype):
    torch.manual_seed(0)
    model = Tied()
    layout = write(tmp_path, model, dtype, max_bytes=500)  # the embedding (800 bf16 bytes) alone in a shard
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    got = {}
    for f in files:
        with safe_open(str(tmp_path / f), "pt") as h:
            assert h.metadata() == {"format": "pt"}
        got.update(load_file(tmp_path / f))
    want = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    assert set(got) == set(want) == {name for name, _, _ in layout}
    for k, v in want.items():
        expected = v.to(dtype) if v.is_floating_point() else v
        assert got[k].dtype == expected.dtype and torch.equal(got[k], expected), k
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in got.values())


def test_one_small_model_is_one_file_and_a_wrong_tensor_is_refused(tmp_path):
    model = Tied()
    write(tmp_path, model, torch.float32, max_bytes=10**9)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert torch.equal(load_file(tmp_path / "model.safetensors")["proj.weight"], model.proj.weight.detach())
    writer = ShardWriter(tmp_path / "x", weight_layout(model, 2, torch.float32), 10**9)
    with pytest.raises(RuntimeError, match=r"layout expects scale \(\)"):
        writer.add("proj.weight", model.proj.weight)
    with pytest.raises(RuntimeError, match="never arrived"):
        writer.finish()
