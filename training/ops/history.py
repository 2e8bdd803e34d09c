"""A project's model history for people: a text table and a PNG plot of metrics over versions."""
from __future__ import annotations

from pathlib import Path

from backend.registry import ModelVersion, Registry

COLUMNS = ("instance_dice", "ia", "primary", "image_dice", "instance_nsd")


def version_rows(registry: Registry, project: str) -> list[dict]:
    """One row per stored version, oldest first, with the gate's verdict and the candidate's metrics."""
    current = registry.current_version(project)
    rows = []
    for v in registry.versions(project):
        metrics = v.meta.get("metrics") or {}
        rows.append({
            "version": v.version,
            "state": "current" if v.version == current else (v.meta.get("status") or "stored"),
            "created_at": v.meta.get("created_at", ""),
            "parent": v.meta.get("parent") or "-",
            "train": (v.meta.get("counts") or {}).get("train", "-"),
            "val": (v.meta.get("counts") or {}).get("val", "-"),
            **{k: metrics.get(k) for k in COLUMNS},
        })
    return rows


def format_table(rows: list[dict]) -> str:
    """Rows -> an aligned text table (metrics with 3 decimals)."""
    if not rows:
        return "no model versions yet"
    header = ["version", "state", "created_at", "parent", "train", "val", *COLUMNS]

    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else ("-" if value is None else str(value))

    table = [header] + [[cell(r[h]) for h in header] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def plot_history(rows: list[dict], out: Path, title: str = "") -> Path:
    """PNG of the metrics over versions (promoted ones as filled markers, rejected as open ones)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    x = list(range(1, len(rows) + 1))
    for key in COLUMNS:
        ys = [r[key] if r[key] is not None else float("nan") for r in rows]
        line, = ax.plot(x, ys, "-", label=key)
        for xi, yi, r in zip(x, ys, rows):
            filled = r["state"] != "rejected"
            ax.plot(xi, yi, "o", color=line.get_color(), markerfacecolor=line.get_color() if filled else "white")
    ax.set_xticks(x, [r["version"].split("-")[0] for r in rows])
    ax.set_ylim(0, 1)
    ax.set_xlabel("model version (open markers: rejected by the gate)")
    ax.set_ylabel("score on the validation split")
    ax.set_title(title or "toothseg model history")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, out)


def save_figure(fig, out: Path) -> Path:
    """Lay out `fig`, write it to `out` (folders made) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def describe(version: ModelVersion) -> str:
    """A multi-line description of one version (its meta, pretty-printed)."""
    import json

    return json.dumps({"path": str(version.path), **version.meta}, indent=2)
