"""Model weights in and out of DeepSpeed ZeRO without one process holding the whole model.

In (`load_model`): under ZeRO-3 the model is built inside DeepSpeed's zero.Init (transformers does this
when an HfDeepSpeedConfig is alive during from_config): each module's parameters are partitioned as soon
as the module exists; then each rank reads from the safetensors files only the slice of every parameter
its partition holds (`load_partitions`), so no rank reads, converts or gathers a whole parameter. ZeRO-1/2
load in the training dtype (bf16 on GPU), never fp32 by default.

Out (`write_final_weights`): at the last step the workers gather the 16-bit weights one module at a time
(ZeRO-3; for ZeRO-1/2 rank 0 already holds them), rank 0 streams each tensor into safetensors shards
of at most `max_shard_bytes` in the base checkpoint's dtype (headers first: the layout is known before
any gather) and publishes them to the stage output (local or S3), manifest last. No optimizer state
leaves the workers for the final model; the writer holds one module, never a shard.

`consolidate` is the older route (zero_to_fp32 over a whole DeepSpeed checkpoint, optimizer states
included): kept to turn any kept checkpoint into a model, and as the reference the new route must match.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from drope_ops import storage
from drope_ops.errors import CheckpointError
from drope_ops.manifest import write_manifest
from drope_ops.surgery import read_header, weight_files

SAFE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def train_dtype(use_gpu: bool) -> torch.dtype:
    """bf16 on GPU (DeepSpeed's bf16 mode), fp32 on CPU (exact resume; gloo has no bf16 reduce)."""
    return torch.bfloat16 if use_gpu else torch.float32


def load_model(ckpt_dir: str | os.PathLike, ds_config: dict, dtype: torch.dtype):
    """(model, keepalive): the checkpoint loaded for DeepSpeed. Under ZeRO-3, `keepalive` is the
    HfDeepSpeedConfig that makes from_pretrained build the model inside zero.Init; transformers holds it
    by weak reference only, so the caller keeps it until training ends."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    import drope_ops  # noqa: F401  (registers the drope model type in this process)

    keepalive = None
    if ds_config["zero_optimization"]["stage"] == 3:
        import deepspeed
        from transformers import AutoConfig

        # zero.Init sizes partitions by DeepSpeed's view of the world: hand it the existing process group
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        keepalive = HfDeepSpeedConfig(ds_config)
        model = empty_zero3_model(AutoConfig.from_pretrained(ckpt_dir), ds_config, dtype)
        load_partitions(model, ckpt_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=dtype)
    model.config.use_cache = False
    return model, keepalive


def empty_zero3_model(config, ds_config: dict, dtype: torch.dtype):
    """The model built inside zero.Init with its weights left uninitialized: from_config's ZeRO-3 path
    without its random init, which gathers a layer's projections together (an MLP's three are half of a
    one-layer 7B-wide model) to fill weights that the checkpoint overwrites anyway."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers import initialization
    from transformers.integrations.deepspeed import prevent_arange_dtype_change
    from transformers.modeling_utils import set_zero3_state

    with initialization.no_init_weights(), prevent_arange_dtype_change(), \
            deepspeed.zero.Init(config_dict_or_path=ds_config), set_zero3_state():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # as from_config's own ZeRO-3 path does after its init (tie_word_embeddings)
    return model


def tensor_files(ckpt_dir: str | os.PathLike) -> dict[str, Path]:
    """{tensor name: its safetensors file} of a checkpoint (one file, or shards and their index)."""
    files, index = weight_files(ckpt_dir)
    if index is not None:
        return {name: Path(ckpt_dir) / f for name, f in index["weight_map"].items()}
    return {name: files[0] for name in read_header(files[0])[0] if name != "__metadata__"}


def flat_range(tensor_slice, shape: list[int], start: int, end: int) -> torch.Tensor:
    """Elements [start, end) of a stored tensor flattened, reading only the rows that hold them."""
    if len(shape) <= 1:
        return tensor_slice[start:end].reshape(-1)
    row = math.prod(shape[1:])
    first = start // row
    rows = tensor_slice[first:-(-end // row)].reshape(-1)
    return rows[start - first * row:end - first * row]


def load_partitions(model, ckpt_dir: str | os.PathLike) -> None:
    """Fill a model built under zero.Init from the checkpoint: each rank reads only the part of every
    parameter its ZeRO-3 partition holds (a flat range: the rows that cover it), so no rank ever reads,
    converts or gathers a whole parameter. Parameters DeepSpeed keeps whole (ds_persist) and persistent
    buffers are read whole."""
    from safetensors import safe_open

    files = tensor_files(ckpt_dir)
    names = [n for n, _ in model.named_parameters()]  # a tied parameter once, under its first name
    missing = [n for n in names if n not in files]
    if missing:
        raise CheckpointError(f"{ckpt_dir}: the checkpoint has no tensor {missing[0]} ({len(missing)} missing) "
                              f"that a {type(model).__name__} needs; is it a {model.config.model_type} checkpoint?")
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), "pt")) for f in set(files.values())}
        with torch.no_grad():
            for name, p in model.named_parameters():
                stored = handles[files[name]].get_slice(name)
                part, full = p.ds_tensor, p.ds_numel
                start = torch.distributed.get_rank(group=p.ds_process_group) * part.numel()
                end = min(start + part.numel(), full)
                if start < end:
                    part.narrow(0, 0, end - start).copy_(flat_range(stored, stored.get_shape(), start, end))
                if getattr(p, "ds_persist", False):
                    p.data.copy_(stored[:].reshape(p.ds_shape))
            for name, buf in model.named_buffers():
                if name in files:
                    buf.copy_(handles[files[name]].get_tensor(name))


def checkpoint_dtype(ckpt_dir: str | os.PathLike, fallback: torch.dtype) -> torch.dtype:
    """The dtype the base checkpoint was saved in (config.json `dtype` / `torch_dtype`)."""
    config = json.loads((Path(ckpt_dir) / "config.json").read_text())
    name = str(config.get("dtype") or config.get("torch_dtype") or "").replace("torch.", "")
    return SAFE_DTYPES.get(name, fallback)


# ---------------------------------------------------------------------------------------------------
# Out: the final weights, gathered module by module, written in shards by rank 0.


def _save_order(model, zero_stage: int):
    """Per module, in save_pretrained's order: (its own parameters, [(name, parameter or persistent
    buffer)]); a tied parameter listed once, under its first name."""
    seen: set = set()
    for prefix, module in model.named_modules():
        prefix = f"{prefix}." if prefix else ""
        entries = []
        for name, p in module.named_parameters(recurse=False):
            key = getattr(p, "ds_id", None) if zero_stage == 3 else p.data_ptr()
            if key not in seen:
                seen.add(key)
                entries.append((prefix + name, p))
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                entries.append((prefix + name, buf))
        yield list(module.parameters(recurse=False)), entries


def weight_layout(model, zero_stage: int, dtype: torch.dtype) -> list[tuple[str, tuple, torch.dtype]]:
    """(name, full shape, dtype on disk) of every tensor `full_weights` yields, in its order, without
    gathering anything (a ZeRO-3 parameter carries its full shape as ds_shape)."""
    return [(name, tuple(getattr(t, "ds_shape", t.shape)), dtype if t.is_floating_point() else t.dtype)
            for _, entries in _save_order(model, zero_stage) for name, t in entries]


def full_weights(engine, zero_stage: int, rank: int):
    """Yield (name, tensor) of the trained model on rank 0, nothing on the other ranks, never two
    modules' full parameters at once. Every rank must run it to the end (ZeRO-3 gathers collectively)."""
    import deepspeed

    for params, entries in _save_order(engine.module, zero_stage):
        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3 and params \
            else contextlib.nullcontext()
        with gather:
            if rank == 0:
                for name, t in entries:
                    yield name, t.detach()


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


class ShardWriter:
    """Safetensors shards of at most `max_bytes` (one tensor may exceed it alone) in `out_dir`, named as
    save_pretrained names them: model.safetensors, or model-0000i-of-0000n.safetensors + index.

    The layout (every tensor's name, shape and dtype, in the order they will come) is known before the
    first gather, so each shard's header is written first and every tensor streams to disk as it
    arrives: the writer never holds more than the tensor in hand, whatever the shard size."""

    def __init__(self, out_dir: Path, layout: list[tuple[str, tuple, torch.dtype]], max_bytes: int):
        self.out_dir, self.layout, self.pos = out_dir, layout, 0
        self.shards = self._split(layout, max_bytes)  # [[layout index, ...] per shard]
        self.names = [[layout[i][0] for i in shard] for shard in self.shards]
        self.file, self.shard = None, -1

    @staticmethod
    def _split(layout, max_bytes: int) -> list[list[int]]:
        shards, size = [[]], 0
        for i, (_, shape, dtype) in enumerate(layout):
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append(i)
            size += nbytes
        return shards

    def _open_next(self) -> None:
        self.shard += 1
        entries, offset = {}, 0
        for i in self.shards[self.shard]:
            name, shape, dtype = self.layout[i]
            end = offset + math.prod(shape) * dtype.itemsize
            entries[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.file = open(self.out_dir / self._tmp(self.shard), "wb")
        self.file.write(len(header).to_bytes(8, "little") + header)

    def _tmp(self, shard: int) -> str:
        return f"shard-{shard:05d}.safetensors"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        want, shape, dtype = self.layout[self.pos]
        if (name, tuple(tensor.shape)) != (want, shape):
            raise RuntimeError(f"final weights: got {name} {tuple(tensor.shape)}, the layout expects {want} {shape}")
        if self.file is None:
            self._open_next()
        t = tensor.to(dtype=dtype, device="cpu").contiguous()
        self.file.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self.pos += 1
        if self.pos == self.shards[self.shard][-1] + 1:
            self.file.close()
            self.file = None

    def finish(self) -> None:
        if self.pos != len(self.layout):
            raise RuntimeError(f"final weights: {len(self.layout) - self.pos} tensors never arrived")
        n = len(self.shards)
        if n == 1:
            os.replace(self.out_dir / self._tmp(0), self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.names):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / self._tmp(i), self.out_dir / final)
            weight_map.update({name: final for name in names})
        total = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in self.layout)  # as save_pretrained
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_final_weights(engine, *, zero_stage: int, rank: int, source_dir: str | os.PathLike, tokenizer,
                        output_uri: str, max_shard_bytes: int) -> None:
    """Gather the trained weights (all ranks) and publish them as a checkpoint at `output_uri` (rank 0):
    safetensors shards in the base checkpoint's dtype, config, tokenizer, manifest last."""
    dtype = checkpoint_dtype(source_dir, fallback=next(engine.module.parameters()).dtype)
    work = Path(tempfile.mkdtemp(prefix="recal-final-")) if rank == 0 else None
    try:
        layout = weight_layout(engine.module, zero_stage, dtype)
        writer = ShardWriter(work, layout, max_shard_bytes) if rank == 0 else None
        for name, tensor in full_weights(engine, zero_stage, rank):
            writer.add(name, tensor)
        if rank == 0:
            writer.finish()
            _write_config(source_dir, work, dtype)
            tokenizer.save_pretrained(work)
            write_manifest(work)
            storage.put_checkpoint(work, output_uri)  # objects first, manifest last
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    torch.distributed.barrier()  # nobody reports the run finished before the output is complete


def _write_config(source_dir, out_dir: Path, dtype: torch.dtype) -> None:
    """The base checkpoint's config (and generation config), with the dtype the weights are written in."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source_dir)
    config.dtype = dtype
    config.save_pretrained(out_dir)
    if (Path(source_dir) / "generation_config.json").is_file():
        shutil.copyfile(Path(source_dir) / "generation_config.json", out_dir / "generation_config.json")


def write_final(t, cfg, output: str) -> None:
    """The last step is done: every rank takes part in gathering the 16-bit weights, rank 0 writes them
    to `output` (safetensors shards, base checkpoint dtype, manifest last). `t` is the worker's Trainee."""
    write_final_weights(t.engine, zero_stage=cfg.zero_stage, rank=t.rank, source_dir=t.ckpt_dir,
                        tokenizer=t.tokenizer, output_uri=output, max_shard_bytes=int(cfg.output_shard_mb * 1e6))


# ---------------------------------------------------------------------------------------------------
# The older route: zero_to_fp32 over a whole DeepSpeed checkpoint (optimizer states included).


def consolidate(checkpoint_path: str, source_checkpoint: str, output_dir: str, tag: str = "ds") -> None:
    """ZeRO checkpoint directory -> fp32 safetensors checkpoint + tokenizer + manifest at output_dir."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import drope_ops  # noqa: F401

    state_dict = get_fp32_state_dict_from_zero_checkpoint(checkpoint_path, tag=tag)
    config = AutoConfig.from_pretrained(source_checkpoint)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"the ZeRO checkpoint at {checkpoint_path} does not match {source_checkpoint}: "
                              f"missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    out = Path(output_dir)
    tmp = out.with_name(out.name + ".tmp-consolidate")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(source_checkpoint).save_pretrained(tmp)
    write_manifest(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
