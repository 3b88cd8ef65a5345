"""Evaluation outputs: results table (JSON + Markdown), NIAH heatmaps, perplexity-vs-length plot.

A result is one unit's dict: {"variant", "task", "factor", "length", "score", ...}; NIAH results
carry "by_depth" {depth: score}, perplexity results "loss". Rows of the table are model variants,
columns task@length. Plots are matplotlib on the Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

VARIANT_ORDER = ("drope", "rope", "crop", "pi", "ntk", "yarn")


def _column(r: dict) -> str:
    return f"{r['task']}@{r['length']}"


def _variants(results: list[dict]) -> list[str]:
    seen = {r["variant"] for r in results}
    return [v for v in VARIANT_ORDER if v in seen] + sorted(seen - set(VARIANT_ORDER))


def results_table(results: list[dict]) -> dict:
    """{"columns": [task@L ...], "rows": {variant: {column: score}}} ordered by task then length."""
    columns = sorted({_column(r) for r in results},
                     key=lambda c: (c.rsplit("@", 1)[0], int(c.rsplit("@", 1)[1])))
    rows = {v: {} for v in _variants(results)}
    for r in results:
        rows[r["variant"]][_column(r)] = r["score"]
    return {"columns": columns, "rows": rows}


def write_table(results: list[dict], out_dir: str | Path, notes: dict | None = None) -> tuple[Path, Path]:
    """results.json (table + every result) and results.md; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(results)
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps({**table, "notes": notes or {}, "results": results}, indent=1, default=str))
    lines = ["Scores: NIAH string_match_all x100 and LongBench x100 (higher is better); "
             "perplexity (lower is better).", "",
             "| variant | " + " | ".join(table["columns"]) + " |",
             "|---" * (len(table["columns"]) + 1) + "|"]
    for variant, cells in table["rows"].items():
        vals = [_fmt(cells.get(c)) for c in table["columns"]]
        lines.append(f"| {variant} | " + " | ".join(vals) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if abs(x) < 1e5 else f"{x:.3g}"


def niah_heatmaps(results: list[dict], out_dir: str | Path) -> list[Path]:
    """One PNG per (variant, NIAH task): rows needle depth (%), columns length, cells score 0..100."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    niah = [r for r in results if r["task"].startswith("niah_") and r.get("by_depth")]
    for variant in _variants(niah):
        for task in sorted({r["task"] for r in niah if r["variant"] == variant}):
            cells = [r for r in niah if r["variant"] == variant and r["task"] == task]
            lengths = sorted({r["length"] for r in cells})
            depths = sorted({int(d) for r in cells for d in r["by_depth"]})
            grid = np.full((len(depths), len(lengths)), np.nan)
            for r in cells:
                for d, s in r["by_depth"].items():
                    grid[depths.index(int(d)), lengths.index(r["length"])] = s
            fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.0 + 0.45 * len(depths)))
            im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
            ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("needle depth")
            ax.set_title(f"{task}: {variant}")
            for i in range(len(depths)):
                for j in range(len(lengths)):
                    if not math.isnan(grid[i, j]):
                        ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
            fig.colorbar(im, ax=ax, label="score")
            fig.tight_layout()
            path = out / f"heatmap_{task}_{variant}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
    return paths


def perplexity_plot(results: list[dict], out_dir: str | Path, original_context: int | None = None) -> Path | None:
    """perplexity_vs_length.png: one line per variant (crop = the base model cut to C_train)."""
    ppl = [r for r in results if r["task"] == "perplexity"]
    if not ppl:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in _variants(ppl):
        pts = sorted((r["length"], r["score"]) for r in ppl if r["variant"] == variant)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant,
                linestyle="--" if variant == "crop" else "-")
    if original_context:
        ax.axvline(original_context, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("perplexity (held-out)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out_dir) / "perplexity_vs_length.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- the same results as MLflow names them ------------------------------------------------------------
def cell_key(r: dict) -> str:
    """A result's MLflow metric key, `{task}/{variant}` (its step is the length in tokens)."""
    return f"{r['task']}/{r['variant']}"


def table_rows(results: list[dict]) -> list[dict]:
    """One flat row per result (the scalar fields of results.json's "results"): MLflow's table artifact."""
    scalar = (str, int, float, bool, type(None))
    return [{k: v for k, v in r.items() if isinstance(v, scalar)} for r in results]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def headline(results: list[dict]) -> dict[str, float]:
    """The few numbers per variant that become columns of MLflow's runs list, keys
    `headline/<what>/<variant>`:

    - niah_mean_x<s>: mean NIAH score over the NIAH tasks at extension factor s (one key per factor);
    - perplexity_x<smallest s> and perplexity_x<largest s>: held-out perplexity at the shortest length
      (perplexity_x1: at C_train, when 1 is among the factors) and at the longest;
    - in_context_mean: mean over the `lm_eval_*` tasks scored at C_train only (the in-context set),
      when there are any.
    Cells without a score (a prompt frame that did not fit) are left out of the means."""
    scored = [r for r in results if r.get("score") is not None]
    out: dict[str, float] = {}
    for variant in _variants(scored):
        mine = [r for r in scored if r["variant"] == variant]
        for s in sorted({r["factor"] for r in mine if r["task"].startswith("niah_")}):
            out[f"headline/niah_mean_x{s:g}/{variant}"] = _mean(
                [r["score"] for r in mine if r["task"].startswith("niah_") and r["factor"] == s])
        ppl = {r["factor"]: r["score"] for r in mine if r["task"] == "perplexity"}
        for s in {min(ppl), max(ppl)} if ppl else ():
            out[f"headline/perplexity_x{s:g}/{variant}"] = ppl[s]
        in_context = [r for r in mine if r["task"].startswith("lm_eval_")
                      and all(o["factor"] == 1 for o in mine if o["task"] == r["task"])]
        if in_context:
            out[f"headline/in_context_mean/{variant}"] = _mean([r["score"] for r in in_context])
    return out
