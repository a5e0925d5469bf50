"""Mutation score of the core policy modules, measured with mutmut 3 (`make mutation`).

Why a snapshot: mutmut works in a `mutants/` copy next to its config, and its import hook
expects a flat layout. The package and tests are copied into a scratch folder
(build/mutation by default) with `compresszoo/` at its root, so the checkout is never touched
and edits made while the run goes on do not mix into it.

Which tests: the files listed for each module in MODULES, minus each test that asks for a Ray fixture
(benchmarks/mutation_conftest.py); mutmut then runs, for each mutant, only the selected tests
that call the mutated function.

Equivalent mutants (no test can tell them apart from the original) are listed, reviewed, in
benchmarks/mutation_equivalent.txt by function and changed line, not by number or line, so
the list survives edits elsewhere in a file. They are reported on their own and left out of
the score: score = killed / (mutants - equivalent).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
EQUIVALENT_FILE = HERE / "mutation_equivalent.txt"

# module file (under compresszoo/) -> (mutant name pattern, the fast test files that exercise
# it). mutmut's names are module.x_function or module.xǁClassǁmethod, then __mutmut_N. Left
# out everywhere: the end-to-end and cluster files, the comparisons with CompressAI at full
# size (test_codec, test_compat, test_portable: minutes each, and every entropy mutant would
# rerun them), the evaluation and serving pipelines. Add a new fast test file to a module's
# tuple to count its kills; a file missing from the snapshot is skipped.
CODEC_TESTS = ("test_container_v2.py", "test_hostile_codec.py", "test_raster_order.py",
               "test_imagefiles.py", "test_mutation_kills.py", "test_mutation_container_image.py")
MODULES = {
    "codec/gate.py": ("compresszoo.codec.gate.*", ("test_gate.py", "test_mutation_kills.py",
                                                    "test_mutation_gate_rans.py")),
    "models/entropy.py": ("compresszoo.models.entropy.*", ("test_models.py", "test_gate.py", *CODEC_TESTS,
                                                           "test_mutation_entropy_schedule.py")),
    "codec/container.py": ("compresszoo.codec.container.*", CODEC_TESTS),
    "codec/image.py": ("compresszoo.codec.image.*", ("test_gate.py", *CODEC_TESTS)),
    "ans/rans.py": ("compresszoo.ans.rans.*", ("test_rans.py", "test_hostile_codec.py", "test_mutation_kills.py",
                                         "test_mutation_gate_rans.py")),
    "registry_client.py": ("compresszoo.registry_client.*",
                           ("test_registry.py", "test_cli_lookup.py", "test_mutation_kills.py",
                            "test_mutation_config_registry.py")),
    "data/manifest.py": ("compresszoo.data.manifest.*", ("test_data.py", "test_mutation_kills.py",
                                                      "test_mutation_manifest.py")),
    "config.py": ("compresszoo.config.*", ("test_config.py", "test_settings.py", "test_recipe_schedule.py",
                                            "test_policies.py", "test_mutation_kills.py",
                                            "test_mutation_config_registry.py")),
    # the training schedule only
    "train.py": ("compresszoo.train.xǁLrScheduleǁ*", ("test_schedule.py", "test_recipe_schedule.py",
                                                     "test_mutation_kills.py", "test_mutation_entropy_schedule.py")),
}
# What the tests read from the checkout besides the package and themselves.
ALSO_COPY = ("README.md", "docs", "pipelines", "cluster")

KILLED = {"killed", "timeout", "segfault", "caught by type check"}


def snapshot(work: Path, modules: list[str], rev: str | None, deselect: list[str]) -> None:
    """A fresh flat copy: compresszoo/ (with the built coder), tests/, mutmut's config.

    rev: copy that git revision instead of the working tree (a consistent state while others
    edit), with the compiled coder of the working tree.
    """
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    src = ROOT
    if rev:
        src = work / "_rev"
        src.mkdir()
        paths = ["platform/compresszoo", "tests", *ALSO_COPY]
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, *paths],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        for built in (ROOT / "platform" / "compresszoo" / "ans").glob("*.so"):
            shutil.copy2(built, src / "platform" / "compresszoo" / "ans" / built.name)
    shutil.copytree(src / "platform" / "compresszoo", work / "compresszoo",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.c"))
    shutil.copytree(src / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(HERE / "mutation_conftest.py", work / "conftest.py")
    for name in ALSO_COPY:
        if (src / name).is_dir():
            shutil.copytree(src / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (src / name).exists():
            shutil.copy2(src / name, work / name)
    if rev:
        shutil.rmtree(src)
    tests = sorted({f"tests/{t}" for m in modules for t in MODULES[m][1] if (work / "tests" / t).exists()})
    lines = [
        "[mutmut]",
        "source_paths = compresszoo",
        "only_mutate =",
        *(f"    compresszoo/{m}" for m in modules),
        "also_copy =",
        "    conftest.py",
        *(f"    {name}" for name in ALSO_COPY),
        "pytest_add_cli_args_test_selection =",
        *(f"    {t}" for t in tests),
        "pytest_add_cli_args =",
        "    -p",
        "    no:cacheprovider",
        "    -o",
        "    addopts=",
        *(f"    --deselect={d}" for d in deselect),
        # torch is not fork-safe once used: fork each mutant from a server that only imported
        "process_isolation = forkserver",
        "use_git_change_detection = false",
        "",
    ]
    (work / "setup.cfg").write_text("\n".join(lines))


def run_mutmut(work: Path, children: int, patterns: list[str]) -> None:
    # A test's child process (the CLI, a fuzzing child) imports the checkout, not the mutant:
    # kills there are not counted (mutmut's stats find no hit through PYTHONPATH).
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    mutmut = [sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *patterns]
    subprocess.run(mutmut, cwd=work, env=env, check=True)


def load_equivalents(path: Path = EQUIVALENT_FILE) -> list[dict]:
    """Blocks of `[function]`, `- original line`, `+ mutated line`, `why: ...`."""
    blocks: list[dict] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            blocks.append({"function": line[1:-1], "minus": [], "plus": [], "why": ""})
        elif not blocks:
            raise ValueError(f"{path}: {raw!r} comes before the first [function] header")
        elif line.startswith("- "):
            blocks[-1]["minus"].append(line[2:].strip())
        elif line.startswith("+ "):
            blocks[-1]["plus"].append(line[2:].strip())
        elif line.startswith("why:"):
            blocks[-1]["why"] = line[4:].strip()
        else:
            raise ValueError(f"{path}: cannot read {raw!r} (expected '- ', '+ ' or 'why:')")
    for b in blocks:
        if not b["why"] or not (b["minus"] or b["plus"]):
            raise ValueError(f"{path}: [{b['function']}] needs changed lines and a 'why:'")
    return blocks


def function_of(mutant: str) -> str:
    return mutant.rsplit("__mutmut_", 1)[0]


def changed_lines(diff: str) -> tuple[list[str], list[str]]:
    minus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    plus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return minus, plus


def collect(work: Path, modules: list[str]) -> dict:
    """Read mutmut's results in the scratch folder: per module, the status of each mutant."""
    os.chdir(work)  # mutmut's own readers work relative to its config
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    equivalents = load_equivalents()
    used = [0] * len(equivalents)
    report: dict = {}
    for module in modules:
        pattern = MODULES[module][0]
        path = Path("compresszoo") / module
        meta = json.loads((Path("mutants") / f"{path}.meta").read_text())
        rows = {"killed": 0, "equivalent": [], "survived": [], "not_checked": 0}
        for name, code in sorted(meta["exit_code_by_key"].items()):
            if not fnmatch.fnmatchcase(name, pattern):
                continue
            status = status_by_exit_code[code]
            if status == "not checked":  # an interrupted run: left out of the score, counted
                rows["not_checked"] += 1
                continue
            if status in KILLED:
                rows["killed"] += 1
                continue
            diff = get_diff_for_mutant(name, path=path)
            minus, plus = changed_lines(diff)
            hit = next(
                (
                    i
                    for i, b in enumerate(equivalents)
                    if b["function"] == function_of(name) and b["minus"] == minus and b["plus"] == plus
                ),
                None,
            )
            entry = {"name": name, "status": status, "diff": diff}
            if hit is None:
                rows["survived"].append(entry)
            else:
                used[hit] += 1
                rows["equivalent"].append(dict(entry, why=equivalents[hit]["why"]))
        report[module] = rows
    report["_stale_equivalents"] = [b["function"] for b, n in zip(equivalents, used) if n == 0]
    return report


def summarize(report: dict, modules: list[str]) -> str:
    out = ["| module | mutants | killed | equivalent | survived | score |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    tk = tm = te = 0
    for module in modules:
        r = report[module]
        e, s = len(r["equivalent"]), len(r["survived"])
        m = r["killed"] + e + s
        tk, tm, te = tk + r["killed"], tm + m, te + e
        score = 100.0 * r["killed"] / max(m - e, 1)
        unchecked = f" ({r['not_checked']} not checked)" if r["not_checked"] else ""
        out.append(f"| {module} | {m}{unchecked} | {r['killed']} | {e} | {s} | {score:.1f}% |")
    out.append(f"| **all** | {tm} | {tk} | {te} | {tm - tk - te} | {100.0 * tk / max(tm - te, 1):.1f}% |")
    for module in modules:
        for entry in report[module]["survived"]:
            out += ["", f"SURVIVED ({entry['status']}) {entry['name']}", entry["diff"]]
    if report["_stale_equivalents"]:
        out += ["", "equivalent entries that matched no mutant (source changed? review them):"]
        out += [f"  [{f}]" for f in report["_stale_equivalents"]]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=str(ROOT / "build" / "mutation"))
    ap.add_argument("--children", type=int, default=2, help="mutants tested at once")
    ap.add_argument("--only", nargs="*", default=None, help="module files to run (default: all)")
    ap.add_argument("--report-only", action="store_true", help="read the last run's results")
    ap.add_argument("--rev", default=None, help="measure this git revision (default: the working tree)")
    ap.add_argument("--deselect", action="append", default=[], help="a test node id to leave out")
    ap.add_argument("--json", default=None, help="also write the full report here")
    ap.add_argument("--tests", nargs="+", default=None,
                    help="run only these of each module's test files (a faster lower bound on the score: "
                         "a mutant that a subset of the tests kills, all of them kill)")
    ap.add_argument("--mutants", nargs="+", default=None,
                    help="test only these mutants (mutmut names or patterns, e.g. an earlier run's survivors "
                         "and timeouts, with more test files); the others are reported as not checked")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    selected = list(MODULES) if not args.only else args.only
    unknown = set(selected) - set(MODULES)
    if unknown:
        ap.error(f"--only: {sorted(unknown)} not among {list(MODULES)}")
    if args.tests:
        for m in selected:
            kept = tuple(t for t in MODULES[m][1] if t in args.tests)
            if not kept:
                ap.error(f"--tests: none of {args.tests} is among {m}'s test files {list(MODULES[m][1])}")
            MODULES[m] = (MODULES[m][0], kept)
    patterns = [MODULES[m][0] for m in selected]
    if args.mutants:
        stray = [n for n in args.mutants if not any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if stray:
            ap.error(f"--mutants: {stray} are not mutants of {selected} (names look like {patterns[0]})")
        patterns = args.mutants
    start = time.perf_counter()
    if not args.report_only:
        snapshot(work, selected, args.rev, args.deselect)
        run_mutmut(work, args.children, patterns)
    report = collect(work, selected)
    print(summarize(report, selected))
    print(f"\nwall time {time.perf_counter() - start:.0f} s, {args.children} mutants at once")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
