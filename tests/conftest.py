import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is fastest and avoids oversubscription


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one intra-op thread and gives it back: a script or benchmark under test may set its own
    count (bench_quality/bench_speed default to 2), and tiny models on a busy 2-core machine run up to ~100x slower
    with two threads spin-waiting than with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ROOT = Path(__file__).resolve().parents[1]
MNIST_PATH = ROOT.parent / "shared" / "data" / "mnist10k.npz"


@pytest.fixture
def mnist_path():
    if not MNIST_PATH.exists():
        pytest.skip(f"{MNIST_PATH} not found")
    return MNIST_PATH


def sigkill_when_exists(command: list[str], env: dict, path: Path, timeout: float) -> int:
    """Start ``command``, SIGKILL it as soon as ``path`` exists, return its exit code (-SIGKILL when killed).
    Fails the test if the process exits first (with the tail of its stderr) or ``path`` takes over ``timeout`` s."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"no {path.name} within {timeout:g} s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return proc.returncode
