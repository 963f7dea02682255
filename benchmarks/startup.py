"""Start-up of every script, side by side: wall time of `python <script> --help` (process start to
exit, file cache warm), the median of --rounds runs taken in turns, and whether it printed anything
on stderr (a library complaining at import).

    .venv/bin/python benchmarks/startup.py
    .venv/bin/python benchmarks/startup.py --rounds 9

Each script imports only what its path needs; --help stops right after the imports and the parser.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from intel_compressor_test import HelpFormatter, cpu_description

SCRIPTS = {
    "split_csv_script.py": ["split_csv_script.py", "--help"],
    "notebooks/analysis.py (import)": ["-c", "import sys; sys.path.insert(0, 'notebooks'); import analysis"],
    "intel_compressor_test.py": ["intel_compressor_test.py", "--help"],
    "intel_compressor.py": ["intel_compressor.py", "--help"],
    "manual_classification.py": ["manual_classification.py", "--help"],
    "trainer_classification.py": ["trainer_classification.py", "--help"],
}


def timed_start(args: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, done.stderr.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="runs of each script, taken in turns")
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {name: [] for name in SCRIPTS}
    stderr: dict[str, str] = {}
    for _ in range(args.rounds):
        for name, command in SCRIPTS.items():
            wall, stderr[name] = timed_start(command)
            seconds[name].append(wall)
    print(f"CPU: {cpu_description()}")
    print(f"python {sys.version.split()[0]}, median of {args.rounds}\n")
    print("| script | start-up s | stderr lines |")
    print("|---|---|---|")
    for name, values in seconds.items():
        print(f"| `{name}` | {statistics.median(values):.2f} | {len(stderr[name].splitlines())} |")


if __name__ == "__main__":
    main()
