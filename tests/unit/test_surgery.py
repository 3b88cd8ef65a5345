"""drop_rope: the streaming checkpoint transform, on tiny random Llama checkpoints made by fixtures."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from drope_ops import debugmodel
from drope_ops.errors import CheckpointError
from drope_ops.manifest import build_manifest, manifest_digest, verify_manifest, write_manifest
from drope_ops.modeling import DropeForCausalLM
from drope_ops.surgery import drop_rope, is_rope_llama, layers_keeping_rope
from workflows.cli import main as cli


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_all_rope_kept_no_norm_reproduces_source(sharded_debug_checkpoint, tmp_path):
    """ours (surgery with every layer keeping RoPE, no QK-norm) vs theirs (the sharded source)."""
    out = drop_rope(sharded_debug_checkpoint, tmp_path / "d", qk_norm="none", rope_layers=[0, 1], progress=False)
    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    theirs = LlamaForCausalLM.from_pretrained(sharded_debug_checkpoint).eval()
    assert isinstance(ours, DropeForCausalLM)
    x = torch.randint(0, 258, (2, 50))
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scope,q_width,k_width", [("full", 64, 32), ("head", 16, 16)])
def test_default_surgery_writes_complete_drope_checkpoint(sharded_debug_checkpoint, tmp_path, scope, q_width, k_width):
    out = drop_rope(sharded_debug_checkpoint, tmp_path / "d", qk_norm_scope=scope, original_context=64, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "drope" and cfg["architectures"] == ["DropeForCausalLM"]
    assert (cfg["rope_layers"], cfg["qk_norm"], cfg["qk_norm_scope"]) == ([], "qk", scope)
    assert cfg["original_max_position_embeddings"] == 64 and cfg["logit_scale"] == 1.0
    assert cfg["source_sha256"] == manifest_digest(build_manifest(sharded_debug_checkpoint))
    assert verify_manifest(out) == []
    assert (out / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["d"], "no temporary directory may be left behind"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "model.layers.1.self_attn.k_norm.weight" in index["weight_map"]

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    attn = model.model.layers[1].self_attn
    assert attn.q_norm.weight.shape == (q_width,) and attn.k_norm.weight.shape == (k_width,)
    assert torch.equal(attn.q_norm.weight, torch.ones(q_width)) and attn.q_norm.variance_epsilon == 1e-6
    assert torch.isfinite(logits(model, torch.randint(0, 258, (1, 40)))).all()


def test_source_shards_are_kept_byte_for_byte(debug_checkpoint, sharded_debug_checkpoint, tmp_path):
    """Every source shard is copied as is (a lone model.safetensors under a shard name, so that
    transformers reads the index), the norms are the one new shard, and the manifest matches the files."""
    sharded = drop_rope(sharded_debug_checkpoint, tmp_path / "sharded", progress=False)
    lone = drop_rope(debug_checkpoint, tmp_path / "lone", progress=False)
    source_shards = sorted(sharded_debug_checkpoint.glob("*.safetensors"))
    assert len(source_shards) > 1
    for f in source_shards:
        assert (sharded / f.name).read_bytes() == f.read_bytes()
    assert (lone / "model-00001-of-00001.safetensors").read_bytes() == (debug_checkpoint / "model.safetensors").read_bytes()
    assert not (lone / "model.safetensors").exists()
    for out, n_shards in ((sharded, len(source_shards) + 1), (lone, 2)):
        weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert weight_map["model.layers.0.self_attn.q_norm.weight"] == "qk-norm.safetensors"
        assert len(set(weight_map.values())) == n_shards and verify_manifest(out) == []
    model, info = AutoModelForCausalLM.from_pretrained(lone, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(model.model.layers[0].self_attn.k_norm.weight, torch.ones(32))


def test_link_shares_the_source_shards(sharded_debug_checkpoint, tmp_path):
    """link=True (the stage's way): the output's shards are the source's files, nothing copied; the copy
    (default) leaves them separate files."""
    linked = drop_rope(sharded_debug_checkpoint, tmp_path / "linked", link=True, progress=False)
    copied = drop_rope(sharded_debug_checkpoint, tmp_path / "copied", progress=False)
    for f in sharded_debug_checkpoint.glob("*.safetensors"):
        assert (linked / f.name).samefile(f) and not (copied / f.name).samefile(f)
    assert verify_manifest(linked) == [] and json.loads((linked / "drope-manifest.json").read_text()) == \
        json.loads((copied / "drope-manifest.json").read_text())


def test_nope_every_and_q_only(debug_checkpoint, tmp_path):
    assert layers_keeping_rope(8, nope_every=4) == [0, 1, 2, 4, 5, 6]  # SmolLM3: layers 3, 7 NoPE
    out = drop_rope(debug_checkpoint, tmp_path / "d", qk_norm="q", nope_every=2, progress=False)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert model.config.rope_layers == [0] and not info["missing_keys"]
    assert model.model.layers[0].self_attn.k_norm is None
    assert model.model.layers[0].self_attn.use_rope and not model.model.layers[1].self_attn.use_rope


def test_source_manifest_is_used_and_checked(tmp_path):
    src = debugmodel.make_debug_checkpoint(tmp_path / "src")
    digest = manifest_digest(write_manifest(src))
    out = drop_rope(src, tmp_path / "d", progress=False)
    assert json.loads((out / "config.json").read_text())["source_sha256"] == digest

    data = bytearray((src / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # flip one weight byte: the source no longer matches its manifest
    (src / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match"):
        drop_rope(src, tmp_path / "d2", progress=False)
    assert not (tmp_path / "d2").exists()


def _gpt2_like(path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 1024, "n_layer": 2}))
    return path


def _pickle_only(path, src):
    shutil.copytree(src, path)
    (path / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, path / "pytorch_model.bin")
    return path


def _no_config(path, src):
    shutil.copytree(src, path)
    (path / "config.json").unlink()
    return path


@pytest.mark.parametrize("case,expected", [
    ("gpt2", "absolute position embeddings"),
    ("already", "already a DroPE checkpoint"),
    ("pickle", "only pickle weights"),
    ("no_config", "missing config.json"),
    ("layer_range", "rope_layers: layer 7 out of range"),
    ("dst_exists", "already exists"),
    ("bad_field", "rms_norm_eps.*fix that field"),  # refused by the config check before anything is written
    ("truncated", "size does not match its header"),
])
def test_refusals_are_one_line_and_leave_nothing(debug_checkpoint, tmp_path, case, expected):
    src, kwargs = debug_checkpoint, {}
    if case == "gpt2":
        src = _gpt2_like(tmp_path / "gpt2")
    elif case == "already":
        src = drop_rope(debug_checkpoint, tmp_path / "dropped", progress=False)
    elif case == "pickle":
        src = _pickle_only(tmp_path / "pickle", debug_checkpoint)
    elif case == "no_config":
        src = _no_config(tmp_path / "nocfg", debug_checkpoint)
    elif case == "layer_range":
        kwargs = {"rope_layers": [0, 7]}
    elif case == "bad_field":
        src = shutil.copytree(debug_checkpoint, tmp_path / "bad")
        (src / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()),
                                                     "rms_norm_eps": "1e-5"}))
    elif case == "truncated":
        src = shutil.copytree(debug_checkpoint, tmp_path / "cut")
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[:-64])
    dst = tmp_path / "out"
    if case == "dst_exists":
        dst.mkdir()
        (dst / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match=expected) as err:
        drop_rope(src, dst, progress=False, **kwargs)
    assert "\n" not in str(err.value)
    assert case == "dst_exists" or not dst.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_is_rope_llama(debug_checkpoint):
    assert is_rope_llama(json.loads((debug_checkpoint / "config.json").read_text()))
    assert is_rope_llama({"model_type": "qwen2"})
    assert not is_rope_llama({"model_type": "gpt2"}) and not is_rope_llama({"model_type": "drope"})


def test_cli_drop_rope(debug_checkpoint, tmp_path, capsys):
    assert cli(["drop-rope", str(debug_checkpoint), str(tmp_path / "bad"), "--keep-rope-layers", "0,9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("drope drop-rope: error:") and "out of range" in err and "\n" not in err
    assert cli(["drop-rope", str(debug_checkpoint), str(tmp_path / "ok"), "--qk-norm", "none",
                "--nope-every", "2", "--no-progress"]) == 0
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["rope_layers"] == [0]


def _rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise AssertionError(f"/proc/self/status has no {field}")


def test_peak_memory_stays_near_one_shard(tmp_path):
    """Real RSS high-water mark (reset through /proc/self/clear_refs) during the surgery of a
    ~70 MB checkpoint in 4+ shards: it may grow by about one shard, never by the whole model."""
    src = debugmodel.make_debug_checkpoint(tmp_path / "src", max_shard_size="20MB", hidden_size=512,
                                           intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                                           num_key_value_heads=4)
    shards = sorted(src.glob("*.safetensors"))
    assert len(shards) >= 4, "the test needs several shards"
    largest, total = max(p.stat().st_size for p in shards), sum(p.stat().st_size for p in shards)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pytest.skip("this kernel does not let a process reset its RSS high-water mark")
    before = _rss_kib("VmRSS")
    drop_rope(src, tmp_path / "d", progress=False)
    grew = (_rss_kib("VmHWM") - before) * 1024
    assert grew <= 1.2 * largest, f"peak RSS grew {grew / 2**20:.1f} MiB, largest shard {largest / 2**20:.1f} MiB"
    assert grew < total / 2


def test_qwen2_qkv_bias_source_keeps_its_biases(tmp_path):
    """Qwen2 layout (bias on q/k/v, none on o_proj): with RoPE kept, ours reproduces Qwen2's logits."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    theirs = Qwen2ForCausalLM(Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "qwen2")
    out = drop_rope(tmp_path / "qwen2", tmp_path / "d", qk_norm="none", rope_layers=[0, 1], progress=False)
    ours, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert ours.config.qkv_bias and not info["missing_keys"] and not info["unexpected_keys"]
    x = torch.randint(0, 97, (2, 30))
    torch.testing.assert_close(logits(ours.eval(), x), logits(theirs.eval(), x), atol=1e-5, rtol=0)


def test_drop_rope_stage_records_the_rope_scaling_it_removed(debug_checkpoint, yarn_checkpoint, tmp_path):
    """A source extended with YaRN (factor 4 over 128): the stage's result names C_train 128 and the scaling."""
    from types import SimpleNamespace

    from drope_ops.fetch import fetch
    from workflows.spec import load_spec
    from workflows.stage import SOURCE
    from workflows.stages import drop_rope as stage

    fetch(str(yarn_checkpoint), str(tmp_path / "base"), progress=False)
    ctx = SimpleNamespace(inputs={SOURCE: str(tmp_path / "base")}, output=str(tmp_path / "out"))
    result = stage.run(load_spec("debug"), ctx)
    assert (result["original_context"], result["removed_rope_scaling"], result["removed_rope_factor"]) == (128, "yarn", 4.0)
    fetch(str(debug_checkpoint), str(tmp_path / "plain"), progress=False)  # plain RoPE: nothing removed
    plain = stage.run(load_spec("debug"), SimpleNamespace(inputs={SOURCE: str(tmp_path / "plain")},
                                                          output=str(tmp_path / "out2")))
    assert (plain["removed_rope_scaling"], plain["removed_rope_factor"]) == ("none", 1.0)


def test_surgery_qk_norm_choices_are_the_models():
    from drope_ops import modeling, surgery

    assert (surgery.QK_NORM_CHOICES, surgery.QK_NORM_SCOPES) == (modeling.QK_NORM_CHOICES, modeling.QK_NORM_SCOPES)
