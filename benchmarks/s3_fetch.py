"""S3 fetch benchmark against a local moto server: concurrency and resume, measured side by side.

    .venv/bin/python benchmarks/s3_fetch.py [--gib 1.0] [--shards 8] [--repeats 2]

1. speed: `drope fetch s3://... DIR` vs a plain sequential loop of boto3 `download_file` (boto3's
   default TransferConfig) over the same objects, in the same run; prints ours / theirs (goal <= 0.7).
   Also the loop with our part size: moto copies a whole object for every ranged GET, so against moto
   fewer, larger ranges win on their own; that ratio isolates the gain from concurrency across files.
2. resume: `drope fetch` in a subprocess, SIGKILLed once ~50% of the bytes landed on disk, then run
   again; prints bytes transferred on resume / bytes remaining at the kill (goal <= 1.1).

The checkpoint is a Llama config.json plus SHARDS files of random bytes named like safetensors shards
(fetch moves and hashes bytes; it never parses weights). Everything is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fixtures.services import s3_env_vars, start_moto_server  # noqa: E402


def make_checkpoint(path: Path, gib: float, shards: int) -> int:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "rope_theta": 10000.0}))
    per = int(gib * (1 << 30)) // shards
    for i in range(shards):
        with open(path / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as f:
            for _ in range(per // (16 << 20)):
                f.write(os.urandom(16 << 20))
            f.write(os.urandom(per % (16 << 20)))
    return sum(p.stat().st_size for p in path.iterdir())


def baseline(bucket: str, prefix: str, out: Path, part_size: int | None = None) -> float:
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client("s3")
    cfg = TransferConfig(multipart_chunksize=part_size) if part_size else None  # None: boto3 defaults
    out.mkdir()
    t = time.perf_counter()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")["Contents"]]
    for key in keys:  # the plain loop: one object after another
        client.download_file(bucket, key, str(out / key.rsplit("/", 1)[1]), Config=cfg)
    return time.perf_counter() - t


def ours(uri: str, out: Path) -> float:
    from drope_ops.fetch import fetch

    t = time.perf_counter()
    fetch(uri, str(out), progress=False)
    return time.perf_counter() - t


def landed_bytes(dest: Path) -> int:
    """Bytes on disk in dest's staging dir: finished files plus the written blocks of sparse parts."""
    from drope_ops.transfer import staging_dir

    stage = staging_dir(dest)
    total = 0
    for p in stage.rglob("*") if stage.exists() else []:
        if p.is_file() and not p.name.endswith((".chunks", ".json")):
            st = p.stat()
            total += min(st.st_size, st.st_blocks * 512) if p.name.endswith(".drope-part") else st.st_size
    return total


def resume(uri: str, dest: Path, total: int) -> tuple[int, int]:
    from drope_ops.fetch import fetch

    proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", "fetch", uri, str(dest), "--no-progress",
                             "-q"], cwd=ROOT)
    while proc.poll() is None and landed_bytes(dest) < total // 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    remaining = total - landed_bytes(dest)
    res = fetch(uri, str(dest), progress=False)
    return res.bytes_transferred, remaining


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="drope-bench-s3-"))
    proc, endpoint = start_moto_server(log_path=work / "moto.log")
    os.environ.update(s3_env_vars(endpoint))
    try:
        import boto3

        from drope_ops import storage

        boto3.client("s3").create_bucket(Bucket="bench")
        total = make_checkpoint(work / "src", args.gib, args.shards)
        t = time.perf_counter()
        storage.put_checkpoint(work / "src", "s3://bench/ckpt")
        print(f"upload (put_checkpoint): {total / 2**30:.2f} GiB in {time.perf_counter() - t:.1f} s")
        shutil.rmtree(work / "src")
        from drope_ops import transfer

        base_t, same_t, ours_t = [], [], []
        for r in range(args.repeats):  # interleaved so all see the same machine load
            base_t.append(baseline("bench", "ckpt", work / f"base{r}"))
            shutil.rmtree(work / f"base{r}")
            same_t.append(baseline("bench", "ckpt", work / f"same{r}", part_size=transfer.CHUNK))
            shutil.rmtree(work / f"same{r}")
            ours_t.append(ours("s3://bench/ckpt", work / f"ours{r}"))
            shutil.rmtree(work / f"ours{r}")
            print(f"run {r}: download_file loop {base_t[-1]:.2f} s (boto3 defaults), {same_t[-1]:.2f} s "
                  f"({transfer.CHUNK >> 20} MiB parts like ours); drope fetch {ours_t[-1]:.2f} s")
        print(f"speed: fetch / sequential download_file = {min(ours_t) / min(base_t):.2f} (goal <= 0.7; "
              f"{total / 2**20 / min(ours_t):.0f} vs {total / 2**20 / min(base_t):.0f} MiB/s, fetch includes sha256)")
        # moto copies the whole object for every ranged GET, so part size alone matters there:
        print(f"speed at equal part size: fetch / download_file loop = {min(ours_t) / min(same_t):.2f}")
        moved, remaining = resume("s3://bench/ckpt", work / "resumed", total)
        print(f"resume after SIGKILL at ~50%: transferred {moved / 2**20:.0f} MiB for {remaining / 2**20:.0f} "
              f"MiB remaining: ratio {moved / max(remaining, 1):.3f} (goal <= 1.1)")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
