"""The mutation score of the last ``mutmut run``: what ``make mutate`` prints, the README quotes.

    python tools/mutation_score.py [--equivalents tools/mutation_equivalents.toml]
                                   [--json mutants/score.json] [--fail-under 90]

Run it from the repository root after ``mutmut run``. Every mutant is *detected* (killed by a
failing test, or a timeout: the mutant made the tests hang) or *not* (it survived, or no test
reaches its function). Survivors listed in the equivalents file are excluded from the count:

    score = detected / (mutants - equivalent)

An equivalent mutant is one no test can kill because the program behaves the same (a guard that
cannot fire, a tolerance whose change is invisible...). Each entry of the equivalents file names
the mutated function and the line before and after the mutation (not mutmut's mutant number,
which shifts when the code changes) and says why; see docs/mutation-testing.md. The survivors
that are not listed are printed with their diff: each needs a test, or an entry with a reason.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

DETECTED = {"killed", "timeout"}
DEFAULT_EQUIVALENTS = Path(__file__).with_name("mutation_equivalents.toml")


STATUS_BY_EXIT_CODE = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests"}


def mutant_statuses() -> dict[str, tuple[str, str | None]]:
    """``{mutant: (status, source path)}`` of the last run: from mutmut's per-file result files
    (``mutants/**/*.py.meta``), or else from ``mutmut results``."""
    statuses: dict[str, tuple[str, str | None]] = {}
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        source = str(meta.relative_to("mutants"))[: -len(".meta")]
        for name, code in codes.items():
            if code is None:
                status = "not checked"
            elif code in (24, -24, 152, 255, 36):
                status = "timeout"
            else:
                status = STATUS_BY_EXIT_CODE.get(code, "suspicious")
            statuses[name] = (status, source)
    if statuses:
        return statuses
    done = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        capture_output=True,
        text=True,
        check=True,
    )
    for line in done.stdout.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            statuses[name] = (status, None)
    return statuses


def function_of(mutant: str) -> str:
    """``pkg.module.x_name__mutmut_3`` -> ``pkg.module.name``; methods (``xǁClassǁmethod``)
    -> ``pkg.module.Class.method``."""
    qualified = mutant.rsplit("__mutmut_", 1)[0]
    module, _, name = qualified.rpartition(".")
    if name.startswith("xǁ"):
        name = name[2:].replace("ǁ", ".")
    elif name.startswith("x_"):
        name = name[2:]
    return f"{module}.{name}"


def diff_of(mutant: str, source: str | None) -> str:
    """The unified diff of one mutant (mutmut's own ``show``)."""
    try:
        from mutmut.mutation.diff_apply import get_diff_for_mutant

        return get_diff_for_mutant(mutant, path=source) if source else get_diff_for_mutant(mutant)
    except Exception:  # another mutmut version: ask its command line
        done = subprocess.run(
            [sys.executable, "-m", "mutmut", "show", mutant], capture_output=True, text=True
        )
        return done.stdout


def changed_lines(diff: str) -> tuple[str, str]:
    """The removed and the added lines of a diff, whitespace-normalized, joined by spaces (as
    `load_equivalents` normalizes an entry's lines: a mutant over several lines can match)."""

    def norm(line: str) -> str:
        return re.sub(r"\s+", " ", line[1:].strip())

    lines = diff.splitlines()
    removed = [norm(x) for x in lines if x.startswith("-") and not x.startswith("---")]
    added = [norm(x) for x in lines if x.startswith("+") and not x.startswith("+++")]
    return " ".join(removed), " ".join(added)


def load_equivalents(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    entries = tomllib.loads(path.read_text()).get("equivalent", [])
    for entry in entries:
        for key in ("function", "original", "mutant", "reason"):
            if not str(entry.get(key, "")).strip() and key != "mutant":
                raise SystemExit(f"{path}: an entry lacks {key!r}: {entry}")
        # every run of whitespace (newlines too) becomes one space, as in `changed_lines`
        entry["original"] = re.sub(r"\s+", " ", entry["original"].strip())
        entry["mutant"] = re.sub(r"\s+", " ", entry.get("mutant", "").strip())
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--equivalents", type=Path, default=DEFAULT_EQUIVALENTS)
    parser.add_argument("--json", type=Path, default=Path("mutants/score.json"))
    parser.add_argument("--fail-under", type=float, default=None, help="exit 1 below this score")
    args = parser.parse_args(argv)

    statuses = mutant_statuses()
    if not statuses:
        print("no mutants found: run `mutmut run` (or `make mutate`) first", file=sys.stderr)
        return 2
    equivalents = load_equivalents(args.equivalents)
    used = [0] * len(equivalents)
    equivalent, unexplained = [], []
    for mutant, (status, source) in sorted(statuses.items()):
        if status in DETECTED or status == "not checked":  # not checked: the run was cut short
            continue
        function = function_of(mutant)
        diff = diff_of(mutant, source)
        original, mutated = changed_lines(diff)
        match = next(
            (
                k
                for k, e in enumerate(equivalents)
                if e["function"] == function
                and e["original"] == original
                and e["mutant"] == mutated
            ),
            None,
        )
        if match is not None and status == "survived":
            used[match] += 1
            equivalent.append((mutant, equivalents[match]["reason"]))
        else:
            unexplained.append((mutant, status, diff))

    counts = Counter(status for status, _ in statuses.values())
    unchecked = counts["not checked"]  # a run cut short (timeout, Ctrl-C): scored on the rest
    total = len(statuses) - unchecked - len(equivalent)
    detected = sum(counts[s] for s in DETECTED)
    score = 100.0 * detected / total if total else 100.0
    by_file: Counter[str] = Counter()
    for mutant, _, _ in unexplained:
        by_file[function_of(mutant).rsplit(".", 1)[0]] += 1
    print(f"mutants: {len(statuses)}  " + "  ".join(f"{k}: {v}" for k, v in counts.most_common()))
    print(f"equivalent (excluded, tools/mutation_equivalents.toml): {len(equivalent)}")
    if unchecked:
        print(f"note: {unchecked} mutants were not checked (the run was cut short)")
    print(f"mutation score: {detected} detected / {total} = {score:.1f}%")
    for mutant, status, diff in unexplained:
        print(f"\n# {mutant}: {status}\n{diff}")
    stale = [equivalents[k]["function"] for k, n in enumerate(used) if n == 0]
    if stale:
        print(f"\nnote: {len(stale)} equivalents entries matched no survivor: {sorted(set(stale))}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "mutants": len(statuses),
                "statuses": dict(counts),
                "equivalent": len(equivalent),
                "not_checked": unchecked,
                "detected": detected,
                "score_percent": round(score, 2),
                "not_detected": [m for m, _, _ in unexplained],
                "not_detected_by_module": dict(by_file),
            },
            indent=2,
        )
    )
    if args.fail_under is not None and score < args.fail_under:
        print(f"mutation score {score:.1f}% is below {args.fail_under}%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
