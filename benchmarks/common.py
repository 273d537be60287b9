"""Helpers shared by the benchmark scripts: machine description, interleaved A/B timing, RESULTS.md blocks."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
MNIST = ROOT.parent / "shared" / "data" / "mnist10k.npz"
ARTIFACTS = ROOT / "benchmarks" / "artifacts"
CLASSIFIER = ARTIFACTS / "digit_classifier"


def machine() -> str:
    """One line: CPU model, cores, load average, torch threads, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    import diffusers

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {dev}, load average {load} (shared with other jobs), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), diffusers {diffusers.__version__}"
    )


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command() -> str:
    return " ".join([".venv/bin/python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "?"


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of ``fn`` (device-synchronised)."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device | str = "cpu", warmup: int = 1
) -> dict[str, dict[str, float]]:
    """
    Median seconds per call of each function, timed A/B/A/B... (one call of each per round, ``repeats`` rounds) so
    that a load change on the shared machine hits every contender alike: ``{name: {"wall": s, "cpu": s}}``.

    On a CPU shared with other jobs the process CPU time is the steadier measure: wall time also counts the time the
    scheduler gave our core to someone else. On a GPU only "wall" means anything.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_call(fn, device))
    return {
        name: {"wall": statistics.median(t[0] for t in ts), "cpu": statistics.median(t[1] for t in ts)}
        for name, ts in times.items()
    }


def write_results(block: str, results_path: Path | None) -> None:
    """Print a markdown block and, if ``results_path`` is given, append it there."""
    print(block)
    if results_path is not None:
        with open(results_path, "a") as f:
            f.write("\n" + block.rstrip() + "\n")


def header(title: str) -> str:
    return (
        f"### {title}\n\n"
        f"- command: `{command()}`\n- date: {now()}, commit {git_commit()} (plus uncommitted work)\n"
        f"- machine: {machine()}\n"
    )
