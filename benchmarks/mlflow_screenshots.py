"""Pictures of the MLflow UI for the README, taken with headless Chromium (refresh them with this).

    python benchmarks/mlflow_screenshots.py --store /tmp/drope-home --out docs/mlflow [--experiment debug]
    python benchmarks/mlflow_screenshots.py --tracking-uri http://127.0.0.1:5000 --out docs/mlflow

--store is a folder holding mlflow.db (+ artifacts/): an MLflow server is started on it (sqlite, proxied
artifacts, a free port) and stopped at the end; --tracking-uri uses a running server instead. The
experiment's workflow runs are read through MlflowClient and four pages are shot:

    runs.png         the experiment's runs list (parent runs with their headline columns)
    niah.png         NIAH score against length (step = tokens), every variant of the latest runs
    perplexity.png   perplexity against length, the same way
    model.png        the latest logged model's page (its run, lineage tags, metrics)

Chromium: Debian's `chromium` package (`apt-get install -y chromium`); nothing else is needed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, port: int) -> subprocess.Popen:
    """An MLflow server on the store's sqlite file, answering /health within 120 s, else an error."""
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                             "--artifacts-destination", str(store / "artifacts"), "--serve-artifacts",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"mlflow server on {store} exited with {proc.returncode}")
            time.sleep(1)
    proc.kill()
    raise SystemExit(f"mlflow server on {store} did not answer /health in 120 s")


UI_STATE = {"mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true", "mlflow.assistant.panelOpen_v1": "false",
            "mlflow.workflowType_v1": '"machine_learning"', "expandRows": "true"}
"""MLflow UI settings in localStorage: assistant panel closed, model-training view, child runs shown."""


def shoot(url: str, out: Path, width: int = 1600, height: int = 1000, wait_s: float = 12, then: str = "") -> Path:
    """One headless Chromium screenshot of `url`, taken over the DevTools protocol so that UI_STATE is in
    localStorage before the page's own scripts run (bounded: 120 s)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed: apt-get install -y chromium")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="drope-chromium-", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                                 f"--remote-debugging-port={port}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            png = asyncio.run(asyncio.wait_for(_capture(port, url, width, height, wait_s, then), timeout=120))
        finally:
            proc.terminate()
            proc.wait(timeout=15)
        out.write_bytes(png)
    print(f"{out}  <-  {url}", flush=True)
    return out


async def _capture(port: int, url: str, width: int, height: int, wait_s: float, then: str) -> bytes:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        for _ in range(100):  # DevTools answers within seconds of the browser's start
            try:
                async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
                    pages = [t for t in await r.json() if t["type"] == "page"]
                if pages:
                    break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.3)
        async with session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            calls = iter(range(1, 10**6))

            async def call(method: str, **params):
                await ws.send_json({"id": (n := next(calls)), "method": method, "params": params})
                while (msg := await ws.receive_json()).get("id") != n:
                    pass
                return msg.get("result", {})

            seed = "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});" for k, v in UI_STATE.items())
            await call("Page.enable")
            await call("Page.addScriptToEvaluateOnNewDocument", source=seed)
            await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
            await call("Page.navigate", url=url)
            await asyncio.sleep(wait_s)  # the UI fetches runs and draws charts after load
            if then:  # a script that changes the page's persisted state, then a reload that reads it
                await call("Runtime.evaluate", expression=then)
                await call("Page.reload")
                await asyncio.sleep(wait_s)
            return base64.b64decode((await call("Page.captureScreenshot", format="png"))["data"])


def show_columns(experiment_id: str, columns: list[str]) -> str:
    """Script for `shoot(then=...)`: the runs list's persisted UI state (localStorage, MLflow 3's
    `MLflowLocalStorage-1.1-ExperimentPage-<id>-ReactComponentState`) with these metric columns shown."""
    cols = json.dumps([f"metrics.`{c}`" for c in columns])
    return f"""(() => {{
      const keys = Object.keys(localStorage).filter(k => k.includes("ExperimentPage") && k.endsWith("ReactComponentState"));
      const targets = keys.length ? keys : ["MLflowLocalStorage-1.1-ExperimentPage-{experiment_id}-ReactComponentState"];
      for (const k of targets) {{
        let state = {{}};
        try {{ state = JSON.parse(localStorage.getItem(k) || "{{}}"); }} catch (e) {{}}
        state.selectedColumns = ["attributes.`Models`", ...{cols}];
        state.columnWidths = Object.fromEntries({cols}.map(c => [c, 230]));
        localStorage.setItem(k, JSON.stringify(state));
      }}
      return targets;
    }})()"""


def headline_columns(keys: set[str], variants=("drope", "rope", "yarn")) -> list[str]:
    """The runs list's columns: per variant, perplexity at 1x and at the largest factor, NIAH there."""
    factors = sorted({float(k.split("_x")[1].split("/")[0]) for k in keys if k.startswith("headline/perplexity_x")})
    if not factors:
        return sorted(k for k in keys if k.startswith("headline/"))
    x = lambda f: f"{f:g}"  # noqa: E731
    want = [f"headline/{m}/{v}" for m in (f"perplexity_x{x(factors[0])}", f"perplexity_x{x(factors[-1])}",
                                           f"niah_mean_x{x(factors[-1])}") for v in variants]
    return [k for k in want if k in keys]


def metric_page(base: str, experiment_id: str, run_ids: list[str], keys: list[str]) -> str:
    """MLflow's metric page: `keys` of `run_ids` against step (the evaluation's step is the length)."""
    q = {"runs": json.dumps(run_ids), "metric": json.dumps(keys[0]), "experiments": json.dumps([experiment_id]),
         "plot_metric_keys": json.dumps(keys), "plot_layout": "{}", "x_axis": "step", "y_axis_scale": "linear",
         "line_smoothness": "1", "show_point": "true", "deselected_curves": "[]", "last_linear_y_axis_range": "[]"}
    return f"{base}/#/metric/{urllib.parse.quote(keys[0], safe='')}?" + urllib.parse.urlencode(q)


def pick(client, experiment: str, runs: int):
    """(experiment id, latest workflow runs' ids, their evaluate runs, the latest logged model id)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in this store: run `drope run debug` against it first")
    found = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", order_by=["start_time DESC"])
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags][:runs]
    evaluates = [r for r in found if r.data.tags.get("drope.stage") == "evaluate"
                 and r.data.tags.get("mlflow.parentRunId") in {p.info.run_id for p in parents}]
    models = client.search_logged_models([exp.experiment_id], order_by=[{"field_name": "creation_time", "ascending": False}])
    return exp.experiment_id, [p.info.run_id for p in parents], evaluates, (models[0].model_id if models else None)


def keys_of(runs, task: str) -> list[str]:
    return sorted({k for r in runs for k in r.data.metrics if k.startswith(task + ".") or k.startswith(task + "/")})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", type=Path, help="folder with mlflow.db (+ artifacts/): a server is started on it")
    where.add_argument("--tracking-uri", help="a running MLflow server, e.g. http://127.0.0.1:5000")
    p.add_argument("--experiment", default="debug", help="experiment (the preset's name)")
    p.add_argument("--runs", type=int, default=2, help="latest finished workflow runs to compare")
    p.add_argument("--out", type=Path, default=Path("docs/mlflow"))
    args = p.parse_args(argv)
    from mlflow import MlflowClient

    server = start_server(args.store.resolve(), port := free_port()) if args.store else None
    base = args.tracking_uri.rstrip("/") if args.tracking_uri else f"http://127.0.0.1:{port}"
    try:
        exp_id, parents, evaluates, model_id = pick(MlflowClient(base), args.experiment, args.runs)
        args.out.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(base)
        headline = headline_columns({k for i in parents for k in client.get_run(i).data.metrics})
        shoot(f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning", args.out / "runs.png",
              width=2200, then=show_columns(exp_id, headline))
        for task, name in (("niah_single_1", "niah.png"), ("perplexity", "perplexity.png")):
            if keys := keys_of(evaluates, task):
                shoot(metric_page(base, exp_id, [r.info.run_id for r in evaluates], keys), args.out / name)
        if model_id:
            shoot(f"{base}/#/experiments/{exp_id}/models/{model_id}", args.out / "model.png")
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
