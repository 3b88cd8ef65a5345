"""The fetch stage's library: bring a base checkpoint from anywhere to the run's storage, safely.

    fetch("hf://HuggingFaceTB/SmolLM2-135M@main", "s3://bucket/runs/r1/base")
    fetch("s3://bucket/models/llama", "/data/ckpt/llama")     # resumes after a kill
    fetch("/models/SmolLM2-135M-Instruct.Q4_1.gguf", "/data/ckpt/smollm2")

Sources: `hf://ORG/NAME[@REVISION]` (huggingface_hub snapshot download: HF_ENDPOINT, HF_TOKEN,
HF_HUB_OFFLINE and the HF cache are honoured), `s3://BUCKET/PREFIX` (a drope checkpoint, or a plain Hugging Face one
verified against its index and safetensors headers), a
local checkpoint directory, or a `.gguf` file. Destinations: a local directory or `s3://...`.
The destination gets only config, tokenizer and safetensors files (see checkpoint_policy), a sha256
manifest with the source URI, and is complete or absent (drope_ops.transfer).

A checkpoint of the official DroPE release (model_type llama_drope / qwen2_drope, SakanaAI/DroPE) is
read as data and lands as a drope checkpoint (drope_ops.sakana.import_release): its code never runs.
`expect` says which kind the caller wants: "rope" (a model DroPE starts from), "drope" (already DroPE:
a release, or drope's own output) or None (either, as `drope fetch` takes it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from drope_ops import checkpoint_policy as policy
from drope_ops import manifest as mf
from drope_ops import storage, transfer
from drope_ops.errors import CheckpointError, StorageError
from drope_ops.sakana import import_release, is_release, release_problem

log = logging.getLogger("drope.fetch")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class FetchResult:
    dest: str
    """Where the checkpoint now is (local directory or s3:// prefix), with its manifest."""
    files_transferred: int
    """Files this call wrote; 0 when the destination was already complete."""
    bytes_transferred: int
    """Bytes this call moved: downloaded from a remote source plus written to the destination."""
    manifest_digest: str
    """sha256 naming the fetched checkpoint (drope_ops.manifest.manifest_digest)."""


def parse_source(source: str) -> tuple[str, str, str | None]:
    """(kind, location, revision): kind is hf | s3 | gguf | local. Raises on an unknown scheme."""
    scheme = _SCHEME.match(source)
    if scheme and scheme.group(1) not in ("hf", "s3"):
        raise CheckpointError(f"unknown source scheme {scheme.group(1)!r}:// in {source!r}; use "
                              f"hf://ORG/NAME[@REVISION], s3://BUCKET/PREFIX, a local directory or a .gguf file")
    if source.startswith("hf://"):
        repo, _, rev = source[len("hf://"):].partition("@")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise CheckpointError(f"{source!r} is not hf://ORG/NAME[@REVISION]")
        return "hf", repo, rev or None
    if source.startswith("s3://"):
        storage.split_s3(source)
        return "s3", source.rstrip("/"), None
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"source {source} does not exist; give hf://ORG/NAME, s3://BUCKET/PREFIX, "
                              f"a checkpoint directory or a .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"source {source} is a file but not a .gguf; give a checkpoint directory")
        return "gguf", str(path), None
    return "local", str(path), None


def check_rope_llama_config(config: dict, where: str) -> None:
    """Raise CheckpointError unless `config` is a RoPE Llama-family model that DroPE can start from.

    The rule is surgery's (drope_ops.surgery.rope_llama_problem), so fetch refuses exactly what
    drop-rope would refuse later, before any weights move.
    """
    from drope_ops.surgery import rope_llama_problem

    problem = rope_llama_problem(config)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    factor = rope.get("factor") if isinstance(rope, dict) else None
    if problem is None and isinstance(factor, (int, float)) and factor >= 1e20:
        problem = f"rope_parameters factor {factor:g} rotates by nothing (a NoPE layout); fetch the RoPE original"
    if problem:
        raise CheckpointError(f"{where}: {problem}")


def check_source_config(config: dict, where: str, expect: str | None = None) -> None:
    """Raise CheckpointError unless `config` is the kind of checkpoint asked for (see the module docstring)."""
    problem = release_problem(config) if is_release(config) else None
    if problem:
        raise CheckpointError(f"{where}: {problem}")
    drope = is_release(config) or config.get("model_type") == "drope"
    if drope and expect == "rope":
        raise CheckpointError(f"{where}: already a DroPE checkpoint (model_type {config['model_type']!r}); to "
                              f"evaluate it as it is, set model.already_drope: true and model.base_source to its "
                              f"RoPE base model (preset sakana-debug-eval), or fetch the RoPE original")
    if not drope and expect == "drope":
        raise CheckpointError(f"{where}: model.already_drope is set but model_type {config.get('model_type')!r} is "
                              f"not a DroPE checkpoint; unset model.already_drope, or point model.source at one")
    if not drope:
        check_rope_llama_config(config, where)


def _check_dest(dest: str) -> None:
    scheme = _SCHEME.match(dest)
    if scheme and scheme.group(1) != "s3":
        raise StorageError(f"unknown destination scheme {scheme.group(1)!r}:// in {dest!r}; use a local "
                           f"directory or s3://BUCKET/PREFIX")


def _complete_from(dest: str, source: str) -> str | None:
    """Digest of a destination that already holds a complete fetch of `source`, else None."""
    have = storage.read_checkpoint_manifest(dest)
    if have is None or have.get("source") != source:
        return None
    ok = storage.checkpoint_complete(dest) if storage.is_s3(dest) else not mf.verify_manifest(dest, have)
    return mf.manifest_digest(have) if ok else None


def fetch(source: str, dest: str, *, allow_pickle: bool = False, allow_code: bool = False,
          expect: str | None = "rope", progress: bool = True) -> FetchResult:
    """Fetch a checkpoint from `source` into `dest` (local directory or s3://); `expect`: "rope", "drope"
    or None (see the module docstring).

    Raises:
        CheckpointError: unknown scheme, no manifest, pickle-only weights without allow_pickle, not a
            RoPE Llama-family config, checksum mismatch after one retry.
        StorageError: bucket / repo / revision missing, no access, offline with nothing cached, disk full.
    """
    kind, where, rev = parse_source(source)
    dest = str(dest)
    _check_dest(dest)
    if kind != "hf" and (digest := _complete_from(dest, source)):
        log.info("%s already holds %s: nothing to transfer", dest, source)
        return FetchResult(dest, 0, 0, digest)
    opts = dict(allow_pickle=allow_pickle, allow_code=allow_code)
    if kind == "s3":
        return _fetch_s3(source, dest, progress, opts, expect)
    with tempfile.TemporaryDirectory(prefix="drope-fetch-") as work:
        work = Path(work)
        hub_hashes: dict[str, str] = {}
        if kind == "hf":
            root = _hf_snapshot(source, where, rev, opts)
            hub_hashes = _hub_sha256(root)
        elif kind == "gguf":
            root = _import_gguf(Path(where), work / "gguf")
        else:
            root = Path(where)
        files, manifest = _prepare(root, source, work, hub_hashes, opts, expect)
        stats = transfer.publish(files, manifest, dest, progress=progress)
    return FetchResult(dest, stats.files, stats.bytes, mf.manifest_digest(manifest))


def _fetch_s3(source: str, dest: str, progress: bool, opts: dict, expect: str | None) -> FetchResult:
    src_manifest = storage.read_checkpoint_manifest(source)
    if src_manifest is None:
        return _fetch_s3_plain(source, dest, progress, opts, expect)
    names = policy.select_files(list(src_manifest["files"]), where=source, **opts)
    configs = {n: json.loads(storage.read_bytes(storage.join(source, n)))
               for n in ("config.json", "tokenizer_config.json") if n in names}
    check_source_config(configs["config.json"], source, expect)  # before moving any weights
    policy.check_tokenizer(names, source)
    transform = any(policy._matches(n, policy.PICKLE_WEIGHTS) for n in names) or (
        not opts["allow_code"] and any("auto_map" in c for c in configs.values())) or (
        is_release(configs["config.json"]))
    wanted = {"format": src_manifest.get("format", "drope-manifest/1"), "source": source,
              "files": {n: src_manifest["files"][n] for n in names}}
    if not storage.is_s3(dest) and not transform:  # straight into dest's staging dir, resumable
        stats = transfer.download_checkpoint(source, wanted, Path(dest), progress=progress)
        return FetchResult(dest, stats.files, stats.bytes, mf.manifest_digest(wanted))
    # via a local cache keyed by the source, so an interrupted call resumes there too
    cache = _cache_dir(source)
    old = mf.read_manifest(cache) if cache.is_dir() else None
    if old is not None and mf.manifest_digest(old) != mf.manifest_digest(wanted):
        storage.remove_tree(cache)  # our cache of an older version of this source
    got = transfer.download_checkpoint(source, wanted, cache, progress=progress)
    with tempfile.TemporaryDirectory(prefix="drope-fetch-") as work:
        files, manifest = _prepare(cache, source, Path(work), {}, opts, expect)
        put = transfer.publish(files, manifest, dest, progress=progress)
    storage.remove_tree(cache)
    return FetchResult(dest, put.files, got.bytes + put.bytes, mf.manifest_digest(manifest))


def _fetch_s3_plain(source: str, dest: str, progress: bool, opts: dict, expect: str | None) -> FetchResult:
    """A plain Hugging Face checkpoint another tool wrote to S3 (config, index, safetensors shards; no
    drope manifest): download the selected files to a local cache (resumable: complete files are kept),
    verify the shards against the index and their headers (_prepare), then publish with a manifest."""
    sizes = storage.s3_sizes(source)
    if not sizes:
        raise CheckpointError(f"{source} holds no files; check the prefix (`aws s3 ls {source}/`)")
    names = policy.select_files(list(sizes), where=source, **opts)
    check_source_config(json.loads(storage.read_bytes(storage.join(source, "config.json"))), source, expect)
    policy.check_tokenizer(names, source)
    cache = _cache_dir(source)
    client = storage.s3_client()
    bucket, _ = storage.split_s3(source)
    got = 0
    for name in names:
        path = cache / name
        if path.is_file() and path.stat().st_size == sizes[name]:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        try:
            storage.s3_call(source, client.download_file, bucket, storage.split_s3(storage.join(source, name))[1],
                            str(part))
        except OSError as e:
            raise storage.disk_error(e, cache) from None
        os.replace(part, path)
        got += sizes[name]
    with tempfile.TemporaryDirectory(prefix="drope-fetch-") as work:
        files, manifest = _prepare(cache, source, Path(work), {}, opts, expect)
        put = transfer.publish(files, manifest, dest, progress=progress)
    storage.remove_tree(cache)
    return FetchResult(dest, put.files, got + put.bytes, mf.manifest_digest(manifest))


def _cache_dir(source: str) -> Path:
    """Local cache of an S3 source, keyed by its URI, so an interrupted fetch resumes there."""
    return Path(os.environ.get("DROPE_CACHE", Path.home() / ".cache" / "drope")) / "fetch" / \
        hashlib.sha256(source.encode()).hexdigest()[:16]


def check_shards(root: Path, names: list[str], where: str) -> None:
    """A checkpoint without a manifest, checked against its own index and safetensors headers: every
    shard the index names is there, each header lists exactly the tensors the index puts in it, and
    each file is as long as its header says (not truncated)."""
    from drope_ops.surgery import INDEX_NAME, data_length, read_header

    shards = [n for n in names if n.endswith(".safetensors")]
    tensors = {}
    for n in shards:
        header, start = read_header(root / n)
        end = data_length(header)
        if (root / n).stat().st_size != start + end:
            raise CheckpointError(f"{where}/{n}: {(root / n).stat().st_size} bytes but its header says "
                                  f"{start + end}: truncated or corrupt; copy it again")
        tensors[n] = {k for k in header if k != "__metadata__"}
    if INDEX_NAME not in names:
        return
    weight_map = json.loads((root / INDEX_NAME).read_text()).get("weight_map") or {}
    missing = sorted(set(weight_map.values()) - set(shards))
    if missing:
        raise CheckpointError(f"{where}: {INDEX_NAME} names {missing[0]} ({len(missing)} shard(s) missing); "
                              f"copy every shard the index lists")
    for n in shards:
        listed = {k for k, v in weight_map.items() if v == n}
        if listed != tensors[n]:
            odd = sorted(listed ^ tensors[n])[0]
            raise CheckpointError(f"{where}/{n}: tensor {odd} is in {'the index' if odd in listed else 'the shard'} "
                                  f"but not in {'the shard' if odd in listed else 'the index'}; the index and "
                                  f"shards come from different saves: copy a matching set")


def _prepare(root: Path, source: str, work: Path, expected: dict[str, str],
             opts: dict, expect: str | None = "rope") -> tuple[dict[str, Path], dict]:
    """Apply the safety policy to a local checkpoint dir: (name -> file to publish, its manifest)."""
    if (root / "config.json").is_file():  # the kind asked for, before an import writes anything
        check_source_config(json.loads((root / "config.json").read_text()), source, expect)
    root, expected = _import_if_release(root, source, work, expected)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and ".cache" not in p.relative_to(root).parts)
    own = mf.read_manifest(root)
    if own is not None:  # a drope checkpoint: verify it against its own manifest first
        expected = {**{k: v["sha256"] for k, v in own["files"].items()}, **expected}
    names = policy.select_files(names, where=source, **opts)
    files = {n: root / n for n in names}
    config = json.loads(files["config.json"].read_text())
    check_source_config(config, source, expect)
    policy.check_tokenizer(names, source)
    if own is None and not expected:  # nothing recorded its hashes: check it against itself
        check_shards(root, names, source)
    if not opts["allow_code"]:
        for name in ("config.json", "tokenizer_config.json"):
            if name in files:
                data = json.loads(files[name].read_text())
                if policy.strip_auto_map(data, f"{source}/{name}"):
                    (work / name).write_text(json.dumps(data, indent=2))
                    files[name] = work / name
                    expected.pop(name, None)
    pickles = [n for n in names if policy._matches(n, policy.PICKLE_WEIGHTS)]
    if pickles:
        for n in pickles:
            del files[n]
        files.update(policy.convert_pickles(root, pickles, work / "converted"))
    table = {}
    for name, path in sorted(files.items()):
        digest = mf.sha256_file(path)
        if name in expected and expected[name] != digest:
            raise CheckpointError(f"{source}/{name} does not match its recorded sha256 (corrupt or "
                                  f"half-written); delete it and fetch again")
        table[name] = {"sha256": digest, "size": path.stat().st_size}
    return files, {"format": "drope-manifest/1", "source": source, "files": table}


def _import_if_release(root: Path, source: str, work: Path, expected: dict[str, str]) -> tuple[Path, dict]:
    """An official DroPE release at root, its shards checked against their recorded sha256 first, imported
    into work as a drope checkpoint (whose own manifest then holds the hashes); anything else as it is."""
    if not (root / "config.json").is_file() or not is_release(json.loads((root / "config.json").read_text())):
        return root, expected
    bad = [n for n, h in sorted(expected.items()) if n.endswith(".safetensors") and mf.sha256_file(root / n) != h]
    if bad:
        raise CheckpointError(f"{source}/{bad[0]} does not match its recorded sha256 (corrupt or half-written); "
                              f"delete it and fetch again")
    return import_release(root, work / "release", source_name=source, progress=False), {}


def _hf_snapshot(source: str, repo_id: str, revision: str | None, opts: dict) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hf

    try:
        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=policy.allow_patterns(**opts)))
    except hf.GatedRepoError:
        raise StorageError(f"{source} is gated: accept its terms on the hub and set HF_TOKEN") from None
    except hf.RevisionNotFoundError:
        raise StorageError(f"revision {revision!r} not found in hub repo {repo_id}; check the @REVISION") from None
    except hf.RepositoryNotFoundError:
        raise StorageError(f"hub repo {repo_id} not found (or private without HF_TOKEN); check the name") from None
    except (hf.LocalEntryNotFoundError, hf.IncompleteSnapshotError):
        raise StorageError(f"{source} is not (completely) in the local Hugging Face cache "
                           f"({constants.HF_HUB_CACHE}) and the hub cannot be reached; unset HF_HUB_OFFLINE "
                           f"and connect, or point HF_HUB_CACHE at a cache that has it") from None
    except hf.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        raise StorageError(f"hub error for {source} (HTTP {status}); check HF_ENDPOINT and HF_TOKEN") from None
    except OSError as e:
        raise storage.disk_error(e, constants.HF_HUB_CACHE) from None


def _hub_sha256(snapshot: Path) -> dict[str, str]:
    """The hub's sha256 of each LFS file: its blob in the HF cache is named by it."""
    out = {}
    for p in snapshot.rglob("*"):
        blob = os.path.basename(os.path.realpath(p))
        if p.is_file() and _SHA256.match(blob):
            out[p.relative_to(snapshot).as_posix()] = blob
    return out


def _import_gguf(gguf_file: Path, out: Path) -> Path:
    try:
        from drope_ops.gguf import import_gguf
    except ImportError:
        raise CheckpointError("GGUF import is not available in this installation (drope_ops.gguf)") from None
    import_gguf(gguf_file, out)
    return out
