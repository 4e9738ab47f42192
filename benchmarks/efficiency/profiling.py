"""`python -m benchmarks.efficiency --profile --size 135m --method fishdip`: where a training step (and, for
a method with a mask, a refresh) spends time and memory, under torch.profiler, in this process."""

from __future__ import annotations

import contextlib

from benchmarks.efficiency.measure import build_model, make_batch, rebound_in_core, set_threads
from benchmarks.efficiency.workers import Runner
from benchmarks.methods import get_method


def transient_allocations(prof) -> tuple[int, list[tuple[str, int, int]]]:
    """Peak of the memory allocated inside a profiled window (above what was live when it began) and what
    was live at that peak, grouped by allocating op (`op <- caller <- ...`): [(ops, bytes, count)]."""
    from torch._C._profiler import _EventType
    from torch.profiler._memory_profiler import OpTree

    events = []
    for event in OpTree(prof.profiler.kineto_results).dfs():
        if event.typed[0] == _EventType.Allocation:
            fields = event.typed[1]
            names, op = [], event.parent
            while op is not None and len(names) < 4:
                if not op.name.startswith(("aten::empty", "aten::zeros", "aten::new_", "aten::resize")) or not names:
                    names.append(op.name)
                op = op.parent
            events.append((event.start_time_ns, fields.alloc_size, fields.ptr, " <- ".join(names)))
    events.sort(key=lambda e: e[0])
    live: dict[int, tuple[int, str]] = {}
    current = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for _, size, ptr, names in events:
        if size > 0:
            live[ptr] = (size, names)
            current += size
        elif ptr in live:
            current -= live.pop(ptr)[0]
        if current > peak:
            peak, at_peak = current, dict(live)
    groups: dict[str, list[int]] = {}
    for size, names in at_peak.values():
        entry = groups.setdefault(names, [0, 0])
        entry[0] += size
        entry[1] += 1
    return peak, sorted(((k, v[0], v[1]) for k, v in groups.items()), key=lambda g: -g[1])


def _label_refresh_phases(runner: Runner, stack: contextlib.ExitStack) -> None:
    """Name the phases of a refresh in the profile (record_function around the functions doing them)."""
    from torch.profiler import record_function

    def phase(name):
        def wrap(fn):
            def wrapped(*a, **k):
                with record_function(name):
                    return fn(*a, **k)

            return wrapped

        return wrap

    if runner.method.fishdip_adapter:
        stack.enter_context(rebound_in_core("empirical_fisher", phase("PHASE fisher (per-sample forward+backward)")))
        stack.enter_context(rebound_in_core("global_topk_indices", phase("PHASE global top-K")))
        state = runner.model.base_model.fishdip_state
        state.set_selection = phase("PHASE set_selection")(state.set_selection)
    elif runner.prepared.controller is not None:
        controller = runner.prepared.controller
        controller._importance = phase("PHASE per-sample gradients + dense gradient dict")(controller._importance)


def profile_method(args) -> None:
    """Print where a training step (and, for a method with a mask, a refresh) spends time and memory."""
    from torch.profiler import profile, record_function

    set_threads(args)
    model = build_model(args.size, args.dtype, args.device)
    runner = Runner(get_method(args.method), model, args)
    batches = [make_batch(args.batch_size, args.seq_len, model.config.vocab_size, s, args.device) for s in range(3)]
    for batch in batches:  # warm-up; the first step builds the mask; the pool fills
        runner.train_step(batch)

    def show(title: str, prof) -> None:
        print(f"\n=== {title}: ops by self CPU time ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
        peak, groups = transient_allocations(prof)
        print(f"=== {title}: peak of memory allocated in the window: {peak / 2**20:,.1f} MiB; live at the peak ===")
        for names, size, count in groups[: args.profile_rows]:
            print(f"{size / 2**20:10,.1f} MiB {count:5d}x  {names}")

    with profile(profile_memory=True, record_shapes=True) as prof:
        with record_function("train_step"):
            runner.train_step(batches[0])
    show(f"{args.size}/{args.method} training step", prof)
    if runner.method.refreshable:
        with contextlib.ExitStack() as phases, profile(profile_memory=True, record_shapes=True) as prof:
            _label_refresh_phases(runner, phases)
            with record_function("refresh"):
                runner.refresh()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.profile_rows))
        show(f"{args.size}/{args.method} refresh (n={args.n})", prof)
