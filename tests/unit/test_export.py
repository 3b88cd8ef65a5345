"""Export: every native layout loads in vanilla transformers and reproduces the DroPE model's logits;
the remote-code export loads with trust_remote_code; layouts with no native form are refused.

The exported directories are loaded in ONE child process that never imports drope_ops, so neither
the native nor the remote-code load can lean on this project's registered model type.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from drope_ops.errors import CheckpointError
from drope_ops.export import export_checkpoint, fold_logit_scale
from drope_ops.modeling import DropeConfig, DropeForCausalLM
from workflows.cli import main as cli

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
# name -> (DroPE config fields, export format, expected model_type of the export)
CASES = {
    "llama-beta": (dict(rope_layers=[0, 1, 2], logit_scale=1.3), "native", "llama"),
    "smollm3-mixed": (dict(rope_layers=[0, 2]), "native", "smollm3"),
    "smollm3-nope-qkv-bias": (dict(qkv_bias=True, logit_scale=0.8), "native", "smollm3"),
    "qwen3-headnorm-beta": (dict(qk_norm="qk", qk_norm_scope="head", qkv_bias=True, logit_scale=1.5), "native", "qwen3"),
    "remote-full-dynamic": (dict(qk_norm="qk", rope_layers=[1], logit_scale=1.2, logit_scale_c=0.4,
                                 original_max_position_embeddings=16), "remote-code", "drope"),
}
X = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))


def make_drope(path, **fields):
    """A random DroPE checkpoint whose norm weights and biases are not trivially 1 / 0."""
    model = DropeForCausalLM(DropeConfig(**TINY, **fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_norm" in name or "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    model.save_pretrained(path, max_shard_size="100KB")
    with torch.no_grad():
        return model(X).logits


LOAD_ALL = textwrap.dedent("""
    import json, sys, torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    x = torch.load(sys.argv[1])
    out = {}
    for name, (path, remote) in json.loads(sys.argv[2]).items():
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote).eval()
        with torch.no_grad():
            out[name] = model(x).logits.contiguous()
        out[name + ".type"] = torch.tensor([ord(c) for c in model.config.model_type])
    assert "drope_ops" not in sys.modules
    save_file(out, sys.argv[3])
""")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ours, dirs = {}, {}
    for name, (fields, fmt, _) in CASES.items():
        ours[name] = make_drope(root / f"{name}-src", **fields)
        dirs[name] = (str(export_checkpoint(root / f"{name}-src", root / name, format=fmt, progress=False)),
                      fmt == "remote-code")
    torch.save(X, root / "x.pt")
    proc = subprocess.run([sys.executable, "-c", LOAD_ALL, str(root / "x.pt"), json.dumps(dirs), str(root / "out.st")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ours, load_file(root / "out.st"), dirs


@pytest.mark.parametrize("name", CASES)
def test_export_loads_in_plain_transformers_and_matches(exported, name):
    ours, theirs, _ = exported
    assert "".join(map(chr, theirs[name + ".type"].tolist())) == CASES[name][2]
    torch.testing.assert_close(theirs[name], ours[name], atol=2e-5, rtol=1e-5)


def test_native_export_has_no_remote_code_and_remote_has_it(exported):
    _, _, dirs = exported
    native = json.loads(open(f"{dirs['qwen3-headnorm-beta'][0]}/config.json").read())
    assert "auto_map" not in native and native["rope_parameters"]["factor"] == 1e30
    remote = json.loads(open(f"{dirs['remote-full-dynamic'][0]}/config.json").read())
    assert remote["auto_map"]["AutoModelForCausalLM"] == "modeling_drope.DropeForCausalLM"


def test_fold_logit_scale_reproduces_scaled_logits():
    for fields, into in [(dict(), "q_proj"), (dict(qk_norm="q"), "q_norm")]:
        scaled = DropeForCausalLM(DropeConfig(**TINY, logit_scale=1.7, **fields)).eval()
        plain = DropeForCausalLM(DropeConfig(**TINY, **fields)).eval()
        state = dict(scaled.state_dict())
        assert len(fold_logit_scale(state, 1.7, into=into)) == 3
        plain.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(plain(X).logits, scaled(X).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fields,expected", [
    (dict(qk_norm="qk"), "qk_norm_scope='full'.*--format remote-code"),
    (dict(qk_norm="q", qk_norm_scope="head"), "qk_norm='q'.*--format remote-code"),
    (dict(logit_scale_c=0.1), "logit_scale_c=0.1.*--format remote-code"),
    (dict(qk_norm="qk", qk_norm_scope="head", rope_layers=[0]), "mixes RoPE and NoPE"),
])
def test_no_native_layout_is_refused_with_the_alternative(tmp_path, fields, expected):
    make_drope(tmp_path / "src", **fields)
    with pytest.raises(CheckpointError, match=expected):
        export_checkpoint(tmp_path / "src", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_export_refuses_a_non_drope_checkpoint(debug_checkpoint, tmp_path, capsys):
    assert cli(["export", str(debug_checkpoint), str(tmp_path / "out")]) == 2
    assert "run `drope drop-rope` on it first" in capsys.readouterr().err
