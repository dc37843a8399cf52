"""Pictures of training: loss curves from metrics.csv, and val loss per checkpoint.

    from plots import plot_loss_curve
    plot_loss_curve("checkpoints/metrics.csv", "checkpoints/loss_curve.png")

    python plots.py checkpoints/metrics.csv checkpoints/loss_curve.png   # redraw by hand

The training loop (training.fit, for train.py and finetune.py) calls `plot_loss_curve` at
every validation and at the end; `list.py --plot FILE` calls `plot_checkpoints`.
matplotlib is imported inside the functions, with its file-only Agg canvas (no window, no
display needed), so importing this module costs nothing.
"""

import csv
import sys


def read_metrics(metrics_csv: str) -> list[dict]:
    """The rows of a metrics.csv written by training.fit (Lightning's CSV logger), each {column: float}, empty
    cells left out, in file order. The one reader of that file (training.py, list.py, explore.py use it)."""
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.DictReader(f) if (row.get("step") or "").isdigit()]
    return [{key: float(value) for key, value in row.items() if value not in ("", None)} for row in rows]


def read_losses(metrics_csv: str) -> tuple[dict, dict]:
    """({step: train_loss}, {step: val_loss}) from a metrics.csv.

    A resumed run logs again the rows up to its checkpoint; the later row wins, as it describes the run
    that continued.
    """
    train, val = {}, {}
    for row in read_metrics(metrics_csv):
        if "train_loss" in row:
            train[int(row["step"])] = row["train_loss"]
        if "val_loss" in row:
            val[int(row["step"])] = row["val_loss"]
    return train, val


def _new_figure(title: str):
    from matplotlib.figure import Figure  # a bare Figure draws with Agg and keeps no global pyplot state

    fig = Figure(figsize=(7, 4.2), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token, log scale)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(y=0.12)  # room for the point labels
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    return fig, ax


def _label_log_axis(ax) -> None:
    """Plain numbers on the log axis: a loss range like 3..8 has no power of ten to label otherwise."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_loss_curve(metrics_csv: str, png: str, title: str = "training loss") -> str:
    """Draw train and val loss against step (log-scale y) from metrics.csv into `png`; return png."""
    train, val = read_losses(metrics_csv)
    fig, ax = _new_figure(title)
    if train:
        steps = sorted(train)
        ax.plot(steps, [train[s] for s in steps], label="train (mean over each log window)", color="tab:blue",
                marker="." if len(steps) < 50 else None)  # a short run's few points stay visible
    if val:
        steps = sorted(val)
        ax.plot(steps, [val[s] for s in steps], "o-", label="validation", color="tab:orange")
        best = min(val, key=val.get)
        ax.annotate(f"best val {val[best]:.3f}", (best, val[best]), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=8)
    _label_log_axis(ax)
    if train or val:
        ax.legend()
    fig.savefig(png)
    return png


def plot_checkpoints(rows: list[dict], png: str, title: str = "loss of each checkpoint") -> str:
    """Val (and train) loss of checkpoints against their step; rows are list.py's dicts. Returns png."""
    fig, ax = _new_figure(title)
    for key, style, color in (("train_loss", "s--", "tab:blue"), ("val_loss", "o-", "tab:orange")):
        points = sorted((r["step"], r[key]) for r in rows if r.get(key) is not None and r.get("step") is not None)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], style, color=color, label=key.replace("_", " "))
    named = [r for r in rows if r.get("val_loss") is not None and r.get("step") is not None]
    middle = (min(r["step"] for r in named) + max(r["step"] for r in named)) / 2 if named else 0
    for r in named:  # name each point so the picture says which file to pick; labels lean inwards
        right_half = r["step"] > middle
        ax.annotate(r["file"], (r["step"], r["val_loss"]), textcoords="offset points", xytext=(-4 if right_half else 4, 6),
                    ha="right" if right_half else "left", fontsize=7)
    _label_log_axis(ax)
    ax.legend()
    fig.savefig(png)
    return png


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] in ("-h", "--help"):
        print("usage: python plots.py METRICS_CSV OUTPUT_PNG\n\n" + __doc__)
        sys.exit(0)
    if len(sys.argv) != 3:
        sys.exit("usage: python plots.py METRICS_CSV OUTPUT_PNG")
    print(plot_loss_curve(sys.argv[1], sys.argv[2]))
