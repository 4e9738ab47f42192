"""Report of CoNLL'04 in the authors' regime: `python -m benchmarks.conll04.authors_report`.

Reads the run JSONs that `authors.py` writes into ``benchmarks/results/conll04/authors_regime/`` and writes
there ``REPORT.md`` (the setting, every run, mean ± std per method, FISH-DIP's F1 gaps with paired bootstrap
intervals, the paper's 1% figures, the dev rate selection, the smoothness of the per-sample losses and the
runs still missing) and ``figure4.png`` (the paper's Figure 4: each training sentence's loss over the steps,
one panel per method). Any subset of the grid's runs will do, a single run included.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks.conll04 import authors
from benchmarks.conll04.report import (FULL_TEST_SENTENCES, METHOD_LABELS, SentenceCounts, fmt_gap, fmt_mean_std,
                                       human_count, is_partial, load_results, load_runs, processor_labels)
from benchmarks.conll04.run import result_name
from benchmarks.conll04.significance import micro_f1, paired_bootstrap
from fishdip_peft.atomic import atomic_write

REFERENCE = "fishdip"
ORDER = tuple(authors.METHODS)
PAPER_FRACTION = 0.01
# Das et al. 2023, Table 5, CoNLL'04 at 1% of train with T5-large (entity F1, relation F1), as the README cites it.
PAPER = {"fishdip": ("FISH-DIP", 56.88, 21.63), "fixed-fish": ("fixed FISH mask", 37.08, 12.29),
         "full-ft": ("TANL full fine-tuning", 46.05, 14.13)}
REFRESH_WINDOW = 10  # steps after a mask refresh whose rises the smoothness section attributes to it
LOSS_FLOOR = 1e-6  # figure 4 draws smaller losses (the log rounds to 6 decimals) at this value
COMMAND = "python -m benchmarks.conll04.authors_report"


# -- runs ------------------------------------------------------------------------------------------------
def variant(record: dict) -> str:
    """The authors' regime name of a run (`authors.METHODS`): `fishdip-n15` records method `fishdip`."""
    return record.get("variant") or record["method"]


def label(name: str) -> str:
    method, overrides, _ = authors.METHODS.get(name, (name, {}, None))
    text = METHOD_LABELS.get(method, method)
    return f"{text}, n = {overrides['num_regressing']}" if "num_regressing" in overrides else text


def load(folder: Path) -> tuple[list[dict], int]:
    """The finished test runs of the newest protocol in `folder`, in grid order, and how many were left out."""
    rank = {name: i for i, name in enumerate(ORDER)}
    kept = sorted((r for r in load_results(folder) if not is_partial(r)),
                  key=lambda r: (r["train_fraction"], rank.get(variant(r), len(ORDER)), variant(r), r["seed"]))
    return kept, len(load_runs(folder)) - len(kept)


def by_method(records: list[dict]) -> dict[tuple[float, str], list[dict]]:
    groups: dict[tuple[float, str], list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["train_fraction"], variant(r))].append(r)
    return groups


def paired_with_fishdip(records: list[dict], fraction: float, name: str) -> list[tuple[int, dict, dict]]:
    """(seed, FISH-DIP's run, `name`'s run) for every seed both ran at `fraction`, seeds ascending."""
    ours = {r["seed"]: r for r in records if (r["train_fraction"], variant(r)) == (fraction, REFERENCE)}
    theirs = sorted((r for r in records if (r["train_fraction"], variant(r)) == (fraction, name)),
                    key=lambda r: r["seed"])
    return [(r["seed"], ours[r["seed"]], r) for r in theirs if r["seed"] in ours]


def missing_runs(records: list[dict]) -> list[str]:
    """The grid's result files (`authors.METHODS` x fractions x `authors.SEEDS`) not in `records`."""
    have = {(variant(r), r["train_fraction"], r["seed"]) for r in records}
    fractions = sorted(set(authors.FRACTIONS) | {f for _, f, _ in have})
    return [result_name(name, f, seed) for f in fractions for name in ORDER for seed in authors.SEEDS
            if (name, f, seed) not in have]


def mask_steps(record: dict) -> list[int]:
    return [e["step"] for e in record.get("train_log", []) if e.get("mask_changed")]


# -- smoothness -------------------------------------------------------------------------------------------
def analysis_end(record: dict) -> int:
    """Last step analysed: before the closing window of a run stopped early (its loss below the threshold)."""
    log = record.get("train_log") or []
    last = log[-1]["step"] if log else 0
    stop = record.get("stopped_early_at")
    if stop is None:
        return last
    window = record.get("hyperparameters", {}).get("early_stop", {}).get("for_steps", 20)
    return min(last, stop - window)


def smoothness(record: dict, last_step: int | None = None) -> dict:
    """Rises of each training sentence's loss between its consecutive measurements, up to `analysis_end`.

    For every sentence, its losses at the steps whose batch holds it (up to `last_step` too, if given) form
    a series; a pair is two consecutive values of a series and a rise a pair whose second value is larger.
    Returns steps (last step analysed), pairs, rises, rise_share (rises / pairs), mean_rise (mean increase
    over the rises) and after_refresh (share of the summed increase in pairs ending 1 to `REFRESH_WINDOW`
    steps after a mask refresh, the first mask not counted); each None where undefined.
    """
    end = analysis_end(record) if last_step is None else min(last_step, analysis_end(record))
    series: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for entry in record.get("train_log") or []:
        if entry["step"] <= end:
            for sample, loss in zip(entry["sample_ids"], entry["per_sample_losses"]):
                series[sample].append((entry["step"], loss))
    deltas = [(t, b - a) for points in series.values() for (_, a), (t, b) in zip(points, points[1:])]
    rises = [(t, d) for t, d in deltas if d > 0]
    refreshes = mask_steps(record)[1:]
    near = sum(d for t, d in rises if any(0 < t - r <= REFRESH_WINDOW for r in refreshes))
    total = sum(d for _, d in rises)
    return {"steps": end, "pairs": len(deltas), "rises": len(rises),
            "rise_share": len(rises) / len(deltas) if deltas else None,
            "mean_rise": total / len(rises) if rises else None,
            "after_refresh": near / total if refreshes and total > 0 else None}


def fmt_share(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def fmt_rise(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def mean_of(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


SMOOTHNESS_DEFINITION = (
    "For each training sentence, its per-sample losses (`train_log`: `per_sample_losses` by `sample_ids`) at the "
    "steps whose batch holds it form a series (at 1% every step holds all 9 sentences). A *pair* is two consecutive "
    "values of a series, a *rise* a pair whose second value is strictly larger (the log keeps 6 decimals, so a "
    "change under 1e-6 is no rise). **Rise share** = rises / pairs, "
    "pooled over the sentences; **mean rise** = the mean increase of the loss over the rises; **after refreshes** "
    f"= the share of the summed increase in pairs ending 1 to {REFRESH_WINDOW} steps after a mask refresh (the "
    "first mask not counted). Steps analysed: up to the early stop, without its closing window (the last "
    "`for_steps` = 20 steps, whose loss stayed below 1e-6); a run that did not stop early, all its steps. Runs "
    "that stop at different steps see different phases of training, so each is also measured over the first *W* "
    "steps, *W* the smallest number of steps analysed among the runs at that fraction. Lower is smoother.")


def smoothness_section(records: list[dict]) -> list[str]:
    """Definition, per-run values over each run's own steps and a common window, per-method means."""
    logged = [r for r in records if r.get("train_log")]
    if not logged:
        return ["No run with a training log yet."]
    common = {f: min(analysis_end(r) for r in logged if r["train_fraction"] == f)
              for f in {r["train_fraction"] for r in logged}}
    lines = [SMOOTHNESS_DEFINITION, "", "| train | method | seed | steps analysed | pairs | rise share | mean rise | "
             "after refreshes | W | rise share, first W | mean rise, first W |", "|" + " --- |" * 11]
    groups: dict[tuple[float, str], list[tuple[dict, dict]]] = defaultdict(list)
    for r in logged:
        own, window = smoothness(r), smoothness(r, common[r["train_fraction"]])
        groups[(r["train_fraction"], variant(r))].append((own, window))
        lines.append(f"| {100 * r['train_fraction']:g}% | {label(variant(r))} | {r['seed']} | {own['steps']} | "
                     f"{own['pairs']} | {fmt_share(own['rise_share'])} | {fmt_rise(own['mean_rise'])} | "
                     f"{fmt_share(own['after_refresh'])} | {window['steps']} | {fmt_share(window['rise_share'])} | "
                     f"{fmt_rise(window['mean_rise'])} |")
    lines += ["", "Per method, mean over its seeds:", "", "| train | method | seeds | rise share | mean rise | "
              "after refreshes | rise share, first W | mean rise, first W |", "|" + " --- |" * 8]
    means = {}
    for (fraction, name), runs in groups.items():
        m = means[(fraction, name)] = {f"{key}{tag}": mean_of([run[i][key] for run in runs])
                                       for i, tag in ((0, ""), (1, "_w")) for key in runs[0][0]}
        lines.append(f"| {100 * fraction:g}% | {label(name)} | {len(runs)} | {fmt_share(m['rise_share'])} | "
                     f"{fmt_rise(m['mean_rise'])} | {fmt_share(m['after_refresh'])} | {fmt_share(m['rise_share_w'])} "
                     f"| {fmt_rise(m['mean_rise_w'])} |")
    return (lines + [""] + smoothness_comparison(means, common, {k: len(v) for k, v in groups.items()})
            + shared_start_sentence(logged))


def smoothness_comparison(means: dict, common: dict, seeds: dict) -> list[str]:
    """Plain sentences: the methods ranked by rise share over the common window, FISH-DIP against the fixed mask."""
    lines = []
    for fraction in sorted(common):
        ranked = sorted((m["rise_share_w"], name) for (f, name), m in means.items()
                        if f == fraction and m["rise_share_w"] is not None)
        head = f"At {100 * fraction:g}%, over the first {common[fraction]} steps"
        if len(ranked) < 2:
            lines.append(f"At {100 * fraction:g}%, only {', '.join(label(n) for _, n in ranked) or 'no method'} has a "
                         "training log yet: nothing to compare.")
            continue
        lines.append(f"{head}, from smoothest to least smooth by rise share: "
                     + ", ".join(f"{label(n)} {fmt_share(v)}" for v, n in ranked) + ".")
        ours, fixed = means.get((fraction, REFERENCE)), means.get((fraction, "fixed-fish"))
        if ours and fixed:
            lines.append(f"{head}, FISH-DIP against the fixed mask (the paper's Figure 4 claim: FISH-DIP's per-sample "
                         f"losses are smoother): rise share {fmt_share(ours['rise_share_w'])} vs "
                         f"{fmt_share(fixed['rise_share_w'])}, mean rise {fmt_rise(ours['mean_rise_w'])} vs "
                         f"{fmt_rise(fixed['mean_rise_w'])} ({seeds[(fraction, REFERENCE)]} and "
                         f"{seeds[(fraction, 'fixed-fish')]} seed(s)); over all its steps analysed, "
                         f"{fmt_share(ours['after_refresh'])} of FISH-DIP's summed rise comes in the {REFRESH_WINDOW} "
                         "steps after a mask refresh.")
    return lines


def shared_start(a: dict, b: dict) -> int:
    """Last step up to which two runs logged the same samples with the same losses (0 if the first differs)."""
    last = 0
    for x, y in zip(a.get("train_log") or [], b.get("train_log") or []):
        if (x["step"], x["sample_ids"], x["per_sample_losses"]) != (y["step"], y["sample_ids"], y["per_sample_losses"]):
            break
        last = x["step"]
    return last


def shared_start_sentence(records: list[dict]) -> list[str]:
    """Where FISH-DIP and the fixed mask (same first mask, optimizer and seed) part, seed by seed."""
    logged = [r for r in records if r.get("train_log")]
    lines = []
    for fraction in sorted({r["train_fraction"] for r in logged}):
        pairs = paired_with_fishdip(logged, fraction, "fixed-fish")
        if not pairs:
            continue
        parts = [(seed, shared_start(ours, fixed), (mask_steps(ours)[1:] or [None])[0]) for seed, ours, fixed in pairs]
        text = "; ".join(f"seed {seed}: through step {same}, "
                         + (f"first refresh at step {refresh}" if refresh is not None else "no refresh")
                         for seed, same, refresh in parts)
        line = f"At {100 * fraction:g}%, FISH-DIP and the fixed mask log the same per-sample losses ({text})."
        if all(refresh is not None and same >= refresh for _, same, refresh in parts):
            line += (" Until its first refresh FISH-DIP is the fixed mask, so every difference between them follows "
                     "from the refreshes.")
        lines.append(line)
    return lines


# -- tables -----------------------------------------------------------------------------------------------
def run_table(records: list[dict]) -> list[str]:
    cpus = processor_labels(records)
    lines = ["| train | method | seed | entity F1 | relation F1 | steps run | masks | train | decode | cpu | threads "
             "| commit |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        steps = f"{r.get('steps_run', len(r.get('train_log') or []))} of {r['steps']}" + (
            " (early stop)" if r.get("stopped_early_at") is not None else "") + (
            f", resumed at {r['resumed_from_step']}" if r.get("resumed_from_step") is not None else "")
        masks, built = ("—" if r.get("mask_refreshes") is None else str(r["mask_refreshes"])), mask_steps(r)
        if built:
            masks += f" (steps {', '.join(map(str, built))})"
        lines.append(f"| {100 * r['train_fraction']:g}% | {label(variant(r))} | {r['seed']} | {r['entity_f1']:.2f} | "
                     f"{r['relation_f1']:.2f} | {steps} | {masks} | "
                     f"{r.get('train_seconds', 0) / 60:.0f} min | {r.get('eval_seconds', 0) / 60:.0f} min | "
                     f"{cpus[r.get('cpu') or '']} | {r.get('torch_threads', '—')} | {str(r.get('commit'))[:10]} |")
    legend = "; ".join(f"{tag} = {cpu or 'not recorded'}" for cpu, tag in cpus.items())
    return lines + ["", "Masks: masks built (the first one included) and the steps they were built at. Train and "
                        "decode: wall time of the training loop and of decoding the test set. cpu and threads "
                        f"(torch's): {legend}; both are those of the run's last stretch: a run resumed from its saved "
                        "state may have trained its earlier steps on another processor or thread count, which can "
                        "change rounding but not the procedure."]


def method_table(records: list[dict]) -> list[str]:
    lines = ["| train | method | seeds | entity F1 | relation F1 | steps run | train |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (fraction, name), runs in by_method(records).items():
        lines.append(f"| {100 * fraction:g}% | {label(name)} | {', '.join(str(r['seed']) for r in runs)} | "
                     f"{fmt_mean_std([r['entity_f1'] for r in runs], 2)} | "
                     f"{fmt_mean_std([r['relation_f1'] for r in runs], 2)} | "
                     f"{fmt_mean_std([r.get('steps_run', r['steps']) for r in runs], 0)} | "
                     f"{statistics.fmean(r.get('train_seconds', 0) for r in runs) / 60:.0f} min |")
    return lines


def verdict(gap: float, low: float, high: float) -> str:
    """FISH-DIP's standing from a gap's interval: better or worse only when the interval excludes 0."""
    return "better" if low > 0 else "worse" if high < 0 else "tied"


def fishdip_gaps(records: list[dict], counts: SentenceCounts) -> list[dict]:
    """FISH-DIP minus each other method at each fraction, over the seeds both have (grid order).

    Each entry: fraction, name, seeds, gaps (`paired_bootstrap`'s mean gap and 95% interval per kind) and
    per_seed (each seed's own entity and relation F1 gap).
    """
    scored = [r for r in records if counts(r) is not None]
    found = []
    for fraction, name in by_method(scored):  # grid order
        pairs = paired_with_fishdip(scored, fraction, name)
        if name == REFERENCE or not pairs:
            continue
        seeds = [seed for seed, _, _ in pairs]
        ours = [counts(a) for _, a, _ in pairs]
        theirs = [counts(b) for _, _, b in pairs]
        found.append({"fraction": fraction, "name": name, "seeds": seeds, "gaps": paired_bootstrap(ours, theirs),
                      "per_seed": [tuple(micro_f1(a.sum(0)) - micro_f1(b.sum(0))) for a, b in zip(ours, theirs)]})
    return found


def gap_section(gaps: list[dict]) -> list[str]:
    """FISH-DIP minus each other method: mean F1 gap over the seeds both have, paired bootstrap 95% interval."""
    if not gaps:
        return ["No FISH-DIP run and run of another method share a fraction and seed yet."]
    lines = ["FISH-DIP's F1 minus each other method's on the same test sentences, mean over the seeds both have, "
             f"with a 95% paired bootstrap interval over the {FULL_TEST_SENTENCES} test sentences (10,000 resamples, "
             "`benchmarks/conll04/significance.py`; each resample scores every seed on the same sentences). Bold: "
             "the interval excludes 0. The interval leaves out seed-to-seed variation; the per-seed gaps show it.", "",
             "| train | FISH-DIP minus | seeds used | entity F1 gap [95% CI] | relation F1 gap [95% CI] | "
             "per seed (entity / relation) | FISH-DIP is (entity / relation) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for g in gaps:
        per_seed = "; ".join(f"{seed}: {e:+.1f} / {r:+.1f}" for seed, (e, r) in zip(g["seeds"], g["per_seed"]))
        lines.append(f"| {100 * g['fraction']:g}% | {label(g['name'])} | {len(g['seeds'])} "
                     f"({', '.join(map(str, g['seeds']))}) | {fmt_gap(*g['gaps']['entity'])} | "
                     f"{fmt_gap(*g['gaps']['relation'])} | {per_seed} | "
                     f"{verdict(*g['gaps']['entity'])} / {verdict(*g['gaps']['relation'])} |")
    return lines


def answer_section(gaps: list[dict], missing: list[str]) -> list[str]:
    """The question in words: at the paper's fraction, is FISH-DIP better, tied or worse than each method?"""
    at_paper = {g["name"]: g for g in gaps if g["fraction"] == PAPER_FRACTION}
    lines = [f"Does FISH-DIP as the authors run it (n = 3) beat the other methods at {100 * PAPER_FRACTION:g}% of "
             "train on this model? Better or worse only where the 95% interval of the gap excludes 0; ties "
             "otherwise." + (f" Provisional: {len(missing)} run(s) of the grid are missing (below)." if missing
                             else " Every run of the grid is in."), ""]
    for name in ORDER:
        if name == REFERENCE:
            continue
        g = at_paper.get(name)
        if g is None:
            lines.append(f"- Against {label(name)}: no paired run yet.")
            continue
        entity, relation = g["gaps"]["entity"], g["gaps"]["relation"]
        ahead = [sum(gap[k] > 0 for gap in g["per_seed"]) for k in (0, 1)]
        lines.append(f"- Against {label(name)}: **{verdict(*entity)}** on entity F1 ({fmt_gap(*entity)}) and "
                     f"**{verdict(*relation)}** on relation F1 ({fmt_gap(*relation)}). Seeds where FISH-DIP is ahead: "
                     f"{ahead[0]} of {len(g['seeds'])} on entity F1, {ahead[1]} on relation F1 (seeds run: "
                     f"{', '.join(map(str, g['seeds']))}).")
    return lines


def paper_section(records: list[dict]) -> list[str]:
    groups = by_method(records)
    lines = [f"At {100 * PAPER_FRACTION:g}% of train. Paper: Das et al. 2023, Table 5, T5-large, 3 seeds; here: the "
             "default model, mean ± std over the seeds run.", "",
             "| method | paper entity / relation F1 | here entity F1 | here relation F1 | seeds here |",
             "| --- | --- | --- | --- | --- |"]
    for name in ORDER:
        source = PAPER.get(REFERENCE if name == "fishdip-n15" else name)
        paper = f"{source[1]:.2f} / {source[2]:.2f} ({source[0]})" if source else "—"
        runs = groups.get((PAPER_FRACTION, name), [])
        here = [fmt_mean_std([r[f"{kind}_f1"] for r in runs], 2) if runs else "not run yet"
                for kind in ("entity", "relation")]
        lines.append(f"| {label(name)} | {paper} | {here[0]} | {here[1]} | {len(runs)} |")
    return lines + ["", "The paper's text sets n = 15 and its released script n = 3 (`fishdip` here); its FISH-DIP "
                        "figure is set beside both. It quotes no LoRA figure at 1%."]


def lr_section(folder: Path) -> list[str]:
    path = folder / authors.LR_FILE_NAME
    if not path.is_file():
        lines = [f"Not selected yet (`{authors.LR_FILE_NAME}` is missing; `python -m benchmarks.conll04.authors "
                 "--select-lr`): LoRA and full fine-tuning wait for it."]
        rank = {name: i for i, name in enumerate(ORDER)}
        finished = sorted((json.loads(f.read_text(encoding="utf-8")) for f in (folder / "lr_selection").glob("*.json")),
                          key=lambda r: (rank.get(variant(r), len(ORDER)), r["learning_rate"]))
        if finished:
            lines += ["", "Proxy runs finished so far (dev entity / relation F1):", ""] + [
                f"- {label(variant(r))}, rate {r['learning_rate']:g}: {r['entity_f1']:.1f} / {r['relation_f1']:.1f} "
                f"({r.get('steps_run', r['steps'])} steps)" for r in finished]
        return lines
    selection = json.loads(path.read_text(encoding="utf-8"))
    s = selection.get("setting", {})
    lines = [f"{s.get('optimizer', 'AdamW')}, {100 * s.get('train_fraction', 0.01):g}% of train, seed "
             f"{s.get('seed')}, {s.get('steps')} steps, {s.get('eval_limit')} {s.get('eval_split', 'dev')} sentences; "
             f"criterion: {s.get('criterion', '?')}. The test set is never used for it.", "",
             "| method | dev entity / relation F1 per rate | selected |", "| --- | --- | --- |"]
    for name, entry in selection.get("methods", {}).items():
        scores = "; ".join(f"{lr}: {v['entity_f1']:.1f} / {v['relation_f1']:.1f}"
                           for lr, v in entry.get("dev_scores", {}).items())
        chosen = entry.get("selected")
        edge = " (an end of the grid)" if entry.get("at_grid_end") else ""
        shown = "incomplete" if chosen is None else f"{chosen:g}{edge}"
        lines.append(f"| {label(name)} | {scores} | {shown} |")
    return lines


def setting_lines(records: list[dict]) -> list[str]:
    """The regime as the run JSONs record it."""
    r = records[0]
    hp = r.get("hyperparameters", {})
    stop = hp.get("early_stop") or {}
    budgets = sorted({(x["train_fraction"], x["train_sentences"], x["steps"]) for x in records})
    lines = [f"- Model: {r.get('model')} ({human_count(r.get('total_params'))} parameters, {hp.get('dtype')}).",
             "- Data: CoNLL'04 in the TANL format; " + ", ".join(f"{100 * f:g}% of train = {n} sentences, {s} steps"
                                                                 for f, n, s in budgets)
             + f"; scored on the {r.get('eval_sentences')} test sentences.",
             f"- Training: batch {r.get('batch_size')} (capped at the training set), {hp.get('lr_schedule')} decay of "
             f"the rate, gradient clipping {hp.get('max_grad_norm')}, early stop once the loss stayed below "
             f"{stop.get('loss_below')} for {stop.get('for_steps')} steps."]
    for name in dict.fromkeys(variant(x) for x in records):
        x = next(y for y in records if variant(y) == name)
        h, m = x.get("hyperparameters", {}), x.get("hyperparameters", {}).get("method", {})
        fish = "" if "num_regressing" not in m else (
            f"; n = {m['num_regressing']}" + (f", m = {m['update_every']}" if m.get("dynamic") else ", mask built once")
            + f", Fisher samples: {h.get('fisher_samples')}")
        lines.append(f"- {label(name)}: {x.get('method_description')}; {h.get('optimizer')}, rate "
                     f"{x.get('learning_rate'):g} ({x.get('learning_rate_source')}){fish}.")
    versions = r.get("versions", {})
    lines += [f"- Decoding: {hp.get('decoding')}, batches of {hp.get('eval_batch_size')}.",
              f"- Software: torch {versions.get('torch')}, transformers {versions.get('transformers')}, peft "
              f"{versions.get('peft')}; commits {', '.join(sorted({str(x.get('commit'))[:10] for x in records}))}."]
    return lines


# -- figure 4 ----------------------------------------------------------------------------------------------
def figure_runs(records: list[dict]) -> tuple[float | None, list[dict]]:
    """One run per method (seed 0, else its smallest seed) at 1% of train, else at the smallest fraction logged."""
    logged = [r for r in records if r.get("train_log")]
    if not logged:
        return None, []
    fractions = {r["train_fraction"] for r in logged}
    fraction = PAPER_FRACTION if PAPER_FRACTION in fractions else min(fractions)
    chosen = {}
    for r in logged:  # grid order: the smallest seed comes first
        if r["train_fraction"] == fraction:
            chosen.setdefault(variant(r), r)
    return fraction, list(chosen.values())


def figure4(records: list[dict], path: Path) -> Path | None:
    """Each training sentence's loss over the steps, one panel per method (FISH-DIP and fixed mask first)."""
    fraction, runs = figure_runs(records)
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(2, len(runs))
    rows = math.ceil(len(runs) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.4 * columns, 3.9 * rows), sharey=True, squeeze=False)
    samples = sorted({s for r in runs for e in r["train_log"] for s in e["sample_ids"]})
    colors = plt.get_cmap("tab10" if len(samples) <= 10 else "viridis", max(len(samples), 1))
    for ax, r in zip(axes.flat, runs):
        series: dict[int, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
        for e in r["train_log"]:
            for sample, loss in zip(e["sample_ids"], e["per_sample_losses"]):
                series[sample][0].append(e["step"])
                series[sample][1].append(max(loss, LOSS_FLOOR))
        for sample in sorted(series):
            ax.plot(*series[sample], color=colors(samples.index(sample)), linewidth=0.9, label=f"sentence {sample}")
        for step in mask_steps(r)[1:]:
            ax.axvline(step, color="black", alpha=0.25, linewidth=1)
        if r.get("stopped_early_at") is not None:
            ax.axvline(analysis_end(r), color="grey", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"{label(variant(r))}, seed {r['seed']}: F1 {r['entity_f1']:.1f} / {r['relation_f1']:.1f}",
                     fontsize=10)
        ax.set(xlabel="optimizer step", ylabel="per-sample training loss")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(runs):]:
        ax.remove()
    axes[0, 0].legend(fontsize=7, ncol=2 if len(samples) > 5 else 1)
    fig.suptitle(f"Per-sample training loss, {100 * fraction:g}% of CoNLL'04 train\n(solid vertical: mask refresh; "
                 f"dashed: start of the early-stop window; losses below {LOSS_FLOOR:g} drawn at it)", fontsize=9)
    fig.tight_layout()
    atomic_write(str(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


# -- report ------------------------------------------------------------------------------------------------
def write_report(folder: str | Path = authors.RESULTS) -> Path:
    """Write REPORT.md and figure4.png into `folder`; returns the report's path."""
    folder = Path(folder)
    records, left_out = load(folder)
    missing = missing_runs(records)
    fig = figure4(records, folder / "figure4.png")
    lines = ["# CoNLL'04 in the FISH-DIP authors' regime", "",
             f"Generated by `{COMMAND}` from the {len(records)} run JSON{'s' if len(records) != 1 else ''} in this "
             "folder (written by `python -m benchmarks.conll04.authors --grid`). Scores: micro F1 in percent on the "
             "CoNLL'04 test set; ± is the sample standard deviation over seeds (none for one seed)."
             + (f" {left_out} run(s) of an earlier procedure or scored on part of the test set are left out."
                if left_out else ""), ""]
    gaps = fishdip_gaps(records, SentenceCounts())
    if records:
        lines += ["## Answer", ""] + answer_section(gaps, missing) + [""]
    lines += ["## Runs still missing", "",
              (f"{len(missing)} run(s) of the grid have not finished: " + ", ".join(f"`{m}`" for m in missing)
               + ". Every figure below covers only the runs listed under Runs." if missing
               else "None: every run of the grid is in."), ""]
    if not records:
        lines += ["No run has finished yet.", ""]
    else:
        lines += ["## Setting", ""] + setting_lines(records) + [""]
        lines += ["## Runs", ""] + run_table(records) + [""]
        lines += ["## Per method", ""] + method_table(records) + [""]
        lines += ["## FISH-DIP against each other method", ""] + gap_section(gaps) + [""]
        lines += ["## Against the paper", ""] + paper_section(records) + [""]
        lines += ["## Smoothness of the per-sample losses", ""] + smoothness_section(records) + [""]
    lines += ["## Figure 4", ""]
    if fig:
        fraction, shown = figure_runs(records)
        lines += ["![Figure 4](figure4.png)", "",
                  f"Each training sentence's loss over the optimizer steps at {100 * fraction:g}% of train, one panel "
                  "per method (seed 0, else the smallest seed run): " + ", ".join(label(variant(r)) for r in shown)
                  + ". Log scale; losses below the log's precision (1e-6) are drawn at 1e-6. Solid vertical lines: "
                  "mask refreshes after the first mask; dashed: the start of the early-stop window (not analysed "
                  "for smoothness).", ""]
    else:
        lines += ["No run with a training log yet.", ""]
    lines += ["## Learning rates of LoRA and full fine-tuning (dev)", ""] + lr_section(folder) + [""]
    lines += ["## Commands", "", "- the grid: `python -m benchmarks.conll04.authors --grid --commit`",
              f"- this report: `{COMMAND}`"]
    checkout = str(Path(__file__).resolve().parents[2]) + "/"  # paths inside the checkout are shown relative to it
    recorded = sorted({r["command"].replace(checkout, "") for r in records if r.get("command")})
    if recorded:
        lines += ["", "Commands recorded in the run JSONs:", ""] + [f"- `{c}`" for c in recorded]
    path = folder / "REPORT.md"
    text = "\n".join(lines) + "\n"
    atomic_write(str(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=authors.RESULTS)
    args = parser.parse_args(argv)
    records, _ = load(args.results_dir)
    path = write_report(args.results_dir)
    print("\n".join(method_table(records)))
    for r in records:
        s = smoothness(r)
        print(f"{variant(r)} seed {r['seed']}: rise share {fmt_share(s['rise_share'])}, mean rise "
              f"{fmt_rise(s['mean_rise'])} over {s['steps']} steps")
    print(f"missing: {len(missing_runs(records))} run(s); wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
