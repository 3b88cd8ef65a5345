"""The real SmolLM2-135M (GGUF from PyPI, imported to safetensors): NIAH niah_single_1 at 1x its
pretraining context (2048) and at 2x, a few samples each, end to end through the evaluate stage:
token-exact RULER prompts, greedy KV-cache decoding, the results table and the heatmap.

Scores are printed (pytest -s) for the issue note; they are not asserted: a 135M model's retrieval
is the measurement, not a property of this code.
"""

import json

import pytest

from drope_ops.evals import niah
from drope_ops.gguf import import_gguf
from workflows.stages.evaluate import EvalConfig, evaluate

pytestmark = pytest.mark.real_model
C_TRAIN = 2048  # SmolLM2 pretrained at 2048 tokens; its config says 8192 (release-time extension)


@pytest.fixture(scope="module")
def smollm2_checkpoint(smollm2_gguf, tmp_path_factory):
    return import_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2-eval") / "imported")


def test_prompts_are_token_exact_with_the_real_tokenizer(smollm2_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    for depth in (0, 50, 100):
        s = niah.make_sample("niah_single_1", tok, length=4096, depth=depth, max_new_tokens=16)
        assert len(s.prompt_ids) == 4096 - 16
        assert tok.decode(s.prompt_ids) == s.text
        assert s.text.startswith("A special magic number is hidden within the following text.")


def test_base_model_niah_single_1_at_1x_and_2x(smollm2_checkpoint, tmp_path):
    cfg = EvalConfig(variants=["rope"], tasks=["niah_single_1"], extension_factors=[1, 2], samples_per_cell=3,
                     depths=[0, 50, 100], max_new_tokens=12, original_context=C_TRAIN, dtype="bfloat16")
    res = evaluate(cfg, drope_checkpoint=None, base_checkpoint=str(smollm2_checkpoint), output_dir=str(tmp_path))
    table = json.loads(open(res["table_json"]).read())
    assert table["columns"] == ["niah_single_1@2048", "niah_single_1@4096"]
    scores = table["rows"]["rope"]
    assert all(0 <= scores[c] <= 100 for c in table["columns"])
    assert [p.endswith("heatmap_niah_single_1_rope.png") for p in res["heatmaps"]] == [True]
    assert open(res["heatmaps"][0], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    for r in res["results"]:
        assert len(r["samples"]) == 3 and set(r["by_depth"]) == {0, 50, 100}
        for s in r["samples"]:
            print(f"L={r['length']} depth={s['depth']} expected={s['answers']} output={s['output']!r}")
    print(open(res["table_md"]).read())
