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

ROOT = Path(__file__).resolve().parents[1]
MNIST_PATH = ROOT.parent / "shared" / "data" / "mnist10k.npz"


@pytest.fixture
def mnist_path():
    if not MNIST_PATH.exists():
        pytest.skip(f"{MNIST_PATH} not found")
    return MNIST_PATH
