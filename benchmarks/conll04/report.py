"""Report of the CoNLL'04 benchmark: `python -m benchmarks.conll04.report`.

Reads the run JSONs in ``benchmarks/results/conll04/`` and writes ``REPORT.md`` (mean ± sample
standard deviation over seeds per method and fraction), ``figure2.png`` (entity and relation F1 per
method and fraction, like the paper's Figure 2) and ``figure4.png`` (per-sample training losses of
FISH-DIP and the fixed FISH mask at 1% of train, like the paper's Figure 4). FISH-DIP's F1 gaps to
the other methods come with paired bootstrap intervals over the test sentences, re-scored from each
run's stored predictions (`significance.py`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks.conll04.data import load_types
from benchmarks.conll04.significance import count_matrix, paired_bootstrap
from benchmarks.conll04.training import PROTOCOL, REPO_ROOT, eval_sentences
from benchmarks.methods import FIXED_MASK, METHODS, REFERENCE

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results" / "conll04"
LR_FILE = REPO_ROOT / "benchmarks" / "conll04" / "lr_selection.json"
FULL_TEST_SENTENCES = 288
METHOD_ORDER = tuple(METHODS)  # the registry's order (`benchmarks.methods`)
METHOD_LABELS = {name: method.label for name, method in METHODS.items()}
# Das et al. 2023, CoNLL'04 with T5-large (entity F1, relation F1) at 1 / 5 / 10% of train.
PAPER = {
    "fishdip": {0.01: (56.9, 21.6), 0.05: (77.3, 49.2), 0.1: (81.5, 57.1)},
    "full-ft": {0.01: (46.1, 14.1), 0.05: (74.1, 40.6), 0.1: (79.1, 54.4)},
}
COMMANDS = (
    ("quick benchmark (`make bench` runs it with `--results-dir benchmarks/results/conll04/local`)",
     "python -m benchmarks.conll04.run --quick"),
    ("learning-rate selection on dev", "python -m benchmarks.conll04.run --select-lr"),
    ("FISH-DIP settings on dev", "python -m benchmarks.conll04.run --explore-fishdip"),
    ("grid, seed 0", "python -m benchmarks.conll04.run --fractions 0.01,0.05,0.1 --seeds 0"),
    ("grid, seeds 1 and 2", "python -m benchmarks.conll04.run --methods fishdip,fixed-fish,full-ft,lora "
                            "--fractions 0.01,0.05,0.1 --seeds 1,2"),
    ("all of the above in order, resumable, committing each result", "python -m benchmarks.conll04.run --grid --commit"),
    ("this report", "python -m benchmarks.conll04.report"),
)


# -- loading and aggregation ------------------------------------------------------------------------
def load_runs(folder: str | Path) -> list[dict]:
    """Every run JSON directly in `folder`, whatever its protocol."""
    records = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and {"method", "train_fraction", "seed", "entity_f1"} <= record.keys():
            record["_file"] = path.name
            records.append(record)
    return records


def protocol_of(record: dict) -> int:
    return record.get("protocol", 1)


def reported_protocol(records: list[dict]) -> int:
    """The procedure a folder's report shows: the newest one among its runs (`training.PROTOCOL` if none).

    Runs of different protocols are never mixed in one table: a change of procedure can move any figure.
    """
    return max((protocol_of(r) for r in records), default=PROTOCOL)


def is_current(record: dict, protocol: int = PROTOCOL) -> bool:
    """Made with the training and decoding procedure `protocol` (default: the runner's, `training.PROTOCOL`)."""
    return protocol_of(record) == protocol


def load_results(results_dir: str | Path = RESULTS_DIR) -> list[dict]:
    """The test runs in `results_dir` made with its newest protocol (earlier ones await a re-run)."""
    runs = load_runs(results_dir)
    protocol = reported_protocol(runs)
    return [r for r in runs if is_current(r, protocol)]


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the deviation is None for a single value."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def fmt_mean_std(values: list[float], digits: int = 1) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def method_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def is_partial(record: dict) -> bool:
    """A smoke run: scored on part of the test set, on another split, or with a shorter decoding budget."""
    return bool(record.get("eval_sentences", FULL_TEST_SENTENCES) < FULL_TEST_SENTENCES
                or record.get("eval_split", "test") != "test" or record.get("eval_max_new_tokens"))


def aggregate(records: list[dict]) -> list[dict]:
    """One row per (fraction, method): scores over seeds and the run's costs."""
    groups: dict[tuple[float, str], list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["train_fraction"], r["method"])].append(r)
    rows = []
    for (fraction, method), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], method_key(kv[0][1]))):
        runs = sorted(runs, key=lambda r: r["seed"])
        rows.append({
            "fraction": fraction,
            "method": method,
            "seeds": [r["seed"] for r in runs],
            "entity": [r["entity_f1"] for r in runs],
            "relation": [r["relation_f1"] for r in runs],
            "trainable_params": runs[0].get("trainable_params"),
            "total_params": runs[0].get("total_params"),
            "checkpoint_bytes": statistics.fmean(r.get("checkpoint_bytes", 0) for r in runs),
            "train_seconds": statistics.fmean(r.get("train_seconds", 0.0) for r in runs),
            "eval_seconds": statistics.fmean(r.get("eval_seconds", 0.0) for r in runs),
            "peak_memory_bytes": max(r.get("peak_memory_bytes", 0) for r in runs),
            "steps": sorted({r.get("steps") for r in runs}),
            "learning_rates": sorted({r.get("learning_rate") for r in runs}),
            "lr_sources": sorted({r.get("learning_rate_source", "?") for r in runs}),
            "cpus": sorted({r.get("cpu") or "" for r in runs}),
            "last_epoch_loss": statistics.fmean(last_epoch_loss(r) for r in runs),
            "partial": any(is_partial(r) for r in runs),
            "eval_sentences": min(r.get("eval_sentences", FULL_TEST_SENTENCES) for r in runs),
        })
    return rows


def processor_labels(records: list[dict]) -> dict[str, str]:
    """A short label per processor the runs recorded (A, B, ...); "?" for runs that predate the field."""
    known = sorted({r["cpu"] for r in records if r.get("cpu")})
    labels = {cpu: chr(ord("A") + i) for i, cpu in enumerate(known)}
    if any(not r.get("cpu") for r in records):
        labels[""] = "?"
    return labels


def last_epoch_loss(record: dict) -> float:
    """Mean batch loss over the run's last epoch of steps (every training sentence once).

    The last step's loss alone is one batch of 8 and too noisy to compare runs: FISH-DIP's 5% dev run at
    1e-3 ended at 0.108, while its last 6 steps (one pass over the 46 sentences) averaged 0.043.
    """
    steps_per_epoch = math.ceil(record["train_sentences"] / record["batch_size"])
    return statistics.fmean(step["loss"] for step in record["train_log"][-steps_per_epoch:])


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def human_count(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def summary_table(records: list[dict]) -> str:
    """Markdown table of entity and relation F1 (mean ± std over seeds) with each method's costs."""
    lines = ["| train | method | seeds | entity F1 | relation F1 | trainable | checkpoint | train time | "
             "peak RSS | lr | last-epoch loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    labels = processor_labels(records)
    for row in aggregate(records):
        machines = f" ({', '.join(labels[c] for c in row['cpus'])})" if len(labels) > 1 else ""
        share = (f" ({100 * row['trainable_params'] / row['total_params']:.2f}%)"
                 if row["trainable_params"] and row["total_params"] else "")
        mark = " †" if row["partial"] else ""
        lines.append(
            f"| {100 * row['fraction']:g}% | {METHOD_LABELS.get(row['method'], row['method'])} | "
            f"{len(row['seeds'])} | {fmt_mean_std(row['entity'])}{mark} | {fmt_mean_std(row['relation'])}{mark} | "
            f"{human_count(row['trainable_params'])}{share} | {human_bytes(row['checkpoint_bytes'])} | "
            f"{row['train_seconds'] / 60:.1f} min{machines} | {human_bytes(row['peak_memory_bytes'])} | "
            f"{', '.join(f'{lr:g}' for lr in row['learning_rates'])} | {row['last_epoch_loss']:.3f} |"
        )
    if len(lines) == 2:
        lines.append("| (no finished run) | | | | | | | | | | |")
    return "\n".join(lines)


def comparisons(records: list[dict]) -> list[str]:
    """Plain sentences: at each fraction, where FISH-DIP wins and where it loses (means over seeds)."""
    rows = aggregate(records)
    by_fraction: dict[float, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        by_fraction[row["fraction"]][row["method"]] = row
    sentences = []
    for fraction, methods in sorted(by_fraction.items()):
        ours = methods.get(REFERENCE)
        if ours is None:
            continue
        e, r = statistics.fmean(ours["entity"]), statistics.fmean(ours["relation"])
        losses, wins = [], []
        for method, row in sorted(methods.items(), key=lambda kv: method_key(kv[0])):
            if method == REFERENCE:
                continue
            oe, orel = statistics.fmean(row["entity"]), statistics.fmean(row["relation"])
            label = METHOD_LABELS.get(method, method)
            # Compared at the precision shown: "2.1 vs 2.1" is not a loss.
            lost = [f"{kind} F1 {mine:.1f} vs {theirs:.1f}" for kind, mine, theirs in
                    (("entity", e, oe), ("relation", r, orel)) if round(mine, 1) < round(theirs, 1)]
            (losses if lost else wins).append(f"{label} ({'; '.join(lost)})" if lost else label)
        head = f"At {100 * fraction:g}% of train"
        if losses:
            sentences.append(f"{head}, FISH-DIP loses to {', '.join(losses)}"
                             + (f"; it is at least as good on both scores as {', '.join(wins)}." if wins else "."))
        elif wins:
            sentences.append(f"{head}, FISH-DIP is at least as good on both scores as every other method run "
                             f"({', '.join(wins)}).")
    return sentences


def fmt_gap(gap: float, low: float, high: float) -> str:
    """`+1.2 [-0.5, +3.0]`, in bold when the interval excludes zero."""
    text = f"{gap:+.1f} [{low:+.1f}, {high:+.1f}]"
    return f"**{text}**" if low > 0 or high < 0 else text


class SentenceCounts:
    """Per-sentence count matrices of runs' stored predictions, parsed once per run."""

    def __init__(self):
        self._gold: dict[tuple[str, int | None], list] = {}
        self._types = None

    def __call__(self, record: dict):
        if record.get("predictions") is None:
            return None
        key = (record.get("eval_split", "test"), record.get("eval_limit"))
        if key not in self._gold:
            self._gold[key] = eval_sentences(*key)
            self._types = self._types or load_types()
        if "_counts" not in record:
            record["_counts"] = count_matrix(record, self._gold[key], self._types)
        return record["_counts"]


def significance_section(records: list[dict], counts: SentenceCounts) -> list[str]:
    """FISH-DIP minus each other method, per fraction: F1 gap with a paired bootstrap 95% interval."""
    runs = {(r["train_fraction"], r["method"], r["seed"]): r for r in records
            if not is_partial(r) and counts(r) is not None}
    lines = ["FISH-DIP's F1 minus each other method's on the same test sentences, mean over the seeds both have, "
             f"with a 95% paired bootstrap interval over the {FULL_TEST_SENTENCES} test sentences (10,000 resamples; "
             "`benchmarks/conll04/significance.py`). Bold: the interval excludes 0, so test-set sampling alone "
             "does not explain the gap. The interval leaves out seed-to-seed variation (the ± above).", "",
             "| train | FISH-DIP minus | seeds | entity F1 gap [95% CI] | relation F1 gap [95% CI] |",
             "| --- | --- | --- | --- | --- |"]
    fractions = sorted({f for f, m, _ in runs if m == REFERENCE})
    for fraction in fractions:
        others = sorted({m for f, m, _ in runs if f == fraction and m != REFERENCE}, key=method_key)
        for method in others:
            seeds = sorted(s for f, m, s in runs if f == fraction and m == method and (f, REFERENCE, s) in runs)
            if not seeds:
                continue
            gaps = paired_bootstrap([counts(runs[(fraction, REFERENCE, s)]) for s in seeds],
                                    [counts(runs[(fraction, method, s)]) for s in seeds])
            lines.append(f"| {100 * fraction:g}% | {METHOD_LABELS.get(method, method)} | {len(seeds)} | "
                         f"{fmt_gap(*gaps['entity'])} | {fmt_gap(*gaps['relation'])} |")
    if len(lines) == 4:
        return ["No FISH-DIP run and other run with stored test predictions share a fraction and seed yet."]
    return lines


# -- figures --------------------------------------------------------------------------------------------
def figure2(records: list[dict], path: Path) -> Path | None:
    """Grouped bars: entity and relation F1 per fraction and method, error bars = std over seeds."""
    rows = aggregate(records)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted({row["fraction"] for row in rows})
    methods = sorted({row["method"] for row in rows}, key=method_key)
    lookup = {(row["fraction"], row["method"]): row for row in rows}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=False)
    width = 0.8 / len(methods)
    colors = plt.get_cmap("tab10")
    for ax, kind, title in ((axes[0], "entity", "Entity F1"), (axes[1], "relation", "Relation F1")):
        for j, method in enumerate(methods):
            xs, ys, errs = [], [], []
            for i, fraction in enumerate(fractions):
                row = lookup.get((fraction, method))
                if row is None:
                    continue
                mean, std = mean_std(row[kind])
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(mean)
                errs.append(std or 0.0)
            ax.bar(xs, ys, width, yerr=errs, capsize=2, label=METHOD_LABELS.get(method, method),
                   color=colors(method_key(method)[0] % 10), edgecolor="black" if method == REFERENCE else None,
                   linewidth=1.2)
        ax.set_xticks(range(len(fractions)), [f"{100 * f:g}%" for f in fractions])
        ax.set_xlabel("training data (fraction of CoNLL'04 train)")
        ax.set_ylabel(f"{title} (test, %)")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    models = ", ".join(sorted({str(r.get("model")) for r in records}))
    fig.suptitle(f"CoNLL'04, {models}: mean over seeds (error bars: sample std)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_curves(record: dict) -> tuple[list[int], list[float], list[float]]:
    steps, means, maxes = [], [], []
    for entry in record.get("train_log", []):
        losses = entry["per_sample_losses"]
        steps.append(entry["step"])
        means.append(statistics.fmean(losses))
        maxes.append(max(losses))
    return steps, means, maxes


def figure4_records(records: list[dict], fraction: float = 0.01) -> tuple[float | None, dict[str, list[dict]]]:
    """FISH-DIP and fixed-mask runs at `fraction` (or the smallest fraction that has both)."""
    by_fraction: dict[float, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["method"] in (REFERENCE, FIXED_MASK) and r.get("train_log"):
            by_fraction[r["train_fraction"]][r["method"]].append(r)
    candidates = [fraction] + sorted(f for f in by_fraction if f != fraction)
    for f in candidates:
        if len(by_fraction.get(f, {})) == 2:
            return f, by_fraction[f]
    for f in candidates:
        if by_fraction.get(f):
            return f, by_fraction[f]
    return None, {}


def figure4(records: list[dict], path: Path, fraction: float = 0.01) -> Path | None:
    """Mean and max per-sample training loss per step, FISH-DIP vs the fixed mask (seed 0 solid)."""
    chosen, runs = figure4_records(records, fraction)
    if chosen is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    colors = {REFERENCE: "tab:red", FIXED_MASK: "tab:blue"}
    for ax, which, title in ((axes[0], 1, "mean per-sample loss in the batch"),
                             (axes[1], 2, "max per-sample loss in the batch")):
        for method in (REFERENCE, FIXED_MASK):
            for r in sorted(runs.get(method, []), key=lambda r: r["seed"]):
                curve = loss_curves(r)
                ax.plot(curve[0], curve[which], color=colors[method], alpha=1.0 if r["seed"] == 0 else 0.35,
                        label=f"{METHOD_LABELS[method]} (seed {r['seed']})")
                if method == REFERENCE and r["seed"] == min(x["seed"] for x in runs[method]):
                    for e in r["train_log"]:
                        if e.get("mask_changed"):
                            ax.axvline(e["step"], color="tab:red", alpha=0.15, linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss (per-sample token mean)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Sample-wise training loss at {100 * chosen:g}% of CoNLL'04 train "
                 "(faint vertical lines: FISH-DIP mask refreshes)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- report -------------------------------------------------------------------------------------------
def lr_section(lr_file: Path) -> list[str]:
    if not lr_file.is_file():
        return ["No learning rate has been selected yet (`benchmarks/conll04/lr_selection.json` is missing): "
                "runs use the documented defaults (the middle of each method's `lr_grid` in "
                "`benchmarks/methods.py`)."]
    with open(lr_file, encoding="utf-8") as f:
        selection = json.load(f)
    setting = selection.get("setting", {})
    lines = [f"Selected on dev ({setting.get('dev_sample', 'dev sample')}), training at "
             f"{100 * setting.get('train_fraction', 0.05):g}% of train, seed {setting.get('seed', 0)}, "
             f"{setting.get('steps', '?')} steps; criterion: {setting.get('criterion', '?')}. "
             "The test set is never used for it. A grid whose best rate fell on one of its ends was extended past "
             "it before the selection was final (the history is in the comment above the grids in "
             "`benchmarks/methods.py`).", "",
             "| method | grid | dev (entity / relation F1) per rate | selected |", "| --- | --- | --- | --- |"]
    edges = []
    for method, entry in selection.get("methods", {}).items():
        scores = "; ".join(f"{lr}: {s['entity_f1']:.1f} / {s['relation_f1']:.1f}"
                           for lr, s in entry.get("dev_scores", {}).items())
        grid = entry.get("grid", [])
        chosen = entry.get("selected")
        at_edge = chosen is not None and grid and chosen in (min(grid), max(grid))
        if at_edge:
            edges.append(METHOD_LABELS.get(method, method))
        lines.append(f"| {METHOD_LABELS.get(method, method)} | {', '.join(f'{v:g}' for v in grid)} | {scores} | "
                     f"{'incomplete' if chosen is None else f'{chosen:g}' + (' (edge)' if at_edge else '')} |")
    if edges:
        lines += ["", f"(edge): the best rate is at the end of its grid for {', '.join(edges)}; a wider grid might "
                  "find a better one."]
    return lines


def exploration_section(results_dir: Path, counts: SentenceCounts | None = None,
                        protocol: int | None = None) -> list[str]:
    """FISH-DIP's density, m and n varied one at a time on dev (`run.py --explore-fishdip`)."""
    explored = load_runs(results_dir / "dev_exploration")
    protocol = reported_protocol(explored) if protocol is None else protocol
    variants = [r for r in explored if is_current(r, protocol)]
    if not variants:
        return ["Not run yet (`python -m benchmarks.conll04.run --explore-fishdip`, after the rate selection)."]
    counts = counts or SentenceCounts()
    lr = variants[0]["learning_rate"]
    reference = [r for r in load_runs(results_dir / "lr_selection")
                 if is_current(r, protocol) and r["method"] == REFERENCE and r["learning_rate"] == lr]
    r0 = variants[0]
    lines = [f"FISH-DIP at its selected rate {lr:g}, {100 * r0['train_fraction']:g}% of train, seed {r0['seed']}, "
             f"{r0['steps']} steps, scored on the {r0['eval_sentences']} dev sentences of the rate selection; one "
             "setting changed at a time from the benchmark's (first row). The test set is never used. Gap: the "
             "setting's F1 minus the first row's, with a 95% paired bootstrap interval over the dev sentences "
             "(bold when it excludes 0).", "",
             "| density | m (update_every) | n (num_regressing) | dev entity F1 | dev relation F1 | entity gap | "
             "relation gap | last-epoch loss | checkpoint | train time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = counts(reference[0]) if reference else None
    for r in reference + sorted(variants, key=lambda r: r["_file"]):
        m = r["hyperparameters"]["method"]
        mine = counts(r)
        if base is None or mine is None or r is reference[0]:
            gaps = ["", ""]
        else:
            result = paired_bootstrap([mine], [base])
            gaps = [fmt_gap(*result[kind]) for kind in ("entity", "relation")]
        lines.append(f"| {m['density']:g} | {m['update_every']} | {m['num_regressing']} | {r['entity_f1']:.1f} | "
                     f"{r['relation_f1']:.1f} | {gaps[0]} | {gaps[1]} | {last_epoch_loss(r):.3f} | "
                     f"{human_bytes(r['checkpoint_bytes'])} | {r['train_seconds'] / 60:.1f} min |")
    return lines


def setting_lines(records: list[dict]) -> list[str]:
    if not records:
        return []
    r = records[0]
    hp = r.get("hyperparameters", {})
    steps = sorted({(x["train_fraction"], x["steps"]) for x in records})
    versions = r.get("versions", {})
    fish = next((x for x in records if x["method"] == REFERENCE), None)
    kind = ("encoder-decoder: sentence -> target" if r.get("encoder_decoder") else
            "causal LM: prompt = sentence + newline, labels -100 on the prompt, target + eos")
    lines = [
        f"- Model: {r.get('model')} ({human_count(r.get('total_params'))} parameters, "
        f"{hp.get('dtype', 'float32')}), {kind}.",
        "- Data: CoNLL'04 (SpERT split 922 / 231 / 288) in the TANL format; each fraction's training subset is "
        "`train_subset(train, fraction, seed)`; every number is on the full 288-sentence test set"
        + (" except those marked †." if any(row["partial"] for row in aggregate(records)) else "."),
        f"- Training: {hp.get('optimizer', 'AdamW')} (weight decay {hp.get('weight_decay')}, constant rate, gradient "
        f"clipping {hp.get('max_grad_norm')}), batch {r.get('batch_size')}, the same step budget for every method: "
        + ", ".join(f"{100 * f:g}% -> {s} steps" for f, s in steps)
        + " (about 7 epochs of the subset, at least 30 steps). Each sample of a batch runs its own forward "
        "without padding, with logits only where a target token is predicted; the loss is the batch's token "
        "mean, as one padded forward gives it.",
        f"- Decoding: {hp.get('decoding')}, sentences sorted by length in batches of {hp.get('eval_batch_size')} "
        "(left padding), parsed with `tanl.parse_output`.",
    ]
    if fish:
        m = fish["hyperparameters"]["method"]
        lines.append(f"- FISH-DIP: density {m.get('density')}, n = num_regressing = {m.get('num_regressing')}, "
                     f"m = update_every = max(1, steps // 6) (e.g. {m.get('update_every')} at "
                     f"{100 * fish['train_fraction']:g}%), mask built at step 1 and refreshed every m steps; the "
                     "fixed FISH mask is built once at step 1; the ablation draws the n samples uniformly.")
    lines.append(f"- Software: torch {versions.get('torch')}, transformers {versions.get('transformers')}, "
                 f"peft {versions.get('peft')}, adapters {versions.get('adapters')}; commits "
                 + ", ".join(sorted({str(x.get('commit'))[:10] for x in records})) + ".")
    labels = processor_labels(records)
    counts = defaultdict(int)
    for x in records:
        counts[x.get("cpu") or ""] += 1
    lines.append("- Processors: " + "; ".join(
        f"{label} = " + (cpu or "not recorded (runs made before the runner recorded it)") + f", {counts[cpu]} runs"
        for cpu, label in labels.items())
        + ". Train times compare only between runs on the same processor"
        + (" (the train time column names each row's)." if len(labels) > 1 else "."))
    return lines


def quick_timing_lines(results_dir: Path, records: list[dict] | None = None, protocol: int = PROTOCOL) -> list[str]:
    path = results_dir / "quick_timing.json"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        t = json.load(f)
    if not is_current(t, protocol):
        return []
    load = t.get("load_average_start", [None])[0], t.get("load_average_end", [None])[0]
    from benchmarks.conll04.run import QUICK

    quick = [r for r in records or [] if r.get("train_fraction") in QUICK["fractions"]
             and r.get("seed") in QUICK["seeds"] and r.get("method") in QUICK["methods"]
             and "quick" in str(r.get("command"))]
    cpu = ""
    if len(quick) == len(QUICK["methods"]) and all("train_cpu_seconds" in r for r in quick):
        busy = sum(r["train_cpu_seconds"] + r["eval_cpu_seconds"] + r.get("load_seconds", 0) for r in quick)
        cpu = (f" Its runs used {busy / 60:.0f} CPU-minutes for loading, training and decoding, about "
               f"{busy / 60 / (t.get('cpu_count') or 2):.0f} min of wall time on {t.get('cpu_count')} idle cores "
               "(plus ~1 min of process start-up and checkpoint saving per run).")
    return [f"- `make bench` (`{t.get('command', '').split('  (')[0]}`, {t.get('runs')} runs, each in a fresh process) "
            f"took {t['wall_seconds'] / 60:.1f} min of wall time on {t.get('cpu_count')} CPU cores, finished "
            f"{t.get('finished_at')}; the 1-minute load average was {load[0]} at its start and {load[1]} at its end "
            f"(above {t.get('cpu_count')}, other jobs shared the cores and stretched the wall times)." + cpu]


def write_report(results_dir: str | Path = RESULTS_DIR, lr_file: str | Path = LR_FILE) -> Path:
    """Write REPORT.md, figure2.png and figure4.png into `results_dir`; returns the report's path."""
    results_dir, lr_file = Path(results_dir), Path(lr_file)
    results_dir.mkdir(parents=True, exist_ok=True)
    every_run = load_runs(results_dir)
    protocol = reported_protocol(every_run)
    records = [r for r in every_run if is_current(r, protocol)]
    stale = len(every_run) - len(records)
    fig2 = figure2(records, results_dir / "figure2.png")
    fig4 = figure4(records, results_dir / "figure4.png")
    chosen, _ = figure4_records(records)
    rows = aggregate(records)
    lines = ["# CoNLL'04 benchmark: FISH-DIP and the baselines (the paper's Figure 2 / Table 5, rebuilt)", "",
             "Generated by `python -m benchmarks.conll04.report` from the run JSONs in this folder "
             f"({len(records)} run{'s' if len(records) != 1 else ''}). Scores are micro F1 in percent on the "
             "CoNLL'04 test set, mean ± sample standard deviation (n - 1) over the seeds listed; a single seed "
             "has no ±."
             + (f" {stale} run(s) made with an earlier version of the training and decoding procedure are left "
                "out until the runner repeats them." if stale else "")
             + (f" These runs were made with version {protocol} of the procedure (`training.PROTOCOL`); the runner "
                f"is now at version {PROTOCOL}, whose changes are listed beside `PROTOCOL` in "
                "`benchmarks/conll04/training.py`, and repeats them under `--grid`." if protocol < PROTOCOL else ""),
             ""]
    lines += ["## Setting", ""] + setting_lines(records) + quick_timing_lines(results_dir, records, protocol) + [""]
    lines += ["## Results", "", summary_table(records), ""]
    if any(row["partial"] for row in rows):
        lines += ["† a smoke run (`--eval-limit` or `--max-new-tokens`): scored on part of the test set or with "
                  "a shorter decoding budget; not comparable.", ""]
    lines += ["Trainable: what the optimizer trains (FISH-DIP: K = 1% of all weight entries, tied embeddings once). "
              "Checkpoint: bytes on disk of what the method saves (`save_pretrained` of the adapter, FISH-DIP's "
              "sparse deltas, or the whole fp32 model for full fine-tuning; a dynamic mask's checkpoint holds every "
              "entry that was ever in a mask, since entries that leave keep what they learned, so it grows with "
              "the number of refreshes). Train time: wall time of the training "
              "loop on the run's CPU cores (2 here; the load averages are in each JSON), FISH-DIP's Fisher "
              "refreshes included. Peak RSS: the run's process. Last-epoch loss: the mean training loss of the "
              "run's last ceil(subset / batch) steps, one pass over the subset (a single batch's loss is too "
              "noisy to compare runs).", ""]
    sentences = comparisons(records)
    lines += ["## Where FISH-DIP wins and loses", ""]
    lines += [f"- {s}" for s in sentences] if sentences else ["- No FISH-DIP run has finished yet."]
    counts = SentenceCounts()
    lines += ["", "### Is the gap beyond test-set noise?", ""] + significance_section(records, counts)
    lines += ["", "Paper (T5-large, 3 seeds) for reference, entity / relation F1: "
              + "; ".join(f"{METHOD_LABELS[m]} " + ", ".join(f"{100 * f:g}%: {e} / {r}" for f, (e, r) in v.items())
                          for m, v in PAPER.items())
              + ". Our default model (SmolLM2-135M) is about 5.7x smaller than T5-large (770M) and trains for "
              "30-80 steps on 2 CPU cores, so absolute numbers are not comparable with the paper's; the "
              "comparison between methods under one setting is what this benchmark measures.", ""]
    lines += ["## Figures", ""]
    lines += ["![Figure 2](figure2.png)" if fig2 else "Figure 2: no run yet.", ""]
    if fig4:
        shown = figure4_records(records)[1]
        missing = [METHOD_LABELS[m] for m in (REFERENCE, FIXED_MASK) if m not in shown]
        lines += ["![Figure 4](figure4.png)", "",
                  f"Figure 4: per-step mean and max of the per-sample training losses of the batch at "
                  f"{100 * chosen:g}% of train, FISH-DIP (mask refreshed every m steps from the highest-loss samples) "
                  "against the fixed FISH mask (built once at step 1), seed 0 solid, other seeds faint"
                  + (f"; no {' or '.join(missing)} run at this fraction yet." if missing else "."), ""]
    else:
        lines += ["Figure 4: needs FISH-DIP and fixed-mask runs.", ""]
    lines += ["## Learning rates", ""] + lr_section(lr_file) + [""]
    lines += ["## FISH-DIP settings tried on dev", ""] + exploration_section(results_dir, counts, protocol) + [""]
    lines += ["## Commands", ""]
    lines += [f"- {what}: `{cmd}`" for what, cmd in COMMANDS]
    recorded = sorted({r.get("command") for r in records if r.get("command")})
    if recorded:
        lines += ["", "Commands recorded in the run JSONs:", ""] + [f"- `{c}`" for c in recorded]
    lines.append("")
    path = results_dir / "REPORT.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conll04.report", description=__doc__)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--lr-file", type=Path, default=LR_FILE)
    parser.add_argument("--quiet", action="store_true", help="do not print the table")
    args = parser.parse_args(argv)
    path = write_report(args.results_dir, args.lr_file)
    if not args.quiet:
        print(summary_table(load_results(args.results_dir)))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
