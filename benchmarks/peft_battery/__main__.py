"""Run peft's own custom-model test battery with FISH-DIP cases beside SHiRA's.

    python -m benchmarks.peft_battery [--cache DIR] [--out DIR] [-k EXPR] [-- extra pytest args]

Downloads the installed peft version's source distribution (once, into the cache), extracts its
`tests/`, copies them to a fresh work folder, adds the FISH-DIP cases (`fishdip_cases.py`), runs
`test_custom_models.py` restricted to the SHiRA and FISH-DIP cases and summarizes the junit XML.
See README.md beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

from . import fishdip_cases

HERE = Path(__file__).resolve().parent
DEFAULT_K = "shira or fishdip"
METHODS = ("FISH-DIP", "SHiRA", "other")

# peft's [tool.pytest] settings, without its coverage options
PYTEST_INI = """\
[pytest]
markers =
    single_gpu_tests: tests that run on a single GPU
    multi_gpu_tests: tests that run on multiple GPUs
    regression: whether to run regression suite test
    bitsandbytes: select bitsandbytes integration tests
filterwarnings =
    error::DeprecationWarning:transformers
    ignore:.*BPE.__init__ will not create from files anymore.*:DeprecationWarning:transformers
    error::FutureWarning:transformers
"""


def peft_version() -> str:
    from importlib.metadata import version

    return version("peft")


def fetch_tests(cache: Path, ver: str) -> Path:
    """`cache/pristine/tests`: peft's tests as shipped in its sdist (downloaded and extracted once)."""
    pristine = cache / "pristine" / "tests"
    if (pristine / "test_custom_models.py").is_file():
        return pristine
    sdist = cache / f"peft-{ver}.tar.gz"
    if not sdist.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"downloading the peft {ver} sdist into {cache}", flush=True)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"peft=={ver}"]
        subprocess.run([*pip, "-d", str(cache)], check=True)
    prefix = f"peft-{ver}/tests/"
    staging = cache / "pristine.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            if member.name.startswith(prefix) and member.isfile():
                member.name = "tests/" + member.name[len(prefix) :]
                members.append(member)
        tar.extractall(staging, members=members, filter="data")
    shutil.rmtree(cache / "pristine", ignore_errors=True)
    staging.rename(cache / "pristine")
    return pristine


def prepare_work(cache: Path, pristine: Path, keep_identity_start: bool = False) -> Path:
    """A fresh `cache/work/peft_tests` (a package, named so as not to clash with this repo's `tests`)
    holding peft's tests with our additions applied."""
    work = cache / ("work-keep-identity-start" if keep_identity_start else "work")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(pristine, work / "peft_tests")
    fishdip_cases.apply(work / "peft_tests", keep_identity_start=keep_identity_start)
    (work / "pytest.ini").write_text(PYTEST_INI)
    return work


def method_of(test_id: str) -> str:
    low = test_id.lower()
    if "fishdip" in low or "fish-dip" in low:
        return "FISH-DIP"
    if "shira" in low:
        return "SHiRA"
    return "other"


_FRAME = re.compile(r"^(\S+\.py):(\d+): in (\S+)\s*$")


def deepest_frame(text: str) -> str:
    """`file:line in func: code` of the last traceback frame in a --tb=short report (torch's own
    frames skipped when there are others)."""
    lines = text.splitlines()
    found = ""
    for i, line in enumerate(lines):
        if found and "/torch/" in line:
            continue
        m = _FRAME.match(line)
        if m:
            path = m.group(1)
            for marker in ("site-packages/", "/work/main/", "peft_tests/"):
                if marker in path:
                    path = ("peft_tests/" if marker == "peft_tests/" else "") + path.split(marker, 1)[1]
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            found = f"{path}:{m.group(2)} in {m.group(3)}: {code}"
    return found


def cause_of(message: str) -> str:
    """The first line of an error message, with memory addresses blanked so groups merge."""
    first = next((line.strip() for line in (message or "").splitlines() if line.strip()), "(no message)")
    return re.sub(r"0x[0-9a-fA-F]+", "0x…", first)[:300]


def read_junit(path: Path) -> list[dict]:
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message, text = "passed", "", ""
        children = {child.tag: child for child in case}
        for tag, name in (("error", "error"), ("failure", "failed"), ("skipped", "skipped")):
            if tag in children:
                outcome = name
                message = children[tag].get("message", "")
                text = children[tag].text or ""
                break
        tests.append(
            {
                "id": test_id,
                "test": case.get("name", "").split("[", 1)[0],
                "method": method_of(test_id),
                "outcome": outcome,
                "cause": cause_of(message) if outcome in ("failed", "error", "skipped") else "",
                "where": deepest_frame(text) if outcome in ("failed", "error") else "",
                "seconds": float(case.get("time", 0) or 0),
            }
        )
    return tests


def summarize(tests: list[dict], meta: dict) -> tuple[str, dict]:
    counts = {m: Counter(t["outcome"] for t in tests if t["method"] == m) for m in METHODS}
    groups = defaultdict(list)
    for t in tests:
        if t["method"] == "FISH-DIP" and t["outcome"] in ("failed", "error"):
            groups[t["cause"]].append(t)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    skips = Counter(t["cause"] for t in tests if t["method"] == "FISH-DIP" and t["outcome"] == "skipped")

    mode = " (diagnostic `--keep-identity-start`: no init_weights=False for FishDipConfig)" if meta["keep_identity_start"] else ""
    out = [
        "# peft custom-model battery: FISH-DIP beside SHiRA",
        "",
        f"fishdip_peft at {meta['fishdip_peft']}; peft {meta['peft']} tests/test_custom_models.py, `-k \"{meta['k']}\"`, "
        f"{meta['wall_s']:.0f} s wall, pytest exit code {meta['pytest_rc']}{mode}.",
        "",
        "| method | total | passed | failed | errors | skipped |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in METHODS:
        c = counts[m]
        total = sum(c.values())
        if total or m != "other":
            out.append(f"| {m} | {total} | {c['passed']} | {c['failed']} | {c['error']} | {c['skipped']} |")
    out += ["", f"## FISH-DIP failures and errors by cause ({len(ordered)} causes)", ""]
    for i, (cause, members) in enumerate(ordered, 1):
        wheres = Counter(t["where"] for t in members)
        out.append(f"### {i}. {len(members)} × `{cause}`")
        out.append("")
        for where, n in wheres.most_common(3):
            out.append(f"- raised at ({n}): `{where}`")
        per_test = Counter(t["test"] for t in members)
        out.append("- tests: " + ", ".join(f"{name} ({n})" if n > 1 else name for name, n in sorted(per_test.items())))
        out.append("")
    if skips:
        out += ["## FISH-DIP skips", ""] + [f"- {n} × {cause}" for cause, n in skips.most_common()] + [""]
    out += ["The failing test ids are listed in summary.json (`fishdip_failure_groups`)."]
    data = {
        **meta,
        "counts": {m: dict(counts[m]) for m in METHODS},
        "fishdip_failure_groups": [
            {"cause": cause, "count": len(members), "where": dict(Counter(t["where"] for t in members)),
             "tests": sorted(t["id"] for t in members)}
            for cause, members in ordered
        ],
        "fishdip_skips": dict(skips),
        "fishdip_outcomes": {t["id"].split("::", 1)[-1]: t["outcome"] for t in tests if t["method"] == "FISH-DIP"},
        "shira_not_passed": {
            t["id"].split("::", 1)[-1]: f"{t['outcome']}: {t['cause']}"
            for t in tests
            if t["method"] == "SHiRA" and t["outcome"] != "passed"
        },
    }
    return "\n".join(out) + "\n", data


def code_version() -> str:
    """The repository's commit, with "+dirty" when fishdip_peft/ has uncommitted changes."""
    root = HERE.parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "fishdip_peft"], cwd=root, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peft_battery", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cache", type=Path, default=None, help="download/work folder (default ~/.cache/fishdip_peft/peft-VER-tests)"
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for summary.md and summary.json (default results/)")
    parser.add_argument(
        "--keep-identity-start",
        action="store_true",
        help="diagnostic: peft's set_init_weights_false leaves FishDipConfig's kwargs alone (no init_weights=False); "
        "default out becomes results/keep-identity-start/",
    )
    parser.add_argument("-k", dest="k", default=DEFAULT_K, help=f"pytest -k expression (default {DEFAULT_K!r})")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)

    ver = peft_version()
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    cache = args.cache or cache_home / "fishdip_peft" / f"peft-{ver}-tests"
    out = args.out or (HERE / "results" / ("keep-identity-start" if args.keep_identity_start else ""))
    work = prepare_work(cache, fetch_tests(cache, ver), args.keep_identity_start)
    junit = work / "junit.xml"
    log = work / "pytest.log"
    cmd = [
        sys.executable, "-m", "pytest", "peft_tests/test_custom_models.py", "-k", args.k,
        "-c", "pytest.ini", "--rootdir", ".", "-p", "no:cacheprovider", "-q", "--tb=short",
        f"--junitxml={junit}", *args.pytest_args,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    print(f"running in {work}: {' '.join(cmd[2:])}", flush=True)
    start = time.monotonic()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - start
    tail = log.read_text().splitlines()[-3:]
    print("\n".join(tail))
    if not junit.is_file() or rc not in (0, 1):
        print(f"pytest did not run the battery (exit code {rc}); see {log}", file=sys.stderr)
        return 2
    tests = read_junit(junit)
    meta = {
        "fishdip_peft": code_version(),
        "peft": ver,
        "k": args.k,
        "keep_identity_start": args.keep_identity_start,
        "wall_s": round(wall, 1),
        "pytest_rc": rc,
    }
    text, data = summarize(tests, meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(data, indent=1) + "\n")
    print(text)
    print(f"written: {out / 'summary.md'}, {out / 'summary.json'} (junit: {junit}, log: {log})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
