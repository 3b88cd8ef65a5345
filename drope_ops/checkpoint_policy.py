"""What a fetched checkpoint may contain: downloaded checkpoints are data, never code.

- weights: safetensors only by default; pickles (`*.bin`, `*.pt`, ...) are refused unless the user
  passes `--allow-pickle`, and then converted to safetensors with `torch.load(weights_only=True)`;
- code: `*.py` files are never executed and not copied unless `--allow-code`; without it the
  `auto_map` entries that would point transformers at them are removed from the fetched configs;
- architecture: checked in drope_ops.fetch with surgery's own rule (one rule for fetch and drop-rope).
"""

from __future__ import annotations

import fnmatch
import json
import logging
from pathlib import Path

from drope_ops.errors import CheckpointError

log = logging.getLogger("drope.fetch")

CONFIG_FILES = ["config.json", "generation_config.json"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt",
                   "chat_template.jinja", "chat_template.json"]
SAFE_WEIGHTS = ["*.safetensors", "*.safetensors.index.json"]
PICKLE_WEIGHTS = ["*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.pkl"]
CODE_FILES = ["*.py"]

TOKENIZER_VOCAB = ["tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt"]
"""A checkpoint has a tokenizer when it holds one of these (tokenizer_config.json alone has no vocabulary)."""


def tokenizer_problem(names, where: str) -> str | None:
    """Why the files `names` of checkpoint `where` carry no usable tokenizer (None = they do)."""
    if any(n in TOKENIZER_VOCAB for n in names):
        return None
    return (f"{where} has no tokenizer files (none of {', '.join(TOKENIZER_VOCAB)}); copy the tokenizer "
            f"of the model it came from into it (tokenizer.json and tokenizer_config.json) and try again")


def check_tokenizer(names, where: str) -> None:
    """Raise CheckpointError (one line) unless `names` carry a tokenizer: checked at fetch, after the
    architecture, so a missing tokenizer never surfaces minutes later inside a Ray Train worker."""
    if problem := tokenizer_problem(names, where):
        raise CheckpointError(problem)


def allow_patterns(*, allow_pickle: bool = False, allow_code: bool = False) -> list[str]:
    """The huggingface_hub `allow_patterns` that fetch downloads."""
    return (CONFIG_FILES + TOKENIZER_FILES + SAFE_WEIGHTS + (PICKLE_WEIGHTS if allow_pickle else [])
            + (CODE_FILES if allow_code else []))


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def select_files(names: list[str], *, allow_pickle: bool = False, allow_code: bool = False,
                 where: str = "the checkpoint") -> list[str]:
    """The files of a checkpoint that fetch copies; raises when it has no weights we may load.

    Names are paths relative to the checkpoint root. Everything else (README, images, ONNX, ...) is
    left behind. Pickle weights are ignored when safetensors weights are present.
    """
    keep = [n for n in names if _matches(n, allow_patterns(allow_pickle=allow_pickle, allow_code=allow_code))]
    safe = [n for n in keep if _matches(n, ["*.safetensors"])]
    pickles = [n for n in names if _matches(n, PICKLE_WEIGHTS)]
    if safe:
        keep = [n for n in keep if not _matches(n, PICKLE_WEIGHTS)]
    elif pickles and not allow_pickle:
        raise CheckpointError(f"{where} has only pickle weights ({pickles[0]}), which can run code when "
                              f"loaded; pass --allow-pickle (allow_pickle=True) to convert them with "
                              f"torch.load(weights_only=True)")
    elif not pickles:
        raise CheckpointError(f"{where} has no *.safetensors weights (files: {', '.join(sorted(names)[:6])}"
                              f"); point at a Hugging Face checkpoint directory")
    if "config.json" not in keep:
        raise CheckpointError(f"{where} has no config.json; point at a Hugging Face checkpoint directory")
    skipped = sorted(set(names) - set(keep))
    if skipped:
        log.info("not copied from %s: %s", where, ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    return sorted(keep)


def strip_auto_map(config: dict, where: str) -> bool:
    """Remove `auto_map` (pointers to custom code) from a config dict in place; True if changed."""
    if "auto_map" not in config:
        return False
    log.warning("%s: removed auto_map %s (custom code is not fetched; pass --allow-code to keep it, "
                "it is still never executed)", where, sorted(config["auto_map"]))
    del config["auto_map"]
    return True


def safetensors_name(pickle_name: str) -> str:
    """pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors (transformers' names)."""
    stem = pickle_name.rsplit(".", 1)[0]
    parent, _, base = stem.rpartition("/")
    base = base.replace("pytorch_model", "model", 1)
    return (parent + "/" if parent else "") + base + ".safetensors"


def convert_pickles(src_root: Path, names: list[str], out_root: Path) -> dict[str, Path]:
    """Convert pickle weights (and their index) to safetensors in out_root; returns new name -> path.

    Loads with torch.load(weights_only=True): only tensors and plain containers are unpickled.
    """
    import torch
    from safetensors.torch import save_file

    out: dict[str, Path] = {}
    renames = {}
    for name in names:
        if _matches(name, ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl"]):
            try:
                state = torch.load(src_root / name, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(f"{name} is not a plain tensor state dict that loads with "
                                      f"weights_only=True ({type(e).__name__}); it is refused") from None
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            # safetensors refuses shared storage (tied embeddings): give every tensor its own copy.
            tensors = {k: v.detach().clone().contiguous() for k, v in state.items() if torch.is_tensor(v)}
            new = safetensors_name(name)
            (out_root / new).parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(out_root / new), metadata={"format": "pt"})
            out[new], renames[name] = out_root / new, new
    for name in names:
        if name.endswith(".bin.index.json"):
            index = json.loads((src_root / name).read_text())
            index["weight_map"] = {k: renames.get(v, safetensors_name(v)) for k, v in index["weight_map"].items()}
            new = "model.safetensors.index.json"
            (out_root / new).write_text(json.dumps(index, indent=2))
            out[new] = out_root / new
    log.info("converted %d pickle files to safetensors (weights_only=True)", len(renames))
    return out
