"""Report of the CoNLL'04 authors' regime (benchmarks/conll04/authors_report.py) on small synthetic runs."""

import json

import numpy as np
import pytest

from benchmarks.conll04 import authors_report as ar


def step(number: int, losses: dict[int, float], mask_changed: bool = False) -> dict:
    return {"step": number, "loss": sum(losses.values()) / len(losses), "sample_ids": list(losses),
            "per_sample_losses": list(losses.values()), "grad_norm": 1.0, "seconds": 1.0, "mask_changed": mask_changed}


# Sentence 0 at every step: 4 -> 2 -> 3 -> 1 (one rise, of 1.0); sentence 1 misses step 2: 1 -> 1.5 -> 1.5 (one rise,
# of 0.5). Steps 5 and 6 are the early-stop window (for_steps = 2) and their rise must not count.
LOG = [step(1, {0: 4.0, 1: 1.0}, True), step(2, {0: 2.0}), step(3, {0: 3.0, 1: 1.5}), step(4, {0: 1.0, 1: 1.5}),
       step(5, {0: 0.0, 1: 0.0}), step(6, {0: 0.5, 1: 0.0})]


def run(variant: str, seed: int, **fields) -> dict:
    method = ar.authors.METHODS[variant][0]
    record = {
        "method": method, "variant": variant, "regime": "authors", "train_fraction": 0.01, "seed": seed,
        "entity_f1": 30.0, "relation_f1": 5.0, "protocol": 4, "eval_split": "test", "eval_limit": None,
        "eval_sentences": 288, "eval_max_new_tokens": None, "steps": 1000, "steps_run": len(LOG),
        "stopped_early_at": 6, "train_log": LOG, "train_seconds": 600.0, "eval_seconds": 120.0, "cpu": "test cpu",
        "commit": "0123456789abcdef", "model": "tiny", "total_params": 1000, "train_sentences": 2, "batch_size": 32,
        "learning_rate": 0.01, "learning_rate_source": "the authors' rate", "method_description": "synthetic",
        "mask_refreshes": 1, "predictions": None, "command": "python -m benchmarks.conll04.authors --grid",
        "hyperparameters": {"method": {"update_every": 100, "num_regressing": 3}, "optimizer": "adafactor",
                            "lr_schedule": "linear", "max_grad_norm": 1.0, "early_stop": {"loss_below": 1e-6,
                                                                                          "for_steps": 2}},
    }
    return {**record, **fields}


def write(folder, record: dict) -> None:
    name = f"{record['variant']}-{record['train_fraction']:g}-{record['seed']}.json"
    (folder / name).write_text(json.dumps(record), encoding="utf-8")


def test_smoothness_counts_rises_between_consecutive_measurements_before_the_stop() -> None:
    record = run("fishdip", 0)
    assert ar.analysis_end(record) == 4
    assert ar.smoothness(record) == {"steps": 4, "pairs": 5, "rises": 2, "rise_share": 0.4, "mean_rise": 0.75,
                                     "after_refresh": None}
    assert ar.smoothness(record, last_step=2) == {"steps": 2, "pairs": 1, "rises": 0, "rise_share": 0.0,
                                                  "mean_rise": None, "after_refresh": None}
    no_stop = ar.smoothness(run("fishdip", 0, stopped_early_at=None))
    assert (no_stop["steps"], no_stop["pairs"], no_stop["rises"]) == (6, 9, 3)
    assert no_stop["rise_share"] == pytest.approx(1 / 3) and no_stop["mean_rise"] == pytest.approx(2 / 3)


def test_rises_after_a_refresh() -> None:
    # Both rises end at step 3: after a refresh at step 2 they are its own; a refresh at step 3 acts from step 4 on.
    refreshed_at = {n: [dict(e, mask_changed=e["step"] in (1, n)) for e in LOG] for n in (2, 3)}
    assert ar.smoothness(run("fishdip", 0, train_log=refreshed_at[2]))["after_refresh"] == 1.0
    assert ar.smoothness(run("fishdip", 0, train_log=refreshed_at[3]))["after_refresh"] == 0.0


def test_missing_runs_and_variants(tmp_path) -> None:
    for variant, seed in (("fishdip", 0), ("fishdip", 1), ("fixed-fish", 0), ("fishdip-n15", 1)):
        write(tmp_path, run(variant, seed))  # fishdip-n15 records method "fishdip": it must count as n = 15
    records, left_out = ar.load(tmp_path)
    assert left_out == 0
    assert [(ar.variant(r), r["seed"]) for r in records] == [("fishdip", 0), ("fishdip", 1), ("fixed-fish", 0),
                                                             ("fishdip-n15", 1)]
    missing = ar.missing_runs(records)
    assert len(missing) == 11 and {"fishdip-0.01-2.json", "fishdip-n15-0.01-0.json", "lora-0.01-0.json"} <= set(missing)
    assert not {"fishdip-0.01-0.json", "fishdip-n15-0.01-1.json"} & set(missing)
    # Per-sentence counts (entity gold, predicted, correct, relation gold, predicted, correct): FISH-DIP gets every
    # sentence right, the others none; only the seeds both methods have are paired.
    right, wrong = np.array([[2, 2, 2, 1, 1, 1]] * 20, float), np.array([[2, 2, 0, 1, 1, 0]] * 20, float)
    gaps = ar.fishdip_gaps(records, lambda r: right if ar.variant(r) == "fishdip" else wrong)
    assert [line for line in ar.gap_section(gaps) if line.startswith("| 1% |")] == [
        "| 1% | FISH mask (fixed) | 1 (0) | **+100.0 [+100.0, +100.0]** | **+100.0 [+100.0, +100.0]** | "
        "0: +100.0 / +100.0 | better / better |",
        "| 1% | FISH-DIP, n = 15 | 1 (1) | **+100.0 [+100.0, +100.0]** | **+100.0 [+100.0, +100.0]** | "
        "1: +100.0 / +100.0 | better / better |"]
    answer = ar.answer_section(gaps, ar.missing_runs(records))
    assert "Provisional: 11 run(s) of the grid are missing" in answer[0]
    assert answer[2:] == [
        "- Against FISH mask (fixed): **better** on entity F1 (**+100.0 [+100.0, +100.0]**) and **better** on "
        "relation F1 (**+100.0 [+100.0, +100.0]**). Seeds where FISH-DIP is ahead: 1 of 1 on entity F1, 1 on "
        "relation F1 (seeds run: 0).",
        "- Against FISH-DIP, n = 15: **better** on entity F1 (**+100.0 [+100.0, +100.0]**) and **better** on "
        "relation F1 (**+100.0 [+100.0, +100.0]**). Seeds where FISH-DIP is ahead: 1 of 1 on entity F1, 1 on "
        "relation F1 (seeds run: 1).",
        "- Against LoRA: no paired run yet.", "- Against Full fine-tuning: no paired run yet."]
    assert [ar.verdict(*gap) for gap in ((1.0, -0.5, 2.0), (-1.0, -2.0, -0.1), (0.0, 0.0, 0.0))] == [
        "tied", "worse", "tied"]
    text = ar.write_report(tmp_path).read_text(encoding="utf-8")
    assert "11 run(s) of the grid have not finished: `fishdip-0.01-2.json`, `fixed-fish-0.01-1.json`" in text
    assert "| 1% | FISH-DIP, n = 15 | 1 | 4 | 5 | 40.0% | 0.75 |" in text
    assert "| 1% | FISH-DIP | 2 | 40.0% | 0.75 |" in text
    assert "from smoothest to least smooth by rise share" in text


def test_report_from_one_run_and_from_none(tmp_path) -> None:
    assert "No run has finished yet." in ar.write_report(tmp_path).read_text(encoding="utf-8")
    write(tmp_path, run("fishdip", 0))
    text = ar.write_report(tmp_path).read_text(encoding="utf-8")
    assert "14 run(s) of the grid have not finished" in text
    assert "| 1% | FISH-DIP | 0 | 30.00 | 5.00 | 6 of 1000 (early stop) | 1 (steps 1) |" in text
    assert "No FISH-DIP run and run of another method share a fraction and seed yet." in text
    assert "| FISH-DIP | 56.88 / 21.63 (FISH-DIP) | 30.00 | 5.00 | 1 |" in text
    assert "only FISH-DIP has a training log yet" in text and "`lr_selection.json` is missing" in text
    assert (tmp_path / "figure4.png").read_bytes().startswith(b"\x89PNG")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_run_table_shows_threads_and_where_a_run_resumed() -> None:
    rows = ar.run_table([run("fishdip", 0, torch_threads=2),
                         run("fixed-fish", 0, torch_threads=1, resumed_from_step=4)])
    assert "| 6 of 1000 (early stop) | 1 (steps 1) | 10 min | 2 min | A | 2 | 0123456789 |" in rows[2]
    assert "| 6 of 1000 (early stop), resumed at 4 |" in rows[3] and rows[3].endswith("| A | 1 | 0123456789 |")


def test_lr_section_lists_the_proxy_runs_finished_before_the_selection(tmp_path) -> None:
    assert ar.lr_section(tmp_path)[1:] == []
    (tmp_path / "lr_selection").mkdir()
    for lr, entity in ((1e-3, 20.61), (3e-4, 15.5)):
        proxy = run("lora", 0, learning_rate=lr, entity_f1=entity, relation_f1=0.0, steps_run=250, steps=250)
        (tmp_path / "lr_selection" / f"lora-lr{lr:g}.json").write_text(json.dumps(proxy), encoding="utf-8")
    assert ar.lr_section(tmp_path)[4:] == ["- LoRA, rate 0.0003: 15.5 / 0.0 (250 steps)",
                                           "- LoRA, rate 0.001: 20.6 / 0.0 (250 steps)"]


def test_lr_section_flags_a_rate_selected_at_an_end_of_its_grid(tmp_path) -> None:
    selection = {"setting": {"seed": 0, "steps": 250, "eval_limit": 80, "criterion": "mean F1"}, "methods": {
        "lora": {"dev_scores": {"0.003": {"entity_f1": 26.2, "relation_f1": 4.8}}, "selected": 3e-2,
                 "at_grid_end": True},
        "full-ft": {"dev_scores": {"3e-05": {"entity_f1": 20.0, "relation_f1": 2.0}}, "selected": 3e-5,
                    "at_grid_end": False}}}
    (tmp_path / "lr_selection.json").write_text(json.dumps(selection), encoding="utf-8")
    rows = ar.lr_section(tmp_path)
    assert rows[-2] == "| LoRA | 0.003: 26.2 / 4.8 | 0.03 (an end of the grid) |"
    assert rows[-1] == "| Full fine-tuning | 3e-05: 20.0 / 2.0 | 3e-05 |"


def test_where_fishdip_and_the_fixed_mask_part() -> None:
    refreshed = [dict(e, mask_changed=e["step"] in (1, 3)) for e in LOG]
    ours = run("fishdip", 0, train_log=refreshed)
    parted_at_4 = run("fixed-fish", 0, train_log=LOG[:3] + [step(4, {0: 1.0, 1: 1.25})] + LOG[4:])
    assert ar.shared_start(ours, parted_at_4) == 3
    assert ar.shared_start(ours, run("fixed-fish", 0, train_log=[step(1, {0: 4.5, 1: 1.0})] + LOG[1:])) == 0
    [line] = ar.shared_start_sentence([ours, parted_at_4, run("lora", 0)])
    assert "seed 0: through step 3, first refresh at step 3" in line and "follows from the refreshes" in line
    parted_at_2 = run("fixed-fish", 0, train_log=LOG[:1] + [step(2, {0: 2.5})] + LOG[2:])
    [line] = ar.shared_start_sentence([ours, parted_at_2])
    assert "through step 1" in line and "follows from the refreshes" not in line
    assert ar.shared_start_sentence([ours, run("fixed-fish", 1)]) == []
    [line] = ar.shared_start_sentence([run("fishdip", 0), run("fixed-fish", 0)])
    assert "seed 0: through step 6, no refresh" in line and "follows from the refreshes" not in line


def test_recorded_commands_show_paths_inside_the_checkout_relative_to_it(tmp_path) -> None:
    checkout = ar.Path(ar.__file__).resolve().parents[2]
    results = checkout / "benchmarks" / "results" / "conll04" / "authors_regime"
    command = f"python -m benchmarks.conll04.authors --grid --results-dir {results} --checkpoint-root /elsewhere/state"
    write(tmp_path, run("fishdip", 0, command=command))
    text = ar.write_report(tmp_path).read_text(encoding="utf-8")
    assert ("- `python -m benchmarks.conll04.authors --grid --results-dir benchmarks/results/conll04/authors_regime "
            "--checkpoint-root /elsewhere/state`") in text
