"""Dev selection of LoRA / full fine-tuning rates in the authors' regime (benchmarks/conll04/authors.py)."""

import json

from benchmarks.conll04 import authors


def args_for(results_dir):
    args = authors.build_parser().parse_args(["--grid", "--results-dir", str(results_dir)])
    args.checkpoint_root, args.lr = results_dir / "state", {}
    return args


def write_proxy(args, name: str, lr: float, entity: float, relation: float) -> None:
    spec = authors.selection_spec(args, name, lr, "python -m benchmarks.conll04.authors --grid")
    record = {"run_spec": spec, "method": spec["method"], "variant": name, "learning_rate": lr,
              "entity_f1": entity, "relation_f1": relation, "final_train_loss": 0.1}
    folder = args.results_dir / "lr_selection"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}-lr{lr:g}.json").write_text(json.dumps(record), encoding="utf-8")


def test_a_grid_grows_past_the_end_that_wins_and_stops_when_an_inner_rate_wins() -> None:
    assert authors.selection_rates("lora", {}) == [3e-4, 1e-3, 3e-3]
    assert authors.selection_rates("lora", {3e-4: 1, 1e-3: 2}) == [3e-4, 1e-3, 3e-3]  # 3e-3 not scored yet
    assert authors.selection_rates("lora", {3e-4: 1, 1e-3: 3, 3e-3: 2}) == [3e-4, 1e-3, 3e-3]
    assert authors.selection_rates("lora", {3e-4: 1, 1e-3: 2, 3e-3: 3}) == [3e-4, 1e-3, 3e-3, 1e-2]
    assert authors.selection_rates("lora", {3e-4: 1, 1e-3: 2, 3e-3: 3, 1e-2: 4, 3e-2: 5}) == [
        3e-4, 1e-3, 3e-3, 1e-2, 3e-2]  # at most MAX_EXTENSIONS = 2 rates added
    assert authors.selection_rates("full-ft", {1e-5: 3, 3e-5: 2, 1e-4: 1}) == [3e-6, 1e-5, 3e-5, 1e-4]
    assert authors.selection_rates("full-ft", {1e-5: 2, 3e-5: 2, 1e-4: 2}) == [3e-6, 1e-5, 3e-5, 1e-4]  # ties: smaller


def test_selection_plans_the_added_rate_and_selects_only_when_every_rate_is_scored(tmp_path) -> None:
    args = args_for(tmp_path)
    args.methods = ["lora"]
    for lr, entity in ((3e-4, 15.5), (1e-3, 20.6), (3e-3, 26.2)):
        write_proxy(args, "lora", lr, entity, 1.0)
    plan = authors.plan_selection(args, "cmd")
    assert [path.name for path, _ in plan] == ["lora-lr0.0003.json", "lora-lr0.001.json", "lora-lr0.003.json",
                                               "lora-lr0.01.json"]
    assert plan[-1][1]["learning_rate"] == 1e-2 and plan[-1][1]["eval_split"] == "dev"
    entry = authors.write_selection(args, "cmd")["methods"]["lora"]
    assert entry["grid"] == [3e-4, 1e-3, 3e-3, 1e-2] and "selected" not in entry
    assert authors.selected_rate(args, "lora") is None
    write_proxy(args, "lora", 1e-2, 24.0, 1.0)
    entry = authors.write_selection(args, "cmd")["methods"]["lora"]
    assert (entry["selected"], entry["at_grid_end"]) == (3e-3, False)
    assert authors.selected_rate(args, "lora")[0] == 3e-3
    assert len(authors.plan_selection(args, "cmd")) == 4  # an inner rate won: the grid stops growing
