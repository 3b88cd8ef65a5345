"""NIAH in RULER's formats: templates character for character, token-exact lengths, depths, scoring,
and greedy decoding that uses the KV cache (one prefill, one step per new token)."""

import re
from types import SimpleNamespace

import pytest
import torch

from drope_ops import debugmodel
from drope_ops.evals import niah
from drope_ops.evals.decoding import greedy_generate

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@pytest.fixture(scope="module")
def tok():
    return debugmodel.byte_level_tokenizer()  # 1 byte = 1 token: lengths are exact by hand too


@pytest.fixture(scope="module")
def essay():
    text = " ".join(f"Sentence number {i} of the essay is here." for i in range(400))
    return niah.split_sentences(text)


def _key_value(sample):
    m = re.search(r"for ([\w-]+) is: (\d{7})\.", sample.text)
    return m.group(1), m.group(2)


def test_single_noise_prompt_is_rulers_template_exactly(tok):
    # 4 noise lines, needle at depth 50 -> slot int(4 * 0.5) = 2, no filler (length fitted by hand).
    probe = niah.make_sample("niah_single_1", tok, length=2000, depth=50, index=3, max_new_tokens=16)
    key, value = _key_value(probe)
    needle = f"One of the special magic numbers for {key} is: {value}."
    head = ("A special magic number is hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the number afterwards.\n")
    tail = (f"\nWhat is the special magic number for {key} mentioned in the provided text? "
            f"The special magic number for {key} mentioned in the provided text is")
    context = "\n".join([NOISE, NOISE, needle, NOISE, NOISE])
    expected = head + context + tail
    sample = niah.make_sample("niah_single_1", tok, length=len(expected) + 16, depth=50, index=3,
                              max_new_tokens=16)
    assert sample.text == expected
    assert sample.answers == [value]
    assert len(sample.prompt_ids) == len(expected)


def test_multiquery_template_plural_and_query_list(tok, essay):
    s = niah.make_sample("niah_multiquery", tok, length=3000, depth=0, max_new_tokens=32, essay_sentences=essay)
    keys = re.findall(r"for ([\w-]+) is: \d{7}\.", s.text)
    assert len(keys) == 4 and len(s.answers) == 4
    assert s.text.startswith("Some special magic numbers are hidden within the following text. Make sure to "
                             "memorize it. I will quiz you about the numbers afterwards.\nOne of the special "
                             "magic numbers for ")  # depth 0: the first answer needle opens the context
    m = re.search(r"\nWhat are all the special magic numbers for (.+) mentioned in the provided text\? "
                  r"The special magic numbers for (.+) mentioned in the provided text are$", s.text)
    assert m and m.group(1) == m.group(2)
    queried = m.group(1).replace(", and ", ", ").split(", ")
    assert sorted(queried) == sorted(keys)


@pytest.mark.parametrize("task", sorted(niah.TASKS))
@pytest.mark.parametrize("length", [1500, 2345])
def test_lengths_are_token_exact_and_text_round_trips(tok, essay, task, length):
    s = niah.make_sample(task, tok, length=length, depth=40, max_new_tokens=20, essay_sentences=essay)
    assert len(s.prompt_ids) == length - 20
    assert tok.decode(s.prompt_ids) == s.text
    for answer in s.answers:
        assert f"is: {answer}." in s.text


def test_value_kinds_follow_ruler():
    import random

    rng = random.Random(0)
    assert re.fullmatch(r"[1-9]\d{6}", niah.random_value("numbers", rng))
    assert re.fullmatch(r"[\w'.]+(?: [\w'.]+)*-[\w' .-]+", niah.random_value("words", rng))
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        niah.random_value("uuids", rng))


@pytest.mark.parametrize("depth", [0, 25, 50, 75, 100])
def test_needle_sits_at_the_requested_depth(tok, depth):
    s = niah.make_sample("niah_single_1", tok, length=4000, depth=depth, max_new_tokens=16)
    start, end = s.context_span
    needle_len = len(f"One of the special magic numbers for x is: 1234567.") + 40
    slack = (len(NOISE) + 1 + needle_len) / (end - start)  # one noise line plus the needle itself
    assert abs((s.needle_token_starts[0] - start) / (end - start) - depth / 100) <= slack


def test_samples_are_seeded_and_reproducible(tok):
    a = niah.make_sample("niah_multikey_2", tok, length=1200, depth=30, index=1, seed=7, max_new_tokens=8)
    b = niah.make_sample("niah_multikey_2", tok, length=1200, depth=30, index=1, seed=7, max_new_tokens=8)
    c = niah.make_sample("niah_multikey_2", tok, length=1200, depth=30, index=1, seed=8, max_new_tokens=8)
    assert a.prompt_ids == b.prompt_ids and a.answers == b.answers
    assert a.answers != c.answers


def test_string_match_all_scores_100_50_0():
    refs = [["1234567", "7654321"]]
    assert niah.string_match_all(["The numbers are 1234567 and 7654321."], refs) == 100.0
    assert niah.string_match_all(["Only 1234567 here"], refs) == 50.0
    assert niah.string_match_all(["nothing"], refs) == 0.0
    assert niah.postprocess_pred("  12\x0034 \n") == "12\n34"


class CopyNeedleModel(torch.nn.Module):
    """Answers the queried key's value from the prompt, one token per call; counts its calls."""

    def __init__(self, tok):
        super().__init__()
        self.tok, self.config, self.calls = tok, SimpleNamespace(), []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, past_key_values=None, **kwargs):
        self.calls.append(input_ids.shape[1])
        if input_ids.shape[1] > 1:  # a prefill: read the prompt
            text = self.tok.decode(input_ids[0])
            key = re.search(r"magic numbers? for ([\w-]+) mentioned", text).group(1)
            value = re.search(rf"for {re.escape(key)} is: (\d+)\.", text).group(1)
            self.queue = self.tok(" " + value + ".", add_special_tokens=False).input_ids + [self.tok.eos_token_id]
        logits = torch.full((1, 1, len(self.tok)), -1e4)
        logits[0, 0, self.queue.pop(0)] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


def test_model_that_copies_the_needle_scores_100(tok, essay):
    model = CopyNeedleModel(tok)
    result = niah.evaluate_cell(model, tok, "niah_single_2", 1500, depths=[0, 50, 100], samples=3,
                                max_new_tokens=16, essay_sentences=essay)
    assert result["score"] == 100.0
    assert result["by_depth"] == {0: 100.0, 50: 100.0, 100: 100.0}


def test_greedy_decoding_prefills_once_then_one_token_per_step(debug_checkpoint):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(debug_checkpoint).eval()
    seen = []
    model.model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["input_ids"].shape[1]),
                                          with_kwargs=True)
    prompt = torch.randint(0, 256, (100,))
    new = greedy_generate(model, prompt, max_new_tokens=12, eos_token_id=None)
    assert len(new) == 12
    assert seen == [100] + [1] * 11  # one prefill of the whole prompt, then one token per step
    # the cached steps give the same tokens as re-running the whole prefix (what caching must not change)
    ids = prompt.view(1, -1)
    for token in new:
        with torch.no_grad():
            ref = int(model(ids).logits[0, -1].argmax())
        assert ref == token
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
