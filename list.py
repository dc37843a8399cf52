"""List checkpoints with their step, epoch, losses and size, without loading any weights.

Examples:
    python list.py                              # checkpoints/ and its sub-folders (checkpoints/sft/ ...)
    python list.py --dir /tmp/run/checkpoints --sort val --limit 3     # the three best by val loss
    python list.py --sort mtime --json          # newest first, as JSON
    python list.py --plot checkpoints.png       # picture: val (and train) loss of each checkpoint by step

Metadata comes from the `NAME.ckpt.json` sidecar that every save writes next to the checkpoint,
read as plain JSON: torch is not even imported. Only a checkpoint without a current sidecar is
opened (memory-mapped, so still no weights are read).

Losses are the checkpoint's OWN, read from `metrics.csv` in the same folder: val is the
validation logged at the checkpoint's step, i.e. computed on exactly these weights (the stored
meta of a checkpoint saved between validations holds the previous validation's number); train is
the mean over the log window ending at that step, or the last one logged before it when the step
was not a logging step. Without metrics.csv, the stored meta is shown. An empty val (-) means no
validation ran at that step.

Tags: best / last / final for the files of those names and for every hard link to them (train.py
makes last.ckpt a hard link to the newest save: an `epoch=E-step=S.ckpt` while it runs, `final.ckpt` at the end).
Sorting: --sort step (highest first, the default), mtime (newest first) or val (lowest first);
--limit N keeps the first N rows of that order.
"""

import argparse
import glob
import json
import os
import time

from checkpoint import read_meta, same_files  # imports torch only for a checkpoint without a sidecar of its own
from cli import UsageError, check_output_file, run_cli

TAG_NAMES = ("best", "last", "final")
COLUMNS = [("file", "file"), ("kind", "kind"), ("step", "step"), ("epoch", "epoch"), ("tokens_seen", "tokens"),
           ("train_loss", "train"), ("val_loss", "val"), ("n_params", "params"), ("size", "size"),
           ("mtime", "modified"), ("tags", "tags")]


def logged_losses(folder: str, cache: dict) -> tuple[dict, dict] | None:
    """({step: train_loss}, {step: val_loss}) from folder/metrics.csv, or None when there is none."""
    if folder not in cache:
        path = os.path.join(folder, "metrics.csv")
        if os.path.isfile(path):
            from plots import read_losses  # the one metrics.csv reader (plain csv; matplotlib is not imported)

            cache[folder] = read_losses(path)
        else:
            cache[folder] = None
    return cache[folder]


def tags_of(path: str, same_file: list[str]) -> list[str]:
    """best/last/final when the file has that name or is a hard link (in its folder) to a file that has."""
    names = {os.path.basename(p) for p in same_file if os.path.dirname(p) == os.path.dirname(path)}
    return [tag for tag in TAG_NAMES if f"{tag}.ckpt" in names]


def collect(folder: str) -> list[dict]:
    """One dict per .ckpt file below `folder` (recursively)."""
    if not os.path.isdir(folder):
        raise UsageError(f"checkpoint folder not found: {folder} (train first, or pass --dir FOLDER)")
    paths = sorted(glob.glob(os.path.join(glob.escape(folder), "**", "*.ckpt"), recursive=True))  # exp[1] is a name
    stats = {p: os.stat(p) for p in paths}
    same_file = {p: names for names in same_files(paths) for p in names}
    rows, csv_cache = [], {}
    for path in paths:
        st = stats[path]
        row = {"file": os.path.relpath(path, folder), "path": path, "size": st.st_size, "mtime": st.st_mtime,
               "tags": tags_of(path, same_file[path])}
        try:
            meta = read_meta(path)
        except (UsageError, OSError, ValueError) as e:
            row.update({"kind": "unreadable", "error": str(e)})
            rows.append(row)
            continue
        row.update({key: meta.get(key) for key in ("kind", "step", "epoch", "tokens_seen", "train_loss", "val_loss",
                                                     "n_params")})
        logged = logged_losses(os.path.dirname(path), csv_cache)
        if logged is not None and row["step"] is not None:
            row["val_loss"] = logged[1].get(row["step"])  # stored meta may hold an older validation's value
            row["train_loss"] = logged[0].get(row["step"], row["train_loss"])
        rows.append(row)
    return rows


def sort_rows(rows: list[dict], key: str) -> list[dict]:
    """Most interesting first: highest step, newest file, or lowest val loss (missing values last)."""
    if key == "val":
        return sorted(rows, key=lambda r: (r.get("val_loss") is None, r.get("val_loss") or 0, r["file"]))
    field = "step" if key == "step" else "mtime"
    return sorted(rows, key=lambda r: (r.get(field) is not None, r.get(field) or 0, r["mtime"]), reverse=True)


def human(n, unit: str = "") -> str:
    """1234567 -> '1.23M'."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= limit:
            return f"{n / limit:.3g}{suffix}{unit}"
    return f"{n}{unit}"


def cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None or value == []:
        return "-"
    if key in ("train_loss", "val_loss"):
        return f"{value:.4f}"
    if key in ("tokens_seen", "n_params"):
        return human(value)
    if key == "size":
        return human(value, "B")
    if key == "mtime":
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(value))
    if key == "tags":
        return ",".join(value)
    if key == "epoch":
        return f"{value:.2f}"
    return str(value)


def print_table(rows: list[dict]) -> None:
    table = [[title for _, title in COLUMNS]] + [[cell(r, key) for key, _ in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    numeric = {"step", "epoch", "tokens_seen", "train_loss", "val_loss", "n_params", "size"}
    for line in table:
        print("  ".join(text.rjust(w) if key in numeric else text.ljust(w)
                        for text, w, (key, _) in zip(line, widths, COLUMNS)).rstrip())
    for r in rows:
        if r.get("error"):
            print(f"warning: {r['file']}: {r['error']}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="checkpoints", help="folder to list, recursively (default: checkpoints)")
    parser.add_argument("--sort", choices=["step", "mtime", "val"], default="step",
                        help="step: highest first (default); mtime: newest first; val: lowest val loss first")
    parser.add_argument("--limit", type=int, default=None, help="show only the first N rows")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--plot", metavar="FILE", help="also draw val/train loss per checkpoint into this PNG")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit <= 0:
        parser.error("--limit must be a positive integer")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.plot:
        check_output_file(args.plot, "--plot")
    rows = sort_rows(collect(args.dir), args.sort)[:args.limit]
    if args.json:
        print(json.dumps(rows, indent=1))
    elif rows:
        print_table(rows)
    else:
        print(f"no .ckpt files under {args.dir}")
    if args.plot:
        from plots import plot_checkpoints

        points = {}  # files with the same step and losses hold the same weights: one point, all their names
        for r in sorted(rows, key=lambda r: r["file"]):
            key = (r.get("step"), r.get("val_loss"), r.get("train_loss"))
            points[key] = {**r, "file": f"{points[key]['file']}, {r['file']}"} if key in points else r
        print(f"wrote {plot_checkpoints(list(points.values()), args.plot)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
