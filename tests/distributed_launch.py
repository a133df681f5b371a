"""Two gloo processes on CPU, launched from a test: a free port, the test tree importable, a killed rank run again.

gloo has aborted a rank of these runs on a loaded two-core host (`terminate called without an active exception`,
SIGABRT, no Python error): three times in CI, each while two training processes shared the machine, never on a quiet
one. The abort is in gloo's C++ threads, not in anything the tests check, so a run whose first failing rank died by a
signal is started once more from an empty folder. A Python error in a rank (an assertion, a refusal that should not
happen) or a second abort fails the test with the ranks' output; each rank runs with faulthandler on, so an abort
prints the Python stack it happened in.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# torch.distributed.run's failure report names the rank that failed first, then its exit code (< 0: a signal).
_ROOT_CAUSE_EXIT = re.compile(r"Root Cause \(first observed failure\):.*?exitcode\s*:\s*(-?\d+)", re.DOTALL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def killed_by_a_signal(stderr: str) -> bool:
    """Whether the launcher reports that the first rank to fail died by a signal rather than by a Python error."""
    match = _ROOT_CAUSE_EXIT.search(stderr)
    return match is not None and int(match.group(1)) < 0


def _launch(script: Path, run_dir: Path, timeout: int) -> subprocess.CompletedProcess[str]:
    run_dir.mkdir(parents=True)
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
        "OMP_NUM_THREADS": "1",
        "PYTHONFAULTHANDLER": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), str(script), str(run_dir)]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def run_two_processes(script: Path, output: Path, timeout: int, tail: int = 4000) -> Path:
    """Run `script RUN_DIR` under torch.distributed.run with two processes; returns RUN_DIR, the folder it wrote.

    Raises AssertionError with the end of the ranks' stderr when the run fails other than by one gloo abort.
    """
    run_dir = output / "attempt-1"
    result = _launch(script, run_dir, timeout)
    if result.returncode != 0 and killed_by_a_signal(result.stderr):
        message = f"a rank of {script.name} died by a signal; running it once more:\n{result.stderr[-tail:]}"
        warnings.warn(message, stacklevel=2)
        run_dir = output / "attempt-2"
        result = _launch(script, run_dir, timeout)
    if result.returncode != 0:
        raise AssertionError(result.stderr[-tail:])
    return run_dir
