"""The official DroPE release layout in and out (drope_ops.sakana): ours against theirs on a tiny checkpoint.

`theirs` is a re-derivation of SakanaAI/DroPE's attention at commit 260a8bb (custom_models/attention.py:
llama_qk_norm_nope_attn_forward and the nope() wrapper; custom_models/drope.py: the config keys), on
vanilla transformers' LlamaForCausalLM: torch.nn.RMSNorm over the q_proj / k_proj output (full width,
eps = rms_norm_eps) before the head split, RoPE applied with cos = 1, sin = 0, and `softmax_scale`,
when the config has it, replacing 1/sqrt(head_dim). Their code is not run or copied.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb, eager_attention_forward

from drope_ops.debugmodel import make_debug_release
from drope_ops.errors import CheckpointError
from drope_ops.export import export_checkpoint
from drope_ops.fetch import fetch
from drope_ops.modeling import DropeForCausalLM
from drope_ops.sakana import import_release

KINDS = ("nope", "qk_norm_nope", "q_norm_nope", "k_norm_nope")


class TheirAttention(LlamaAttention):
    """SakanaAI/DroPE@260a8bb's NoPE / *_norm_nope attention, re-derived (both norms built for *_norm_nope)."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.kind = config.attention_type
        if self.kind != "nope":
            self.q_norm = nn.RMSNorm(config.num_attention_heads * config.head_dim, config.rms_norm_eps)
            self.k_norm = nn.RMSNorm(config.num_key_value_heads * config.head_dim, config.rms_norm_eps)
        if getattr(config, "softmax_scale", None) is not None:
            self.scaling = config.softmax_scale

    def forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k = self.q_proj(hidden_states), self.k_proj(hidden_states)  # (B, T, H*D) before the split
        if self.kind in ("qk_norm_nope", "q_norm_nope"):
            q = self.q_norm(q)
        if self.kind in ("qk_norm_nope", "k_norm_nope"):
            k = self.k_norm(k)
        q, k = q.view(hidden_shape).transpose(1, 2), k.view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, torch.ones_like(cos), torch.zeros_like(sin))  # their null RoPE
        out, weights = eager_attention_forward(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def theirs(path) -> LlamaForCausalLM:
    """Their model of a checkpoint in their layout: every key of the files loaded, none missing (strict)."""
    raw = json.loads((path / "config.json").read_text())
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "auto_map")}
    config = LlamaConfig(**fields)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn = TheirAttention(config, i)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.eval()


def ours(path) -> DropeForCausalLM:
    return DropeForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", KINDS)
def test_imported_release_has_their_logits(kind, tmp_path, ids):
    release = make_debug_release(tmp_path / "release", attention_type=kind)
    imported = import_release(release, tmp_path / "imported", progress=False)
    config = json.loads((imported / "config.json").read_text())
    assert config["model_type"] == "drope" and config["source_layout"] == f"llama_drope/{kind}"
    assert config["qk_norm_scope"] == "full" and config["rope_layers"] == []
    assert config["logit_scale"] == pytest.approx(0.3 * 16 ** 0.5)  # softmax_scale * sqrt(head_dim)
    theirs_logits, ours_logits = logits(theirs(release), ids), logits(ours(imported), ids)
    print(f"{kind}: max |ours - theirs| = {(ours_logits - theirs_logits).abs().max().item():.3g}")
    torch.testing.assert_close(ours_logits, theirs_logits, rtol=1e-5, atol=1e-5)


def test_release_without_softmax_scale_keeps_one_over_sqrt_d(tmp_path, ids):
    release = make_debug_release(tmp_path / "release", softmax_scale=None)
    imported = import_release(release, tmp_path / "imported", progress=False)
    assert json.loads((imported / "config.json").read_text())["logit_scale"] == 1.0
    torch.testing.assert_close(logits(ours(imported), ids), logits(theirs(release), ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_export_sakana_round_trip(kind, tmp_path, ids):
    release = make_debug_release(tmp_path / "release", attention_type=kind)
    imported = import_release(release, tmp_path / "imported", progress=False)
    exported = export_checkpoint(imported, tmp_path / "exported", format="sakana", progress=False)
    raw = json.loads((exported / "config.json").read_text())
    assert raw["model_type"] == "llama_drope" and raw["attention_type"] == kind
    assert raw["softmax_scale"] == pytest.approx(0.3) and "auto_map" not in raw
    torch.testing.assert_close(logits(theirs(exported), ids), logits(ours(imported), ids), rtol=1e-5, atol=1e-5)
    again = import_release(exported, tmp_path / "again", progress=False)
    a, b = ours(imported).state_dict(), ours(again).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_drope_surgery_output_exports_to_their_layout(debug_checkpoint, tmp_path, ids):
    from drope_ops.surgery import drop_rope

    dropped = drop_rope(debug_checkpoint, tmp_path / "dropped", qk_norm="q", progress=False)
    exported = export_checkpoint(dropped, tmp_path / "exported", format="sakana", progress=False)
    assert json.loads((exported / "config.json").read_text())["attention_type"] == "q_norm_nope"
    torch.testing.assert_close(logits(theirs(exported), ids), logits(ours(dropped), ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options, field", [
    (dict(qk_norm="qk", qk_norm_scope="head"), "qk_norm_scope"),
    (dict(qk_norm="qk", rope_layers=[0]), "rope_layers"),
])
def test_export_sakana_refuses_what_their_layout_cannot_hold(debug_checkpoint, tmp_path, options, field):
    from drope_ops.surgery import drop_rope

    dropped = drop_rope(debug_checkpoint, tmp_path / "dropped", progress=False, **options)
    with pytest.raises(CheckpointError, match=field) as e:
        export_checkpoint(dropped, tmp_path / "exported", format="sakana", progress=False)
    assert "\n" not in str(e.value) and "--format remote-code" in str(e.value)
    assert not (tmp_path / "exported").exists()


def test_export_sakana_refuses_a_dynamic_logit_scale(tmp_path):
    imported = import_release(make_debug_release(tmp_path / "release"), tmp_path / "imported", progress=False)
    config = json.loads((imported / "config.json").read_text())
    (imported / "config.json").write_text(json.dumps({**config, "logit_scale_c": 0.1}))
    with pytest.raises(CheckpointError, match="logit_scale_c"):
        export_checkpoint(imported, tmp_path / "exported", format="sakana", progress=False)
    assert not (tmp_path / "exported").exists()


def _edit_weights(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "config.json").write_text(json.dumps(
        {**json.loads((p / "config.json").read_text()), "attention_type": "rope_norm"})), "attention_type 'rope_norm'"),
    (lambda p: _edit_weights(p, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)})),
     r"q_norm.weight has shape \[16\], the layout needs \[64\]"),
    (lambda p: _edit_weights(p, lambda t: t.pop("model.layers.1.self_attn.q_norm.weight")),
     "weights lack model.layers.1.self_attn.q_norm.weight"),
])
def test_bad_release_is_refused_in_one_line_with_nothing_written(tmp_path, damage, message):
    release = make_debug_release(tmp_path / "release")
    damage(release)
    for attempt in (lambda: import_release(release, tmp_path / "imported", progress=False),
                    lambda: fetch(str(release), str(tmp_path / "fetched"), expect="drope", progress=False)):
        with pytest.raises(CheckpointError, match=message) as e:
            attempt()
        assert "\n" not in str(e.value)
    assert not (tmp_path / "imported").exists() and not (tmp_path / "fetched").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial directory left


def test_fetch_imports_a_release_as_data(tmp_path, ids):
    release = make_debug_release(tmp_path / "release")
    (release / "drope.py").write_text("raise SystemExit('their code must never run')\n")
    fetch(str(release), str(tmp_path / "fetched"), expect="drope", progress=False)
    names = sorted(p.name for p in (tmp_path / "fetched").iterdir())
    assert "drope.py" not in names and "drope-manifest.json" in names
    config = json.loads((tmp_path / "fetched" / "config.json").read_text())
    assert config["model_type"] == "drope" and "auto_map" not in config
    torch.testing.assert_close(logits(ours(tmp_path / "fetched"), ids), logits(theirs(release), ids),
                               rtol=1e-5, atol=1e-5)


def test_fetch_for_drop_rope_refuses_a_release_naming_already_drope(tmp_path):
    release = make_debug_release(tmp_path / "release")
    with pytest.raises(CheckpointError, match="model.already_drope: true"):
        fetch(str(release), str(tmp_path / "fetched"), progress=False)  # expect="rope": the default
    assert not (tmp_path / "fetched").exists()


def test_fetch_for_already_drope_refuses_a_rope_model(debug_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="unset model.already_drope"):
        fetch(str(debug_checkpoint), str(tmp_path / "fetched"), expect="drope", progress=False)


def test_cli_fetch_and_export_sakana(tmp_path, ids, capsys):
    """The README's rows: `drope fetch` of a release, `drope export --format sakana` back to it."""
    from workflows.cli import main as cli

    release = make_debug_release(tmp_path / "release", attention_type="k_norm_nope")
    assert cli(["fetch", str(release), str(tmp_path / "fetched"), "--no-progress"]) == 0
    assert cli(["export", str(tmp_path / "fetched"), str(tmp_path / "exported"), "--format", "sakana",
                "--no-progress"]) == 0
    torch.testing.assert_close(logits(theirs(tmp_path / "exported"), ids), logits(theirs(release), ids),
                               rtol=1e-5, atol=1e-5)
    assert cli(["export", str(tmp_path / "fetched"), str(tmp_path / "exported"), "--format", "sakana"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_eval_only_presets_skip_drop_rope_and_recalibrate():
    from workflows.pipeline import stage_names, stage_spec
    from workflows.spec import load_spec

    for preset in ("sakana-debug-eval", "sakana-llama-2-7b-drope-eval"):
        spec = load_spec(preset)
        assert stage_names(spec) == ["fetch_drope", "fetch_base", "fit_temperature", "evaluate"], preset
    spec = load_spec("sakana-llama-2-7b-drope-eval")
    assert spec.model.base_source == "hf://meta-llama/Llama-2-7b-hf"
    assert stage_spec(spec, "fetch_base") == {"model.base_source": spec.model.base_source, "model.allow_pickle": False}
    assert stage_names(load_spec("debug"))[:3] == ["fetch", "drop_rope", "recalibrate"]
    from workflows.plan import check_fits, describe

    text = describe(spec)
    assert "fetch_drope: hf://SakanaAI/Llama-2-7b-hf-DroPE" in text and "recalibrate:" not in text
    assert check_fits(spec.__class__(**{**vars(spec), "plan": type(spec.plan)(gpu_memory_gb=1.0)})) is None


@pytest.mark.parametrize("overrides, message", [
    (["model.base_source="], "model.already_drope: give model.base_source"),
    (["model.already_drope=false"], "model.base_source is only for model.already_drope"),
    (["model.base_source=ftp://x/y"], "model.base_source 'ftp://x/y': ftp:// is not supported"),
    (["pretrain.enabled=true"], "pretrain.enabled and model.already_drope exclude each other"),
])
def test_eval_only_spec_mistakes_are_one_line(overrides, message):
    from drope_ops.errors import SpecError
    from workflows.spec import load_spec

    with pytest.raises(SpecError, match=message) as e:
        load_spec("sakana-debug-eval", overrides)
    assert "\n" not in str(e.value)
