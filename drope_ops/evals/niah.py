"""Needle in a haystack in RULER's formats (NVIDIA/RULER scripts/data/synthetic/niah.py + constants.py).

    tok_len = len(sample.prompt_ids)            # == length - max_new_tokens, exactly
    sample = make_sample("niah_single_1", tokenizer, length=4096, depth=50, index=0, seed=0)
    result = evaluate_cell(model, tokenizer, "niah_single_1", 4096, depths=[0, 50, 100], samples=3)

Faithful to RULER: the needle, the noise sentence, the question template with its answer prefix
(singular rewrite when one value is asked), keys from wonderwords' adjective-noun pairs, 7-digit
numbers and UUIDs as values, the eight niah_* task definitions, and string_match_all scoring.

Where this departs, on purpose: lengths are token-exact (RULER binary-searches a haystack size that
fits); the context is built from separately tokenised pieces (prompt head, haystack units, needles,
question) so the prompt has exactly `length - max_new_tokens` tokens, the last haystack unit cut at a
token boundary. `depth` places the first answer needle (RULER draws all depths at random); other
needles take random depths from RULER's 40-point grid. The essay haystack is any text split into
sentences by a regex (RULER uses Paul Graham's essays and nltk); offline it is Shakespeare.
"""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from drope_ops.errors import SpecError

TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)]


@dataclass(frozen=True)
class NiahTask:
    """One RULER NIAH configuration (synthetic.yaml)."""

    haystack: str
    """"noise", "essay" or "needle" (distractor needles)."""
    type_needle_k: str
    """Key kind: "words", "numbers" or "uuids"."""
    type_needle_v: str
    """Value kind: "words", "numbers" or "uuids"."""
    num_needle_k: int = 1
    num_needle_v: int = 1
    num_needle_q: int = 1


TASKS = {
    "niah_single_1": NiahTask("noise", "words", "numbers"),
    "niah_single_2": NiahTask("essay", "words", "numbers"),
    "niah_single_3": NiahTask("essay", "words", "uuids"),
    "niah_multikey_1": NiahTask("essay", "words", "numbers", num_needle_k=4),
    "niah_multikey_2": NiahTask("needle", "words", "numbers"),
    "niah_multikey_3": NiahTask("needle", "uuids", "uuids"),
    "niah_multivalue": NiahTask("essay", "words", "numbers", num_needle_v=4),
    "niah_multiquery": NiahTask("essay", "words", "numbers", num_needle_k=4, num_needle_q=4),
}


@lru_cache(maxsize=1)
def _adjectives_and_nouns() -> tuple[list[str], list[str]]:
    import wonderwords

    nouns = wonderwords.random_word._get_words_from_text_file("nounlist.txt")
    adjs = wonderwords.random_word._get_words_from_text_file("adjectivelist.txt")
    return sorted(set(adjs)), sorted(set(nouns))


def random_word(rng: random.Random) -> str:
    """RULER's key word: an "adjective-noun" pair from wonderwords' lists (uniform over the pairs,
    without materialising RULER's 6-million-entry list)."""
    adjs, nouns = _adjectives_and_nouns()
    return f"{rng.choice(adjs)}-{rng.choice(nouns)}"


def random_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))  # 7 digits
    if kind == "words":
        return random_word(rng)
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise SpecError(f"needle type {kind!r} is unknown; use numbers, words or uuids")


def prompt_template(task: NiahTask) -> tuple[str, str]:
    """(template + answer prefix, type_needle_v as shown): RULER's singular rewrite for one value."""
    template, type_v = TEMPLATE + ANSWER_PREFIX, task.type_needle_v
    if task.num_needle_q * task.num_needle_v == 1:
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(old, new)
        type_v = type_v[:-1]
    return template, type_v


def split_sentences(text: str) -> list[str]:
    """Whitespace-normalised sentences (a regex stand-in for nltk's sent_tokenize)."""
    text = re.sub(r"\s+", " ", text).strip()
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


@dataclass
class NiahSample:
    """One prompt with its expected answers."""

    task: str
    length: int
    """Token budget: prompt tokens + max_new_tokens."""
    depth: int
    """Depth (0..100 %) of the first answer needle in the context."""
    prompt_ids: list[int]
    text: str
    """The prompt as text: the exact concatenation of its pieces."""
    answers: list[str]
    needle_token_starts: list[int] = field(default_factory=list)
    """Token index of each answer needle's first token in prompt_ids."""
    context_span: tuple[int, int] = (0, 0)
    """[start, end) token indices of the context in prompt_ids."""


class _Encoder:
    """Tokenizes pieces without specials, caching repeated ones (the noise sentence, needles)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}
        with_special = tokenizer("x").input_ids
        bare = tokenizer("x", add_special_tokens=False).input_ids
        self.leading = with_special[: len(with_special) - len(bare)] if with_special[-len(bare):] == bare else []

    def __call__(self, text: str) -> list[int]:
        ids = self.cache.get(text)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            if len(self.cache) < 200_000:
                self.cache[text] = ids
        return ids


_ENCODERS: dict[int, _Encoder] = {}


def _encoder(tokenizer) -> _Encoder:
    enc = _ENCODERS.get(id(tokenizer))
    if enc is None or enc.tokenizer is not tokenizer:
        enc = _ENCODERS[id(tokenizer)] = _Encoder(tokenizer)
    return enc


def make_sample(task_name: str, tokenizer, *, length: int, depth: int, index: int = 0, seed: int = 0,
                max_new_tokens: int = 128, haystack: str | None = None,
                essay_sentences: list[str] | None = None) -> NiahSample:
    """A RULER NIAH prompt of exactly `length - max_new_tokens` tokens.

    haystack overrides the task's own "noise"/"essay" haystack (tasks on the "needle" haystack keep
    it). essay_sentences: the essay haystack's sentences (see split_sentences); required for essay.
    """
    if task_name not in TASKS:
        raise SpecError(f"NIAH task {task_name!r} is unknown; choose from {sorted(TASKS)}")
    if not 0 <= depth <= 100:
        raise SpecError(f"needle depth {depth} must be in 0..100 (percent of the context)")
    task = TASKS[task_name]
    kind = task.haystack if (haystack is None or task.haystack == "needle") else haystack
    rng = random.Random(f"{seed}/{task_name}/{depth}/{index}")  # same needles at every length
    enc = _encoder(tokenizer)

    # Keys, values and needles as RULER draws them; answers: the values of the queried keys.
    keys, values, needles, owner = [], [], [], []
    for k in range(max(task.num_needle_k, task.num_needle_q)):
        keys.append(random_value(task.type_needle_k, rng))
        values.append([random_value(task.type_needle_v, rng) for _ in range(task.num_needle_v)])
        for v in values[-1]:
            needles.append(NEEDLE.format(type_needle_v=task.type_needle_v, key=keys[-1], value=v))
            owner.append(k)
    queried = rng.sample(range(len(keys)), task.num_needle_q)
    answers = [v for k in queried for v in values[k]]
    queries = [keys[k] for k in queried]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, type_v = prompt_template(task)
    head, tail = template.split("{context}")
    head, tail = head.format(type_needle_v=type_v), tail.format(type_needle_v=type_v, query=query)

    # Token budget of the context: everything the head, the question and the needles do not take.
    head_ids, tail_ids = enc.leading + enc(head), enc(tail)
    sep = " " if kind == "essay" else "\n"
    budget = length - max_new_tokens - len(head_ids) - len(tail_ids)
    needle_ids = [enc(sep + n) for n in needles]
    hay_budget = budget - sum(map(len, needle_ids))
    if hay_budget < 1:
        raise SpecError(f"length {length} is too short for {task_name} with max_new_tokens={max_new_tokens}; "
                        f"the prompt frame and needles alone take {length - hay_budget} tokens")

    units = _haystack_units(kind, task, rng, enc, sep, hay_budget, essay_sentences)
    unit_ids = [enc(sep + u) for u in units]
    n, used = 0, len(enc(units[0])) - len(unit_ids[0])  # the context's first piece has no separator
    while n < len(unit_ids) and used + len(unit_ids[n]) <= hay_budget:
        used += len(unit_ids[n])
        n += 1

    # Needle slots between full units: the first answer needle at `depth`, the rest at random depths.
    first_answer = owner.index(queried[0])
    order = [first_answer] + [i for i in range(len(needles)) if i != first_answer]
    slot = {order[0]: int(n * depth / 100)}
    for i, d in zip(order[1:], rng.sample(DEPTHS, len(order) - 1)):
        slot[i] = int(n * d / 100)
    by_slot: dict[int, list[int]] = {}
    for i in sorted(slot, key=lambda i: (slot[i], i)):
        by_slot.setdefault(slot[i], []).append(i)

    def build(n_units: int):
        """Pieces (text, ids, needle index) of the context: units with needles in their slots, then a
        filler cut from the next units to the exact budget, then the needles of the last slot."""
        body = []
        for u in range(n_units):
            body += [(needles[i], needle_ids[i], i) for i in by_slot.get(u, [])]
            body.append((units[u], unit_ids[u], None))
        end = [(needles[i], needle_ids[i], i) for i in by_slot.get(n_units, [])]
        pieces = body + end
        if body:  # RULER joins the context's pieces: the first one has no separator before it
            pieces[0] = (pieces[0][0], enc(pieces[0][0]), pieces[0][2])
        texts = [p[0] if (j == 0 and body) else sep + p[0] for j, p in enumerate(pieces)]
        left = budget - sum(len(p[1]) for p in pieces)
        filler_ids, filler_text, u = [], [], n_units
        while left > 0:
            piece = unit_ids[u % len(unit_ids)][:left] if (body or u > n_units) else enc(units[u])[:left]
            filler_ids += piece
            filler_text.append(tokenizer.decode(piece))
            left -= len(piece)
            u += 1
        ids, text, starts = list(head_ids), [head], {}
        for j, ((_, piece_ids, needle), piece_text) in enumerate(zip(pieces, texts)):
            if j == len(body):
                ids += filler_ids
                text += filler_text
            if needle is not None:
                starts[needle] = len(ids)
            ids += piece_ids
            text.append(piece_text)
        if len(body) == len(pieces):
            ids += filler_ids
            text += filler_text
        return ids, text, starts, left

    ids, text, starts, left = build(n)
    while left < 0 and n > 0:  # a first piece may tokenise longer alone than with its separator
        n -= 1
        merged: dict[int, list[int]] = {}
        for k, v in sorted(by_slot.items()):
            merged.setdefault(min(k, n), []).extend(v)
        by_slot = merged
        ids, text, starts, left = build(n)
    context_start, context_end = len(head_ids), len(ids)
    ids += tail_ids
    text.append(tail)
    full_text = "".join(text)
    answer_needles = [i for i in range(len(needles)) if owner[i] in queried]
    return NiahSample(
        task=task_name, length=length, depth=depth, prompt_ids=ids, text=full_text, answers=answers,
        needle_token_starts=sorted(starts[i] for i in answer_needles), context_span=(context_start, context_end),
    )


def _haystack_units(kind, task, rng, enc, sep, hay_budget, essay_sentences) -> list[str]:
    """Haystack units (sentences) enough to fill hay_budget tokens, plus one to cut from."""
    if kind == "noise":
        per = len(enc(sep + NOISE))
        return [NOISE] * (hay_budget // per + 2)
    if kind == "needle":
        out, used = [], 0
        while used <= hay_budget:
            out.append(NEEDLE.format(type_needle_v=task.type_needle_v, key=random_value(task.type_needle_k, rng),
                                     value=random_value(task.type_needle_v, rng)))
            used += len(enc(sep + out[-1]))
        return out
    if kind == "essay":
        if not essay_sentences:
            raise SpecError("the essay haystack needs text: pass essay sentences (offline: Shakespeare)")
        out, used, i = [], 0, 0
        while used <= hay_budget:  # RULER repeats the essay when it is too short
            out.append(essay_sentences[i % len(essay_sentences)])
            used += len(enc(sep + out[-1]))
            i += 1
        return out
    raise SpecError(f"haystack {kind!r} is unknown; use essay or noise")


def postprocess_pred(text: str) -> str:
    """RULER's postprocessing: strip, control characters to newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", text.strip()).strip()


def string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    """RULER's metric: mean over samples of the fraction of expected values found (case-blind), x100."""
    if not preds:
        return 0.0
    score = sum(sum(r.lower() in p.lower() for r in ref) / len(ref) for p, ref in zip(preds, refs))
    return round(score / len(preds) * 100, 2)


def load_essay_sentences(paths, max_chars: int = 4_000_000) -> list[str]:
    """Sentences of the text files at `paths`, read in order until max_chars characters."""
    chunks, total = [], 0
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            chunks.append(f.read(max_chars - total))
        total += len(chunks[-1])
        if total >= max_chars:
            break
    return split_sentences(" ".join(chunks))


def sample_depths(depths: list[int], samples: int) -> list[int]:
    """Depth of each of `samples` samples: the depth list cycled (0..100 evenly when empty)."""
    depths = list(depths) or [int(d) for d in np.linspace(0, 100, max(samples, 2)).round()]
    return [depths[i % len(depths)] for i in range(samples)]


def evaluate_cell(model, tokenizer, task_name: str, length: int, *, depths: list[int], samples: int,
                  max_new_tokens: int = 128, seed: int = 0, haystack: str | None = None,
                  essay_sentences: list[str] | None = None, progress=None) -> dict:
    """Score one (task, length) cell: greedy answers to `samples` prompts, RULER's string_match_all.

    Returns {"score", "by_depth": {depth: score}, "samples": [{depth, answers, output, score}]}.
    """
    from drope_ops.evals.decoding import greedy_generate
    import torch

    rows = []
    for index, depth in enumerate(sample_depths(depths, samples)):
        sample = make_sample(task_name, tokenizer, length=length, depth=depth, index=index, seed=seed,
                             max_new_tokens=max_new_tokens, haystack=haystack, essay_sentences=essay_sentences)
        new = greedy_generate(model, torch.tensor(sample.prompt_ids), max_new_tokens=max_new_tokens,
                              eos_token_id=tokenizer.eos_token_id)
        output = postprocess_pred(tokenizer.decode(new, skip_special_tokens=True))
        score = string_match_all([output], [sample.answers])
        rows.append({"depth": depth, "answers": sample.answers, "output": output, "score": score})
        if progress:
            progress(f"{task_name} L={length} depth={depth}: {score:.0f} ({output[:40]!r})")
    by_depth: dict[int, list[float]] = {}
    for r in rows:
        by_depth.setdefault(r["depth"], []).append(r["score"])
    return {
        "score": round(sum(r["score"] for r in rows) / max(len(rows), 1), 2),
        "by_depth": {d: sum(v) / len(v) for d, v in sorted(by_depth.items())},
        "samples": rows,
    }
