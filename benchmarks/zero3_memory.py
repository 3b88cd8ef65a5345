"""Llama-2-7B-wide ZeRO-3 memory: today's route against the new one, side by side in one run.

    .venv/bin/python benchmarks/zero3_memory.py --layers 4            # the issue's size (needs ~20 GB)
    .venv/bin/python benchmarks/zero3_memory.py --layers 1 --shard-mb 500
    .venv/bin/python benchmarks/zero3_memory.py --layers 4 --load-only    # the load phase alone (~10 GB)

A random Llama model 7B-wide (hidden 4096, ffn 11008, 32 heads, vocab 32000; --layers deep) is saved in
bf16 (as Llama-2 ships), made a DroPE checkpoint, then recalibrated --steps steps at --seq tokens with
ZeRO-3 by two gloo processes that run recalibrate's own worker code (build, train_step, finish):

- today: every rank loads the whole model in fp32 (from_pretrained), DeepSpeed partitions it; at the
  end every rank saves its DeepSpeed checkpoint and the driver consolidates it (zero_to_fp32, the whole
  checkpoint with optimizer states) into the output;
- new: the model is built under zero.Init, the workers gather the 16-bit weights module by module and
  rank 0 writes the safetensors shards itself.

Memory is sampled from outside (psutil on the worker and driver pids, every 10 ms): peak RSS per worker
while loading and while stepping, and peak RSS of the process doing the final write. Prints the goals of
issue 14 as ratios.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ["idle", "load", "engine", "step", "write", "done"]
GB = 1e9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoint(root: Path, args) -> Path:
    """A random 7B-wide Llama in bf16, then drop_rope: the DroPE checkpoint recalibrate starts from."""
    import torch
    from transformers import LlamaForCausalLM

    from drope_ops.debugmodel import byte_level_tokenizer, debug_config
    from drope_ops.surgery import drop_rope

    config = debug_config(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                          num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                          max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(root / "base", max_shard_size="1GB")
    byte_level_tokenizer().save_pretrained(root / "base")
    del model
    return drop_rope(root / "base", root / "drope", qk_norm="qk", progress=False)


def _config(args):
    from workflows.recalibrate.config import RecalibrateConfig

    return RecalibrateConfig(steps=args.steps, global_batch=2, micro_batch=1, num_workers=2, zero_stage=3,
                             warmup_steps=0, output_shard_mb=args.shard_mb, loss_spike_factor=None)


def build_today(cfg, data, ckpt, seq_len, rank, world):
    """recalibrate's build() as of bc0d1c9: the whole model in fp32 on every worker, then DeepSpeed."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import drope_ops  # noqa: F401
    from drope_ops.data import make_sampler
    from drope_ops.hardware import use_cpus
    from drope_ops.training import adamw
    from workflows.recalibrate.engine import deepspeed_config
    from workflows.recalibrate.loop import Trainee

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    use_cpus(cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    model.config.use_cache = False
    sampler = make_sampler(data, tokenizer, seq_len, global_batch=cfg.global_batch, rank=rank, world=world)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=adamw(model, cfg),
                                                   config=deepspeed_config(cfg, world))
    return Trainee(engine, optimizer, sampler, rank, world, ckpt_dir=str(ckpt), tokenizer=tokenizer)


def load_alone(route, cfg, ckpt):
    """Each route's model load and nothing after it (no engine, no optimizer states): the load phase at a
    size whose optimizer states do not fit the box. Returns what must stay alive until the barrier."""
    import torch
    from transformers import AutoModelForCausalLM

    import drope_ops  # noqa: F401
    from workflows.recalibrate.engine import deepspeed_config
    from workflows.recalibrate.weights import load_model

    if route == "new":
        return load_model(ckpt, deepspeed_config(cfg, 2), torch.float32)
    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)


def worker(route, rank, port, ckpt, out, args, phase, result_file):
    """One rank: load the model (phase load), build the DeepSpeed engine and its optimizer partitions
    (engine), step, write; the parent samples this pid's memory per phase."""
    import deepspeed
    import torch

    initialize = deepspeed.initialize

    def initialize_in_its_phase(*a, **kw):  # build() calls it once the model is loaded
        phase.value = PHASES.index("engine")
        return initialize(*a, **kw)

    deepspeed.initialize = initialize_in_its_phase

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from drope_ops.data import DataConfig
    from workflows.recalibrate.checkpoint import DS_TAG
    from workflows.recalibrate.loop import build, train_step
    from workflows.recalibrate.weights import write_final

    cfg, data = _config(args), DataConfig(source="shakespeare", seq_len=args.seq, max_tokens=200_000)
    torch.distributed.barrier()
    phase.value = PHASES.index("load")
    if args.load_only:
        loaded = load_alone(route, cfg, str(ckpt))  # noqa: F841  (held until every rank has loaded)
        torch.distributed.barrier()
        phase.value = PHASES.index("done")
        Path(result_file).write_text(json.dumps({"step_s": []}))
        torch.distributed.destroy_process_group()
        return
    t = (build if route == "new" else build_today)(cfg, data, str(ckpt), args.seq, rank, 2)
    torch.distributed.barrier()
    phase.value = PHASES.index("step")
    times = []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        train_step(t, cfg, step, cfg.global_batch * args.seq)
        times.append(time.perf_counter() - t0)
    torch.distributed.barrier()
    phase.value = PHASES.index("write")
    if route == "new":
        write_final(t, cfg, str(out))
    else:  # every rank writes its DeepSpeed checkpoint (optimizer states included)
        t.engine.save_checkpoint(str(out), tag=DS_TAG)
    torch.distributed.barrier()
    phase.value = PHASES.index("done")
    Path(result_file).write_text(json.dumps({"step_s": times}))
    torch.distributed.destroy_process_group()


def consolidate_today(ds_dir, ckpt, out, phase):
    """The driver's end of today's route: zero_to_fp32 over the whole downloaded checkpoint."""
    from workflows.recalibrate.weights import consolidate

    phase.value = PHASES.index("write")
    consolidate(str(ds_dir), str(ckpt), str(out))
    phase.value = PHASES.index("done")


def _memory(pid: int) -> tuple[int, int]:
    try:
        rss = psutil.Process(pid).memory_info().rss
        anon = next(int(line.split()[1]) * 1024 for line in open(f"/proc/{pid}/status") if line.startswith("RssAnon:"))
        return rss, anon
    except (psutil.NoSuchProcess, FileNotFoundError, StopIteration):
        return 0, 0


def watch(procs: list[tuple[mp.Process, object]], timeout_s: float) -> list[dict]:
    """Per process and phase: [peak RSS, peak anonymous RSS, RSS and anonymous RSS when the phase began],
    sampled every 10 ms until all exit."""
    peaks = [{p: [0, 0, None, None] for p in PHASES} for _ in procs]
    deadline = time.monotonic() + timeout_s
    while any(p.is_alive() for p, _ in procs):
        if time.monotonic() > deadline:
            for p, _ in procs:
                p.kill()
            raise TimeoutError(f"the ranks did not finish within {timeout_s:.0f} s")
        for i, (p, phase) in enumerate(procs):
            rss, anon = _memory(p.pid)
            peak = peaks[i][PHASES[phase.value]]
            if rss and peak[2] is None:
                peak[2], peak[3] = rss, anon
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon)
        time.sleep(0.01)
    bad = [p.exitcode for p, _ in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"a process failed (exit codes {bad}); see its output above")
    return peaks


def run_route(route, ckpt, root, args):
    ctx = mp.get_context("spawn")
    out = root / f"out-{route}"
    shutil.rmtree(out, ignore_errors=True)
    port, phases = _free_port(), [ctx.Value("i", 0) for _ in range(2)]
    procs = [ctx.Process(target=worker, args=(route, r, port, ckpt, out, args, phases[r], root / f"{route}-{r}.json"))
             for r in range(2)]
    for p in procs:
        p.start()
    peaks = watch(list(zip(procs, phases)), args.timeout)
    res = {"workers": peaks, "step_s": json.loads((root / f"{route}-0.json").read_text())["step_s"]}
    if args.load_only:
        return res
    if route == "today":
        res["downloaded"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        final, phase = root / "final-today", ctx.Value("i", 0)
        driver = ctx.Process(target=consolidate_today, args=(out, ckpt, final, phase))
        driver.start()
        res["writer"] = watch([(driver, phase)], args.timeout)[0]["write"]
        res["output"] = final
    else:
        res["downloaded"] = 0  # the driver reads the run's train_state.json and the probe; no DeepSpeed shard
        w = peaks[0]["write"]  # rank 0's growth while it gathers and writes (it held its partition before)
        res["writer"] = [w[0] - w[2], w[1] - w[3]]
        res["output"] = out
    shards = list(res["output"].glob("*.safetensors"))
    res["largest_shard"] = max(f.stat().st_size for f in shards)
    res["output_bytes"] = sum(f.stat().st_size for f in shards)
    return res


def compare(today: Path, new: Path) -> float:
    """max |new - today| after casting today's fp32 consolidation to the new output's dtype."""
    from safetensors.torch import load_file

    a, b = {}, {}
    for f in today.glob("*.safetensors"):
        a.update(load_file(f))
    for f in new.glob("*.safetensors"):
        b.update(load_file(f))
    assert a.keys() == b.keys(), f"different tensors: {sorted(a.keys() ^ b.keys())[:3]}"
    return max(float((a[k].to(b[k].dtype).float() - b[k].float()).abs().max()) for k in a)


def _gb(b: float) -> str:
    return f"{b / GB:6.2f} GB"


def _load_growth(res, r: int) -> int:
    """Rank r's anonymous RSS growth while loading the model."""
    return res["workers"][r]["load"][1] - res["workers"][r]["load"][3]


def report_load(today, new, full_fp32, args) -> None:
    g = _gb
    print(f"\nmodel: {args.layers} layers x hidden {args.hidden} / ffn {args.ffn} / vocab {args.vocab}; "
          f"fp32 bytes {g(full_fp32)}; ZeRO-3 on 2 gloo ranks" + (", the load alone" if args.load_only else
                                                                  f", {args.steps} steps at seq {args.seq}"))
    print(f"{'':34}{'today':>22}{'new':>22}")
    for r in range(2):
        t, n = today["workers"][r]["load"], new["workers"][r]["load"]
        print(f"  rank {r} RSS before loading (anon)  {g(t[2])} ({g(t[3])})  {g(n[2])} ({g(n[3])})")
        print(f"  rank {r} peak RSS while load   (anon){g(t[0])} ({g(t[1])})  {g(n[0])} ({g(n[1])})")
    print("\ngoals (issue 14):")
    print(f"  load: worker's anon growth while loading / fp32 model = "
          f"{max(_load_growth(new, r) for r in range(2)) / full_fp32:.2f} (goal <= 0.65; "
          f"today {max(_load_growth(today, r) for r in range(2)) / full_fp32:.2f})")


def report(today, new, full_fp32, args) -> None:
    g = _gb
    report_load(today, new, full_fp32, args)
    print(f"\n{'':34}{'today':>22}{'new':>22}")
    for phase in ("engine", "step"):
        for r in range(2):
            t, n = today["workers"][r][phase], new["workers"][r][phase]
            print(f"  rank {r} peak RSS while {phase:<6} (anon){g(t[0])} ({g(t[1])})  {g(n[0])} ({g(n[1])})")
    print(f"  final write peak RSS (anon)       {g(today['writer'][0])} ({g(today['writer'][1])})  "
          f"{g(new['writer'][0])} ({g(new['writer'][1])})  [today: driver process; new: rank 0's growth]")
    print(f"  largest output shard              {g(today['largest_shard'])}            {g(new['largest_shard'])}")
    print(f"  bytes the driver downloads        {g(today['downloaded'])}            {g(new['downloaded'])}")
    st, sn = sum(today["step_s"]) / len(today["step_s"]), sum(new["step_s"]) / len(new["step_s"])
    print(f"  step time                         {st:9.2f} s            {sn:9.2f} s")
    print("\ngoals (issue 14), continued:")
    print(f"  final write: writer's peak growth / largest shard = {new['writer'][1] / new['largest_shard']:.2f} "
          f"(goal <= 1.2; today's driver: {today['writer'][1] / today['largest_shard']:.2f})")
    print(f"  driver download: {new['downloaded']} optimizer bytes (goal 0; today {today['downloaded'] / GB:.2f} GB)")
    print(f"  step time new / today = {sn / st:.2f} (goal <= 1.0)")
    print(f"  new output vs today's consolidation cast to its dtype: max |diff| = "
          f"{compare(today['output'], new['output']):.3g} (two separate trainings; the exact check is the test's)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--shard-mb", type=float, default=1000.0)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--workdir", default="/tmp/zero3-memory")
    p.add_argument("--load-only", action="store_true", help="measure the model load alone (no engine, steps, write)")
    args = p.parse_args()
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    from drope_ops import assets

    assets.shakespeare_texts()  # fetched once here, not raced for by the ranks
    ctx = mp.get_context("spawn")
    maker = ctx.Process(target=make_checkpoint, args=(root, args))
    maker.start()
    maker.join()
    ckpt = root / "drope"
    from safetensors import safe_open

    full_fp32 = 0
    for f in ckpt.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                full_fp32 += 4 * int(__import__("math").prod(shape))
    today = run_route("today", ckpt, root, args)
    shutil.rmtree(root / "out-today", ignore_errors=True)  # the DeepSpeed checkpoint: disk back
    new = run_route("new", ckpt, root, args)
    (report_load if args.load_only else report)(today, new, full_fp32, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
