"""Charts of a training-step results JSON: step time and memory per method, relative to the floor.

    from boft_triton.bench.plots import plot_results
    paths = plot_results("bench/results/cpu-2026-11-26-minilm.json")   # PNGs beside the JSON

matplotlib with the headless Agg backend; nothing is shown, only files are written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

FAMILY_COLORS = {"floor": "#9e9e9e", "lora": "#4c72b0", "oft": "#dd8452", "boft": "#c44e52"}
OURS_COLOR = "#55a868"
PATCHED_PEFT_COLOR = "#8c8c3c"  # PEFT's BOFT under boft_triton.patch_peft()
MEMORY_TITLES = {
    "peak_mem_mib": "CUDA peak allocated",
    "peak_mem_growth_mib": "CUDA memory growth during a step",
    "rss_peak_growth_mib": "process RSS growth during a step",
    "saved_activations_mib": "bytes saved for backward (activations)",
}


def _color(row: dict) -> str:
    if row.get("config", {}).get("impl") == "boft_triton":
        return OURS_COLOR
    if row.get("config", {}).get("impl") == "peft+patch_peft":
        return PATCHED_PEFT_COLOR
    return FAMILY_COLORS.get(row["family"], "#8172b3")


def _num(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _bars(ax, rows: list[dict], metric: str, lora: Optional[str]) -> None:
    """Horizontal bars of ``metric`` relative to the floor, one per measured method."""
    labels = [r["label"] for r in rows]
    values = [r["ratios"]["floor"][metric] for r in rows]
    absolute = [r[metric] for r in rows]
    y = list(range(len(rows)))[::-1]
    ax.barh(y, values, color=[_color(r) for r in rows], height=0.7)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.axvline(1.0, color="black", lw=0.8)
    if lora is not None:
        ref = next(r for r in rows if r["method"] == lora)["ratios"]["floor"][metric]
        ax.axvline(ref, color=FAMILY_COLORS["lora"], lw=0.8, ls="--", label=f"{lora} = {ref:.2f}x")
        ax.legend(fontsize=7, loc="lower right")
    top = max(values) if values else 1.0
    for yi, v, a in zip(y, values, absolute):
        ax.text(v + 0.01 * top, yi, f"{v:.2f}x ({_num(a)})", va="center", fontsize=7)
    ax.set_xlim(0, top * 1.35)
    ax.grid(axis="x", alpha=0.3)


def plot_results(results_json: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Read a results JSON and write ``<stem>-time.png`` and ``<stem>-memory.png`` into
    ``out_dir`` (default: beside the JSON). Returns the paths written. Methods that were skipped or
    failed are listed under the chart; a run without a floor row cannot be drawn (ValueError)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from .training_step import validate

    path = Path(results_json)
    payload = json.loads(path.read_text())
    validate(payload)
    rows = [r for r in payload["rows"] if r["status"] == "ok"]
    if not any(r["method"] == "floor" for r in rows):
        raise ValueError(f"{path}: no measured floor row, nothing to draw ratios against")
    missing = [f"{r['method']} ({r['status']})" for r in payload["rows"] if r["status"] != "ok"]
    lora = next((b for b in payload["baselines"] if b != "floor"), None)
    env, work = payload["environment"], payload["workload"]
    subtitle = (f"{work['name']}, batch {work['batch_size']} x {work['seq_len']} tokens, {work.get('dtype', '')}, "
                f"targets {','.join(work['targets'])}\n{env['device']}, torch {env['torch']}, "
                f"commit {env.get('commit') or '?'}, {env['date']}")
    footer = ("not measured: " + ", ".join(missing)) if missing else None
    out = Path(out_dir) if out_dir is not None else path.parent
    out.mkdir(parents=True, exist_ok=True)
    height = 0.9 + 0.32 * len(rows)

    written = []
    fig, ax = plt.subplots(figsize=(7.5, height + 1.0), dpi=110)
    try:
        _bars(ax, rows, "step_ms", lora)
        ax.set_xlabel("training-step time relative to the floor (absolute: ms)")
        ax.set_title("step time (lower is better)\n" + subtitle, fontsize=8)
        written.append(_save(fig, out / f"{path.stem}-time.png", footer))
    finally:
        plt.close(fig)

    metrics = [payload["memory_metric"]]
    if "saved_activations_mib" not in metrics:
        metrics.append("saved_activations_mib")
    if payload["memory_metric"] == "peak_mem_mib":
        metrics.insert(1, "peak_mem_growth_mib")
    metrics = [m for m in metrics if all(r.get(m) is not None and r["ratios"]["floor"].get(m) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.0 * len(metrics), height + 1.0), dpi=110, squeeze=False)
    try:
        for ax, metric in zip(axes[0], metrics):
            _bars(ax, rows, metric, lora)
            ax.set_xlabel(f"{MEMORY_TITLES.get(metric, metric)} relative to the floor (absolute: MiB)", fontsize=8)
        fig.suptitle("memory (lower is better)\n" + subtitle, fontsize=8)
        written.append(_save(fig, out / f"{path.stem}-memory.png", footer))
    finally:
        plt.close(fig)
    return written


def _save(fig, target: Path, footer: str | None) -> Path:
    """Lay out (leaving room for the footer line) and write one chart."""
    if footer:
        fig.text(0.01, 0.005, footer, fontsize=6, va="bottom")
    fig.tight_layout(rect=(0, 0.03 if footer else 0, 1, 1))
    fig.savefig(target)
    return target
