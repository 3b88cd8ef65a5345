"""The real SmolLM2-135M (GGUF from PyPI, imported to safetensors): NIAH niah_single_1 at 1x its
pretraining context (2048) and at 2x, a few samples each, end to end through the evaluate stage:
token-exact RULER prompts, greedy KV-cache decoding, the results table and the heatmap.

The base model retrieves niah_single_1 needles at 1x and 2x (README, qs3 in fp32 and qs4 in bf16:
RoPE 100 at 2048 and 4096; SmolLM2 was extended to 8k), so the test asserts that: every 1x sample's
output holds its own gold needle, at least 2 of 3 at 2x (one sample of slack for bf16 rounding on
a CPU where the dtype probe picks bf16: `dtype: auto`, as the presets run; where bf16 is emulated it
took 291 s instead of 85 s), and each sample's score is RULER's string match of its output against
the needle that make_sample planted in its prompt. Outputs are printed (pytest -s).
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
    from transformers import AutoTokenizer

    cfg = EvalConfig(variants=["rope"], tasks=["niah_single_1"], extension_factors=[1, 2], samples_per_cell=3,
                     depths=[0, 50, 100], max_new_tokens=12, original_context=C_TRAIN, dtype="auto")
    res = evaluate(cfg, drope_checkpoint=None, base_checkpoint=str(smollm2_checkpoint), output_dir=str(tmp_path))
    table = json.loads(open(res["table_json"]).read())
    assert table["columns"] == ["niah_single_1@2048", "niah_single_1@4096"]
    assert [p.endswith("heatmap_niah_single_1_rope.png") for p in res["heatmaps"]] == [True]
    assert open(res["heatmaps"][0], "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    by_length = {r["length"]: r for r in res["results"]}
    assert sorted(by_length) == [2048, 4096]
    for length, r in sorted(by_length.items()):
        assert len(r["samples"]) == 3 and [s["depth"] for s in r["samples"]] == [0, 50, 100]
        for index, s in enumerate(r["samples"]):
            print(f"L={length} depth={s['depth']} expected={s['answers']} output={s['output']!r}")
            # the gold answer is the 7-digit value of the needle planted in this sample's prompt
            gold = niah.make_sample("niah_single_1", tok, length=length, depth=s["depth"], index=index,
                                    seed=cfg.seed, max_new_tokens=cfg.max_new_tokens)
            assert s["answers"] == gold.answers and len(gold.answers) == 1
            assert gold.answers[0].isdigit() and len(gold.answers[0]) == 7
            assert gold.text.count(gold.answers[0]) == 1  # in the prompt once: the needle, not the query
            assert s["score"] == (100.0 if gold.answers[0] in s["output"] else 0.0)
        assert r["score"] == pytest.approx(sum(s["score"] for s in r["samples"]) / 3, abs=0.01)
        assert table["rows"]["rope"][f"niah_single_1@{length}"] == pytest.approx(r["score"], abs=0.01)
        assert r["by_depth"] == {s["depth"]: s["score"] for s in r["samples"]}
    assert len({s["answers"][0] for s in by_length[2048]["samples"]}) == 3  # a different needle each

    # what could break: the real model stops finding the needle at its own context (prompt, decoding,
    # dtype or import broken), or beyond 2048 positions (cache positions, RoPE base / scaling)
    assert [s["score"] for s in by_length[2048]["samples"]] == [100.0, 100.0, 100.0]
    assert by_length[2048]["score"] == 100.0
    assert sum(s["score"] == 100.0 for s in by_length[4096]["samples"]) >= 2
    print(open(res["table_md"]).read())
