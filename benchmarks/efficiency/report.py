"""The efficiency benchmark's figures from its rows (ratios, targets, refresh scaling) and its report:
`python -m benchmarks.efficiency --report-only` turns `benchmarks/results/efficiency.json` into
`EFFICIENCY.md` (hand-written notes below `NOTES_MARKER` survive).

Rows of methods that are no longer in the registry (`benchmarks.methods`) are kept, marked †, as the
history the notes refer to; the ratios are those stored in the JSON.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any, Optional

from benchmarks.methods import METHODS, REFERENCE

NOTES_MARKER = "<!-- notes: kept by --report-only -->"
FISH, FULL, LORA, DENSE = REFERENCE, "full-ft", "lora", "dense-mask"
# figure of a row: a field of the row, or one derived from it
FIGURES = {
    "net_memory": lambda r: r["peak_memory_bytes"] - r["rss_after_import_bytes"] if "peak_memory_bytes" in r else None,
    "refresh_seconds_min": lambda r: min(r["refresh_seconds_all"]) if r.get("refresh_seconds_all") else None,
}
# key -> (method, figure) over (method, figure), or (method, figure) alone for a value that is no ratio
RATIOS: dict[str, tuple] = {
    "step_fishdip_over_full_ft": ((FISH, "step_seconds"), (FULL, "step_seconds")),
    "step_fishdip_over_lora": ((FISH, "step_seconds"), (LORA, "step_seconds")),
    "step_dense_mask_over_full_ft": ((DENSE, "step_seconds"), (FULL, "step_seconds")),
    "step_cpu_fishdip_over_full_ft": ((FISH, "step_cpu_seconds"), (FULL, "step_cpu_seconds")),
    "step_min_fishdip_over_full_ft": ((FISH, "step_seconds_min"), (FULL, "step_seconds_min")),
    "step_cpu_fishdip_over_lora": ((FISH, "step_cpu_seconds"), (LORA, "step_cpu_seconds")),
    "step_min_fishdip_over_lora": ((FISH, "step_seconds_min"), (LORA, "step_seconds_min")),
    "memory_fishdip_over_full_ft": ((FISH, "peak_memory_bytes"), (FULL, "peak_memory_bytes")),
    "memory_fishdip_over_lora": ((FISH, "peak_memory_bytes"), (LORA, "peak_memory_bytes")),
    "memory_dense_mask_over_full_ft": ((DENSE, "peak_memory_bytes"), (FULL, "peak_memory_bytes")),
    "memory_fishdip_over_dense_mask": ((FISH, "peak_memory_bytes"), (DENSE, "peak_memory_bytes")),
    "net_memory_fishdip_over_full_ft": ((FISH, "net_memory"), (FULL, "net_memory")),
    "net_memory_fishdip_over_lora": ((FISH, "net_memory"), (LORA, "net_memory")),
    "refresh_over_step_fishdip": ((FISH, "refresh_seconds"), (FISH, "step_seconds")),
    "refresh_cpu_over_step_cpu_fishdip": ((FISH, "refresh_cpu_seconds"), (FISH, "step_cpu_seconds")),
    "refresh_min_over_step_min_fishdip": ((FISH, "refresh_seconds_min"), (FISH, "step_seconds_min")),
    "refresh_over_step_dense_mask": ((DENSE, "refresh_seconds"), (DENSE, "step_seconds")),
    "refresh_fishdip_over_dense_mask": ((FISH, "refresh_seconds"), (DENSE, "refresh_seconds")),
    "refresh_memory_fishdip_over_full_ft_step": ((FISH, "refresh_peak_memory_bytes"), (FULL, "peak_memory_bytes")),
    "checkpoint_bytes_per_changed_entry_fishdip": ((FISH, "bytes_per_changed_entry"),),
    "checkpoint_fishdip_over_lora": ((FISH, "checkpoint_bytes"), (LORA, "checkpoint_bytes")),
    "checkpoint_fishdip_over_full_ft": ((FISH, "checkpoint_bytes"), (FULL, "checkpoint_bytes")),
    "persistent_state_bytes_per_entry_fishdip": ((FISH, "persistent_state_bytes_per_entry"),),
}
TARGETS = (  # (name, ratio key, limit, the same ratio from CPU time and from the fastest step) for FISH-DIP
    ("step time <= 0.9x LoRA", "step_fishdip_over_lora", 0.9, "step_cpu_fishdip_over_lora",
     "step_min_fishdip_over_lora"),
    ("step time <= 0.7x full fine-tuning", "step_fishdip_over_full_ft", 0.7, "step_cpu_fishdip_over_full_ft",
     "step_min_fishdip_over_full_ft"),
    ("peak memory <= 0.8x LoRA", "memory_fishdip_over_lora", 0.8, None, None),
    ("one refresh (n=15) <= 2x one training step", "refresh_over_step_fishdip", 2.0,
     "refresh_cpu_over_step_cpu_fishdip", "refresh_min_over_step_min_fishdip"),
    ("one refresh (n=15) with fisher_dtype=bfloat16 <= 2x one training step",
     "refresh_one_pass_per_sample_bf16_over_step_fishdip", 2.0,
     "refresh_cpu_one_pass_per_sample_bf16_over_step_cpu_fishdip", None),
    ("checkpoint <= 8.5 bytes per changed entry", "checkpoint_bytes_per_changed_entry_fishdip", 8.5, None, None),
    ("persistent state <= 24 bytes per trainable entry (+ fixed per tensor)",
     "persistent_state_bytes_per_entry_fishdip", 24.0, None, None),
)


# -- figures from the rows --------------------------------------------------------------------------
def find_row(rows, size, method) -> Optional[dict]:
    return next((r for r in rows if r.get("model") == size and r.get("method") == method and "error" not in r), None)


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def compute_ratios(rows: list[dict], variant_rows: list[dict] = ()) -> dict[str, dict[str, Optional[float]]]:
    """The `RATIOS` of each model size (only from figures of this run; None where a row is missing) and,
    with refresh-variant rows, each variant's median refresh (wall and CPU) over FISH-DIP's step."""
    def figure(size, method, name):
        row = find_row(rows, size, method)
        return None if row is None else FIGURES[name](row) if name in FIGURES else row.get(name)

    out = {size: {key: ratio(figure(size, *parts[0]), figure(size, *parts[1])) if len(parts) == 2
                  else figure(size, *parts[0]) for key, parts in RATIOS.items()}
           for size in dict.fromkeys(r["model"] for r in rows)}
    for size, found in out.items():
        for variant in dict.fromkeys(r["variant"] for r in variant_rows):
            mine = [r for r in variant_rows if r["model"] == size and r["variant"] == variant]
            name = variant.replace("-", "_")
            for key, field, step in ((f"refresh_{name}_over_step_fishdip", "refresh_seconds", "step_seconds"),
                                     (f"refresh_cpu_{name}_over_step_cpu_fishdip", "refresh_cpu_seconds",
                                      "step_cpu_seconds")):
                refresh = statistics.median(r[field] for r in mine) if mine else None
                found[key] = ratio(refresh, figure(size, FISH, step))
    return out


def compute_targets(ratios: dict, target_model: str) -> list[dict]:
    found = ratios.get(target_model, {})
    out = []
    for name, key, limit, cpu_key, min_key in TARGETS:
        value = found.get(key)
        out.append({"target": name, "model": target_model, "ratio": key, "value": value, "limit": limit,
                    "met": None if value is None else bool(value <= limit),
                    "value_cpu_time": found.get(cpu_key) if cpu_key else None,
                    "value_fastest": found.get(min_key) if min_key else None})
    return out


def fit_line(points: list[tuple[float, float]]) -> Optional[dict]:
    if len(points) < 2:
        return None
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return {"fixed_seconds": my - slope * mx, "seconds_per_sample": slope}


def compute_scaling(rows: list[dict], scaling_rows: list[dict]) -> dict[str, Any]:
    by_size = []
    for size in dict.fromkeys(r["model"] for r in rows):
        fish = find_row(rows, size, REFERENCE)
        if fish and "refresh_seconds" in fish:
            by_size.append({
                "model": size, "params_total": fish["params_total"], "n": fish["refresh_n"],
                "refresh_seconds": fish["refresh_seconds"], "step_seconds": fish["step_seconds"],
                "refresh_over_step": ratio(fish["refresh_seconds"], fish["step_seconds"]),
                "refresh_peak_memory_bytes": fish["refresh_peak_memory_bytes"],
            })
    fits = {size: fit_line([(r["n"], r["refresh_seconds"]) for r in scaling_rows if r["model"] == size])
            for size in dict.fromkeys(r["model"] for r in scaling_rows)}
    return {"refresh_vs_n": scaling_rows, "refresh_vs_n_fit": fits, "refresh_vs_model_size": by_size}


# -- the markdown report ------------------------------------------------------------------------------
def mib(x) -> str:
    return "–" if x is None else f"{x / 2**20:,.0f}"


def num(x, digits=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return f"{x:,}"


def table(title: str, columns: tuple[str, ...], rows: list[tuple], left: int = 1) -> list[str]:
    """A section: its heading, then a table whose first `left` columns are left-aligned, the others right-aligned."""
    return (["", f"## {title}", "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * left + "---:|" * (len(columns) - left)]
            + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def method_cell(name: str) -> str:
    return name if name in METHODS else f"{name} †"


def render_methods(data: dict) -> list[str]:
    s, env = data["settings"], data["environment"]
    lines = [
        f"Setting: batch {s['batch_size']} x {s['seq_len']} tokens, {s['dtype']} weights on {s['device']}, "
        f"{s['warmup_steps']} warm-up + {s['timed_steps']} timed steps (median), density {s['density']}, "
        f"n = {s['num_regressing']}, {s['optimizer']}; LoRA r={s['lora']['r']} (alpha {s['lora']['lora_alpha']}, "
        f"dropout {s['lora']['lora_dropout']}) on all linear layers. "
        f"Environment: torch {env['torch']}, {s.get('threads') or env['torch_threads']} torch thread(s) per worker, "
        f"{env['cpu']} ({env['cpu_count']} cores), load average {env.get('loadavg_start')} at start, "
        f"{env.get('loadavg_end')} at the end (1/5/15 min). Step and refresh times are wall-clock medians; "
        "*CPU s* is the process CPU time of the same steps, which other processes' load inflates less.",
        "",
        "Memory is the peak RSS of the measurement window (it includes ~"
        f"{mib(statistics.median([r.get('rss_after_import_bytes', 0) for r in data['methods']] or [0]))}"
        " MiB of Python/torch libraries, column *import*); *refresh peak* is the peak of a mask refresh "
        "with the training state alive. Checkpoint bytes are the weight files' size.",
        "",
        "| model | method | params | trainable | step s | step CPU s | peak MiB | import MiB | refresh s (n) "
        "| refresh CPU s | refresh peak MiB | ckpt MiB | changed entries | B/changed | save s | load s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["methods"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {method_cell(r['method'])} | error: "
                         f"{r['error'].strip().splitlines()[-1][:80]} |" + " |" * 13)
            continue
        refresh = f"{num(r['refresh_seconds'], 2)} ({r['refresh_n']})" if "refresh_seconds" in r else "–"
        lines.append(
            f"| {r['model']} | {method_cell(r['method'])} | {r['params_total'] / 1e6:.1f}M "
            f"| {num(r['trainable_entries'])} "
            f"| {num(r['step_seconds'], 3)} | {num(r.get('step_cpu_seconds'), 3)} | {mib(r['peak_memory_bytes'])} "
            f"| {mib(r['rss_after_import_bytes'])} | {refresh} | {num(r.get('refresh_cpu_seconds'), 2)} "
            f"| {mib(r.get('refresh_peak_memory_bytes'))} | {r['checkpoint_bytes'] / 2**20:,.2f} "
            f"| {num(r['changed_entries'])} | {num(r['bytes_per_changed_entry'], 2)} | {num(r['save_seconds'], 2)} "
            f"| {num(r['load_seconds'], 2)} |"
        )
    return lines


def render_sections(data: dict) -> list[str]:
    s = data["settings"]
    lines = ["", f"## Targets (FISH-DIP on `{s['target_model']}`)", "",
             "*value*: from the wall-clock medians (the figure judged); *CPU*: from CPU-time medians; *fastest*: "
             "from the fastest step and refresh. The bfloat16 refresh is the `one-pass-per-sample-bf16` refresh variant's (below) "
             "over the training step.", "",
             "| target | value | met | CPU | fastest |", "|---|---:|---|---:|---:|"]
    for t in data["targets"]:
        met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {num(t['value'], 3)} | {met} | {num(t.get('value_cpu_time'), 3)} "
                     f"| {num(t.get('value_fastest'), 3)} |")
    lines += ["", "## Ratios (within this run)", ""]
    sizes = list(data["ratios"])
    if sizes:
        lines += ["| ratio | " + " | ".join(sizes) + " |", "|---|" + "---:|" * len(sizes)]
        for key in data["ratios"][sizes[0]]:
            lines.append(f"| {key} | " + " | ".join(num(data["ratios"][z].get(key), 3) for z in sizes) + " |")
    scaling = data.get("scaling", {})
    if scaling.get("refresh_vs_n"):
        lines += table("Refresh time vs n (FISH-DIP, update_every=1, median of repeats)",
                       ("model", "params", "n", "refresh s", "first mask s", "refresh peak MiB"),
                       [(r["model"], f"{r['params_total'] / 1e6:.1f}M", r["n"], num(r["refresh_seconds"], 2),
                         num(r["first_mask_seconds"], 2), mib(r["refresh_peak_memory_bytes"]))
                        for r in scaling["refresh_vs_n"]])
        fits = [(z, f) for z, f in scaling.get("refresh_vs_n_fit", {}).items() if f]
        if fits:
            lines += ["", "Least-squares fit refresh = fixed + per_sample · n: " + "; ".join(
                f"{z}: {f['fixed_seconds']:.2f} s + {f['seconds_per_sample']:.3f} s/sample" for z, f in fits) + "."]
    if scaling.get("refresh_vs_model_size"):
        lines += table("Refresh time vs model size (FISH-DIP, n = 15, with training state)",
                       ("model", "params", "refresh s", "step s", "refresh / step"),
                       [(r["model"], f"{r['params_total'] / 1e6:.1f}M", num(r["refresh_seconds"], 2),
                         num(r["step_seconds"], 3), num(r["refresh_over_step"], 2))
                        for r in scaling["refresh_vs_model_size"]])
    return lines


def render_variants(data: dict) -> list[str]:
    lines = []
    for name, variant in data.get("variants", {}).items():
        vs = variant["settings"]
        lines += ["", f"## Variant `{name}`: batch {vs['batch_size']} x {vs['seq_len']}, {vs['dtype']}, gradient "
                  f"checkpointing {'on' if vs.get('gradient_checkpointing') else 'off'}", "",
                  f"Command: `{variant['command']}`", "",
                  "| model | method | step s | step CPU s | peak MiB | window start MiB |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in variant["methods"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {method_cell(r['method'])} | error | | | |")
                continue
            lines.append(f"| {r['model']} | {method_cell(r['method'])} | {num(r['step_seconds'], 3)} "
                         f"| {num(r['step_cpu_seconds'], 3)} | {mib(r['peak_memory_bytes'])} "
                         f"| {mib(r['memory_at_window_start_bytes'])} |")
        lines += ["", "| target (this variant) | value | met |", "|---|---:|---|"]
        for t in variant["targets"]:
            if t["value"] is not None:
                lines.append(f"| {t['target']} | {num(t['value'], 3)} | {'yes' if t['met'] else '**no**'} |")
    return lines


def render_persistent_state(data: dict) -> list[str]:
    rows = [r for r in data["methods"] if "persistent_state_bytes" in r]
    if not rows:
        return []
    parts = list(rows[0]["persistent_state_breakdown_bytes"])
    return table("FISH-DIP persistent state (its own tensors kept between steps; MiB unless marked)",
                 ("model", "method", "K", "slots", "B / K (no fixed)", "fixed B", "total") + tuple(parts),
                 [(r["model"], method_cell(r["method"]), num(r["trainable_entries"]), r["persistent_state_slots"],
                   num(r["persistent_state_bytes_per_entry"], 2), num(r.get("persistent_state_fixed_bytes")),
                   f"{r['persistent_state_bytes'] / 2**20:,.2f}",
                   *(f"{r['persistent_state_breakdown_bytes'][p] / 2**20:,.2f}" for p in parts)) for r in rows],
                 left=2)


def render_refresh_variants(data: dict) -> list[str]:
    section = data.get("refresh_variants", {})
    if not section.get("rows"):
        return ["", "The refresh prototypes measured earlier (`prototypes` in the JSON) are superseded by the "
                "refresh variants of the core (`--refresh-variants-only`)."] if data.get("prototypes") else []
    groups: dict[tuple, list[dict]] = {}
    for r in section["rows"]:
        groups.setdefault((r["model"], r["n"], r["variant"]), []).append(r)
    rows = []
    for (model, n, variant), rs in groups.items():
        def med(key):
            return f"{statistics.median(r[key] for r in rs):.2f}"

        overlap = min(r["selection_overlap_with_reference"] for r in rs)
        rows.append((model, n, variant, med("refresh_seconds"), med("refresh_cpu_seconds"), med("fisher_seconds"),
                     med("topk_seconds"), med("other_seconds"), f"{overlap:.2%}"))
    reference = section["rows"][0]["variant"]
    return table("Refresh variants (the core's refresh, same pooled samples, update_every=1; median of repeats)",
                 ("model", "n", "variant", "refresh s", "refresh CPU s", "Fisher s", "top-K s", "other s",
                  f"same selection as {reference}"), rows, left=3) + [
        "", f"Command: `{section['command']}`. *{reference}*: the core's default (`fisher_batch_size=1`, float32); "
        "*batched*: `FishDipConfig(fisher_batch_size=15)`; *-bf16*: with `fisher_dtype=\"bfloat16\"`. "
        "The selection column is the smallest share over the repeats of the K selected entries that the "
        f"{reference} selection also holds."]


def render_seq_lens(data: dict) -> list[str]:
    section = data.get("seq_lens", {})
    if not section.get("rows"):
        return []
    rows = []
    for r in section["rows"]:
        if "error" in r:
            rows.append((r.get("seq_len"), r["model"], method_cell(r["method"]), "error") + ("",) * 6)
            continue
        same_length = [x for x in section["rows"] if x.get("seq_len") == r["seq_len"]]
        lora, full = (find_row(same_length, r["model"], m) for m in (LORA, FULL))

        def over(other, key):
            return num(ratio(r[key], other[key]) if other else None, 2)

        rows.append((r["seq_len"], r["model"], method_cell(r["method"]), num(r["step_seconds"], 3),
                     num(r["step_cpu_seconds"], 3), mib(r["peak_memory_bytes"]), over(lora, "step_seconds"),
                     over(full, "step_seconds"), over(lora, "peak_memory_bytes"), over(full, "peak_memory_bytes")))
    s = section["settings"]
    return table(f"Step cost vs sequence length (batch {s['batch_size']}, {s['dtype']}; ratios of this method "
                 "to LoRA and to full fine-tuning at the same length)",
                 ("seq len", "model", "method", "step s", "step CPU s", "peak MiB", "step / LoRA", "step / full FT",
                  "peak / LoRA", "peak / full FT"), rows, left=3) + ["", f"Command: `{section['command']}`"]


def render_report(data: dict, notes: str = "") -> str:
    lines = [
        "# Efficiency: FISH-DIP vs full fine-tuning, LoRA and the original dense-mask code",
        "",
        "Generated by `python -m benchmarks.efficiency --report-only` from `benchmarks/results/efficiency.json`"
        + ("" if data.get("complete") else " (**partial run**)") + ".",
        "",
        f"Command: `{data['command']}`",
        "",
    ]
    lines += render_methods(data)
    every_row = data["methods"] + [r for v in data.get("variants", {}).values() for r in v["methods"]]
    removed = sorted({r["method"] for r in every_row if r["method"] not in METHODS})
    if removed:
        lines += ["", f"† no longer a method of the benchmark (not in the registry `benchmarks/methods.py`): "
                  f"{', '.join(removed)}. Their rows, ratios and variant rows are kept as measured, as the "
                  "history the notes below refer to."]
    lines += (render_sections(data) + render_persistent_state(data) + render_refresh_variants(data)
              + render_seq_lens(data) + render_variants(data))
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


def write_report(json_path: Path, md_path: Path) -> str:
    data = json.loads(Path(json_path).read_text())
    notes = ""
    if md_path.exists():  # hand-written analysis below the marker survives regeneration
        old = md_path.read_text()
        if NOTES_MARKER in old:
            notes = NOTES_MARKER + old.split(NOTES_MARKER, 1)[1]
    text = render_report(data, notes)
    tmp = md_path.with_name(f".{md_path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, md_path)
    return text
