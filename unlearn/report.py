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
    if result.get("stop"):
        print(stop_line(result["stop"]))
    print(f"model saved to {result['model_dir']}")


def stop_line(stop: dict) -> str:
    """One line on what early stopping did (``unlearn.workflow.stop_record``)."""
    aucs, target = stop["auc_by_epoch"], stop["target_auc"]
    last = max(aucs, key=float) if aucs else None
    if stop["stopped_after_epochs"] is None:
        value = f"{aucs[last]:.3f}" if last else "n/a"
        return f"early stopping: ran every epoch; forget-vs-unseen Min-k AUC {value}, never <= {target:.3f}"
    kept = str(stop["stopped_after_epochs"])
    line = f"early stopping: stopped after {kept} epochs; forget-vs-unseen Min-k AUC {aucs[kept]:.3f}"
    if kept == last:
        return f"{line} <= {target:.3f}"
    return (f"{line}, kept: closer to {target:.3f} than {aucs[last]:.3f} after {last} epochs, "
            "where it crossed")


DYNAMICS_PANELS = (("forget loss", ("forget_loss",)), ("retain loss vs eps", ("retain_loss", "eps")),
                   ("dual variable lam", ("lam",)))


def dynamics_series(history: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """``{panel title: {metric: (steps, values)}}`` for each metric found in any row.

    Rows need not share keys: the Ray pipeline logs ``eps`` once, at step 0, before any step.
    """
    panels = {}
    for title, keys in DYNAMICS_PANELS:
        series = {}
        for key in keys:
            rows = [h for h in history if key in h]
            if rows:
                series[key] = ([h["step"] for h in rows], [h[key] for h in rows])
        if series:
            panels[title] = series
    return panels


def plot_dual_dynamics(history: list[dict], out_file: Path) -> Path | None:
    """lam, retain loss against eps, and forget loss over the optimizer steps (PNG)."""
    panels = dynamics_series(history)
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    last_step = max(h["step"] for h in history)
    for ax, (title, series) in zip(axes[0], panels.items()):
        for key, (steps, values) in series.items():
            if key == "eps" and len(set(values)) == 1:  # a fixed bound: a line across the run
                ax.axhline(values[0], linestyle="--", color="gray", label=key)
            else:
                ax.plot(steps, values, "--" if key == "eps" else "-", label=key)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_xlim(0, max(last_step, 1))
        if len(series) > 1:
            ax.legend()
    fig.tight_layout()
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_file, dpi=110)
    plt.close(fig)
    return out_file
