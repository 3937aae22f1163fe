"""Update each test's mutation kill record from the last ``mutmut run`` (``make mutate`` does).

    python tools/mutation_history.py [--kills mutants/mutmut-test-kills.jsonl]
                                     [--stats mutants/mutmut-stats.json]
                                     [--history tools/mutation_history.json]

During a run, ``tests/mutation_plugin.py`` logs for every mutant the tests that ran and passed
and the one that failed first (``mutmut-test-kills.jsonl``, one JSON line per mutant). This
adds them to ``tools/mutation_history.json``: per test ``[runs, kills]``, the older record
weighted by ``DECAY`` so that a test that changed soon shows its new rate. Tests the
statistics run no longer knows (renamed, removed) are dropped. The next run orders each
mutant's tests by seconds per expected kill (see the plugin); the history changes only the
order, never which tests may kill a mutant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

DECAY = 0.5  # weight of the previous record against the latest run's


def run_counts(lines: Iterable[str]) -> dict[str, list[float]]:
    """``{test: [runs, kills]}`` over the kills log's JSON lines (blank lines skipped)."""
    counts: dict[str, list[float]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            ran, killer = list(entry["ran"]), entry["killer"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"line {number}: not a kills-log entry ({error})") from None
        for test in ran + ([killer] if killer else []):
            counts.setdefault(test, [0.0, 0.0])[0] += 1
        if killer:
            counts[killer][1] += 1
    return counts


def merged(
    old: Mapping[str, list[float]], new: Mapping[str, list[float]], known: set[str]
) -> dict[str, list[float]]:
    """``DECAY * old + new`` per test, for the tests in `known` only, rounded to 0.01."""
    tests: dict[str, list[float]] = {}
    for test in (set(old) | set(new)) & known:
        runs_old, kills_old = old.get(test, (0.0, 0.0))
        runs_new, kills_new = new.get(test, (0.0, 0.0))
        tests[test] = [
            round(DECAY * runs_old + runs_new, 2),
            round(DECAY * kills_old + kills_new, 2),
        ]
    return dict(sorted(tests.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=Path, default=Path("mutants/mutmut-test-kills.jsonl"))
    parser.add_argument("--stats", type=Path, default=Path("mutants/mutmut-stats.json"))
    parser.add_argument("--history", type=Path, default=Path("tools/mutation_history.json"))
    args = parser.parse_args(argv)
    try:
        new = run_counts(args.kills.read_text().splitlines())
        known = set(json.loads(args.stats.read_text())["duration_by_test"])
        old = json.loads(args.history.read_text())["tests"] if args.history.exists() else {}
    except (OSError, ValueError, KeyError) as error:
        print(f"mutation_history: {args.kills} / {args.stats}: {error}", file=sys.stderr)
        return 2
    tests = merged(old, new, known)
    partial = args.history.with_suffix(".tmp")
    partial.write_text(json.dumps({"decay": DECAY, "tests": tests}, indent=1) + "\n")
    partial.replace(args.history)
    print(f"mutation_history: {len(new)} tests ran in this run; {len(tests)} on record")
    return 0


if __name__ == "__main__":
    sys.exit(main())
