"""``python3 -m tests.mutants [--jobs N] [--only ID ...] [--list] [--no-baseline]``

For each mutant of :mod:`tests.mutants.catalogue`: copy the repository's files
(``git ls-files``, tracked and untracked-not-ignored) to a temporary folder,
apply its one replacement, and run its tests there (``pytest -x -q``, with
PYTHONPATH and cwd the copy). A mutant is *killed* when pytest reports a
failing test (exit status 1) or times out; *survived* when the tests pass.
Any other pytest status (no tests collected, usage error) is an *error*. First
the union of the tests runs on an unmutated copy (the baseline): it must pass,
or a kill would mean nothing. Prints a table; exit status 1 on any survivor or
error, 2 when a snippet is not found exactly once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .catalogue import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300


def repo_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                         capture_output=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def copy_repo(files: list[str], dest: Path) -> None:
    for f in files:
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, target)


def check_snippets(mutants: list[Mutant]) -> list[str]:
    """One message per mutant whose old snippet is not found exactly once."""
    problems = []
    for m in mutants:
        path = ROOT / m.file
        n = path.read_text().count(m.old) if path.is_file() else -1
        if n != 1:
            problems.append(f"{m.id}: {m.file}: old snippet found {n} times (want exactly 1)"
                            if n >= 0 else f"{m.id}: {m.file} does not exist")
    return problems


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[int | None, str]:
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        p = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {TIMEOUT_S} s"
    return p.returncode, (p.stdout + p.stderr)[-3000:]


def run_mutant(m: Mutant | None, files: list[str], tests: tuple[str, ...]) -> tuple[str, float, str]:
    """(result, seconds, output tail); result is killed, survived, error, or passed/failed for the baseline."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="msdnet-mutant-") as tmp:
        copy = Path(tmp)
        copy_repo(files, copy)
        if m is not None:
            path = copy / m.file
            text = path.read_text()
            if text.count(m.old) != 1:
                return "error", 0.0, "snippet not found exactly once in the copy"
            path.write_text(text.replace(m.old, m.new))
        rc, out = run_tests(copy, tests)
    seconds = time.monotonic() - t0
    if m is None:
        return ("passed" if rc == 0 else "failed"), seconds, out
    if rc is None or rc == 1:
        return "killed", seconds, out
    return ("survived" if rc == 0 else "error"), seconds, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tests.mutants", description=__doc__.split("\n\n")[1])
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1; 2 on a 2-core machine)")
    ap.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
    args = ap.parse_args(argv)

    problems = check_snippets(MUTANTS)
    if problems:
        print("mutant list is out of date with the code:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    mutants = [m for m in MUTANTS if not args.only or m.id in args.only]
    if args.only and len(mutants) != len(set(args.only)):
        print(f"unknown mutant ids: {sorted(set(args.only) - {m.id for m in mutants})}", file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.id:28} {m.file:24} {m.what}")
        return 0

    files = repo_files()
    started = time.monotonic()
    if not args.no_baseline:
        union = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        result, seconds, out = run_mutant(None, files, union)
        print(f"baseline (no mutant, {len(union)} test selections): {result} in {seconds:.0f} s", flush=True)
        if result != "passed":
            print(out, file=sys.stderr)
            return 1

    def one(m: Mutant):
        result, seconds, out = run_mutant(m, files, m.tests)
        print(f"  {m.id:28} {result:9} {seconds:5.1f} s", flush=True)
        return m, result, seconds, out

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(one, mutants))

    print(f"\n{'id':28} {'file':24} {'result':9} {'s':>5}  what")
    for m, result, seconds, _ in rows:
        print(f"{m.id:28} {m.file:24} {result:9} {seconds:5.1f}  {m.what}")
    bad = [(m, result, out) for m, result, _, out in rows if result != "killed"]
    killed = len(rows) - len(bad)
    print(f"\n{killed}/{len(rows)} killed, {len(bad)} not; {time.monotonic() - started:.0f} s in all")
    for m, result, out in bad:
        print(f"\n--- {m.id} {result} ({' '.join(m.tests)}):\n{out}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
