"""What a person reads: terminal tables and the plot of the dual dynamics."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table; floats with 4 significant digits, None as '-'."""
    def cell(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def print_unlearn_table(result: dict) -> None:
    before, after = result["before"], result["after"]
    rows = [[key, before[key], after[key]] for key in before]
    if result.get("eps") is not None:
        rows.append(["eps (retain-loss bound)", None, result["eps"]])
    print(format_table(["metric", "before", "after"], rows))
    print(f"model saved to {result['model_dir']}")


def plot_dual_dynamics(history: list[dict], out_file: Path) -> Path | None:
    """lam, retain loss against eps, and forget loss over the optimizer steps (PNG)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    panels = [("forget loss", ["forget_loss"]), ("retain loss vs eps", ["retain_loss", "eps"]),
              ("dual variable lam", ["lam"])]
    panels = [(title, [k for k in keys if k in history[0]]) for title, keys in panels]
    panels = [(title, keys) for title, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            style = "--" if key == "eps" else "-"
            ax.plot(steps, [h[key] for h in history], style, label=key)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        if len(keys) > 1:
            ax.legend()
    fig.tight_layout()
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_file, dpi=110)
    plt.close(fig)
    return out_file
