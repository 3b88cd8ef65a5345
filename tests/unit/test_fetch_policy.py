"""Fetch's safety policy and the local half of storage: no services, seconds."""

import json
import shutil

import pytest
import torch

from drope_ops import checkpoint_policy as policy
from drope_ops import manifest as mf
from drope_ops import storage
from drope_ops.errors import CheckpointError, StorageError
from drope_ops.fetch import check_rope_llama_config, fetch, parse_source

MARKER_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("executed")
"""


def test_allow_patterns_carry_no_pickles_or_code_by_default():
    pats = policy.allow_patterns()
    assert "*.safetensors" in pats and "config.json" in pats and "tokenizer.json" in pats
    assert not any(p.endswith((".bin", ".pt", ".py")) for p in pats)
    assert "*.bin" in policy.allow_patterns(allow_pickle=True)
    assert "*.py" in policy.allow_patterns(allow_code=True)


def test_select_files_keeps_weights_config_tokenizer_only():
    names = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "README.md", ".gitattributes",
             "modeling_evil.py", "pytorch_model.bin", "onnx/model.onnx", "generation_config.json"]
    got = policy.select_files(names)
    assert got == sorted(["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                          "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                          "tokenizer.json"])
    # pickles are dropped when safetensors exist, even with the flag; code only on request
    assert "pytorch_model.bin" not in policy.select_files(names, allow_pickle=True)
    assert "modeling_evil.py" in policy.select_files(names, allow_code=True)


def test_pickle_only_checkpoint_is_refused_naming_the_flag():
    names = ["config.json", "pytorch_model.bin", "tokenizer.json"]
    with pytest.raises(CheckpointError, match="--allow-pickle") as e:
        policy.select_files(names, where="hf://org/m")
    assert "\n" not in str(e.value) and "pytorch_model.bin" in str(e.value)
    assert "pytorch_model.bin" in policy.select_files(names, allow_pickle=True)


def test_no_weights_or_no_config_is_refused():
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        policy.select_files(["config.json", "README.md"])
    with pytest.raises(CheckpointError, match="no config.json"):
        policy.select_files(["model.safetensors"])


@pytest.mark.parametrize("cfg", [
    {"model_type": "llama", "rope_theta": 10000.0},
    {"model_type": "qwen2", "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
])
def test_rope_llama_configs_pass(cfg):
    check_rope_llama_config(cfg, "x")


@pytest.mark.parametrize("cfg, message", [
    ({"model_type": "gpt2", "n_positions": 1024}, "absolute"),
    ({"model_type": "bert", "position_embedding_type": "absolute"}, "absolute"),
    ({"model_type": "drope"}, "already a DroPE"),
    ({"model_type": "t5"}, "not a supported Llama-family"),
    ({}, "not a supported Llama-family"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "linear", "factor": 1e30}}, "NoPE"),
])
def test_non_rope_configs_are_refused(cfg, message):
    with pytest.raises(CheckpointError, match=message) as e:
        check_rope_llama_config(cfg, "hf://org/m")
    assert str(e.value).startswith("hf://org/m: ")


def test_parse_source():
    assert parse_source("hf://HuggingFaceTB/SmolLM2-135M@v1") == ("hf", "HuggingFaceTB/SmolLM2-135M", "v1")
    assert parse_source("hf://org/name") == ("hf", "org/name", None)
    assert parse_source("s3://bucket/a/b/") == ("s3", "s3://bucket/a/b", None)
    with pytest.raises(CheckpointError, match="unknown source scheme 'gs'"):
        parse_source("gs://bucket/x")
    with pytest.raises(CheckpointError, match="hf://ORG/NAME"):
        parse_source("hf://just-a-name")
    with pytest.raises(CheckpointError, match="does not exist"):
        parse_source("/nonexistent/dir")


def test_safetensors_names():
    assert policy.safetensors_name("pytorch_model.bin") == "model.safetensors"
    assert policy.safetensors_name("pytorch_model-00001-of-00002.bin") == "model-00001-of-00002.safetensors"


def test_convert_pickles_loads_weights_only_and_keeps_tied_tensors(tmp_path):
    from safetensors.torch import load_file

    emb = torch.randn(4, 3)
    torch.save({"embed.weight": emb, "lm_head.weight": emb}, tmp_path / "pytorch_model.bin")
    out = policy.convert_pickles(tmp_path, ["pytorch_model.bin"], tmp_path / "out")
    loaded = load_file(out["model.safetensors"])
    torch.testing.assert_close(loaded["lm_head.weight"], emb)
    # an object that is not plain tensors would need full unpickling: refused
    torch.save({"w": torch.ones(1), "obj": shutil.copyfile}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        policy.convert_pickles(tmp_path, ["evil.bin"], tmp_path / "out2")


def test_local_storage_bytes_roundtrip(tmp_path):
    root = str(tmp_path / "ledger")
    storage.write_bytes(storage.join(root, "r1", "a.json"), b'{"a": 1}')
    storage.write_bytes(storage.join(root, "r10", "b.json"), b"{}")
    assert storage.read_bytes(storage.join(root, "r1", "a.json")) == b'{"a": 1}'
    assert storage.list_prefix(storage.join(root, "r1")) == [storage.join(root, "r1", "a.json")]
    assert storage.exists(storage.join(root, "r1")) and not storage.exists(storage.join(root, "r2"))
    assert storage.list_prefix(storage.join(root, "nope")) == []
    assert storage.join("s3://b/x/", "y", "z.json") == "s3://b/x/y/z.json"
    with pytest.raises(StorageError, match="does not exist"):
        storage.read_bytes(storage.join(root, "missing.json"))


def _evil_checkpoint(src, marker, debug_checkpoint):
    shutil.copytree(debug_checkpoint, src)
    (src / "modeling_evil.py").write_text(MARKER_CODE.format(marker=str(marker)))
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "README.md").write_text("a model card")


def test_custom_code_is_never_executed_nor_copied(tmp_path, debug_checkpoint):
    from transformers import AutoModelForCausalLM

    src, marker = tmp_path / "src", tmp_path / "EXECUTED"
    _evil_checkpoint(src, marker, debug_checkpoint)
    res = fetch(str(src), str(tmp_path / "dst"), progress=False)
    dst = tmp_path / "dst"
    assert not (dst / "modeling_evil.py").exists() and not (dst / "README.md").exists()
    assert "auto_map" not in json.loads((dst / "config.json").read_text())
    assert mf.verify_manifest(dst) == [] and res.files_transferred > 0
    AutoModelForCausalLM.from_pretrained(dst)  # loads as plain Llama, runs nothing from the source
    # asked for, the code is copied (and auto_map kept), still never run by fetch
    fetch(str(src), str(tmp_path / "dst-code"), allow_code=True, progress=False)
    assert (tmp_path / "dst-code" / "modeling_evil.py").exists()
    assert not marker.exists(), "fetch or loading executed the checkpoint's custom code"


def test_local_fetch_is_atomic_and_idempotent(tmp_path, debug_checkpoint):
    dst = tmp_path / "dst"
    first = fetch(str(debug_checkpoint), str(dst), progress=False)
    again = fetch(str(debug_checkpoint), str(dst), progress=False)
    assert (again.files_transferred, again.bytes_transferred) == (0, 0)
    assert again.manifest_digest == first.manifest_digest
    assert mf.read_manifest(dst)["source"] == str(debug_checkpoint)
    assert [p.name for p in tmp_path.iterdir()] == ["dst"], "a staging directory was left behind"
    # a non-checkpoint directory in the way is not overwritten
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(StorageError, match="not a drope checkpoint"):
        fetch(str(debug_checkpoint), str(tmp_path / "busy"), progress=False)


def test_gguf_source_goes_through_the_gguf_import(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="GGUF|gguf"):
        fetch(str(bogus), str(tmp_path / "dst"), progress=False)
    assert not (tmp_path / "dst").exists()


def test_plain_local_checkpoint_is_checked_against_its_index_and_headers(sharded_debug_checkpoint, tmp_path, capsys):
    from workflows.cli import main as cli_main

    plain = tmp_path / "plain"
    shutil.copytree(sharded_debug_checkpoint, plain)
    (plain / mf.MANIFEST_NAME).unlink(missing_ok=True)
    assert cli_main(["fetch", str(plain), str(tmp_path / "ok"), "--no-progress"]) == 0
    assert mf.verify_manifest(tmp_path / "ok") == [] and mf.read_manifest(tmp_path / "ok")["source"] == str(plain)
    shard = sorted(plain.glob("model-*.safetensors"))[-1]
    shard.unlink()
    capsys.readouterr()
    assert cli_main(["fetch", str(plain), str(tmp_path / "bad"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert shard.name in err and "index" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()


def test_tokenizer_problem_names_the_files_and_the_fix():
    assert policy.tokenizer_problem(["config.json", "tokenizer.model"], "x") is None
    problem = policy.tokenizer_problem(["config.json", "tokenizer_config.json", "model.safetensors"], "s3://b/m")
    assert "s3://b/m has no tokenizer files" in problem and "tokenizer.json" in problem and "copy" in problem
