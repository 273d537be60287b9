"""benchmarks/gpu.sh in its CPU dry run, so that the GPU benchmark cannot rot, and bench_gpu's FLOP count."""

import math
import os
import subprocess
import sys

import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu  # noqa: E402

EXPECTED_ROWS = {
    (pair, library, mode)
    for pair, libraries in {
        "unet": ("hfgen", "diffusers"),
        "dit-b2": ("hfgen", "diffusers"),
        "dit-xl2": ("hfgen", "diffusers"),
        "rin": ("hfgen",),
    }.items()
    for library in libraries
    for mode in ("eager", "compiled")
}


def table_rows(markdown: str) -> dict[tuple[str, str, str], dict[str, str]]:
    """The rows of bench_gpu's table by (pair, library, mode), each as {column: cell}."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    columns = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        row = dict(zip(columns, (c.strip() for c in line.strip("|").split("|"))))
        rows[row["pair"], row["library"], row["mode"]] = row
    return rows


def test_gpu_sh_dry_run(tmp_path):
    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "DRY_RUN": "1", "RESULTS": str(results), "PY": sys.executable, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table_rows(results.read_text())
    assert set(rows) == EXPECTED_ROWS
    for key, row in rows.items():
        for column in ("img/s", "GFLOP/step"):
            value = float(row[column])
            assert math.isfinite(value) and value > 0, (key, column, row[column])
        assert (row["compile s"] == "-") == (key[2] == "eager"), row


def test_dit_pair_counts_the_same_flops():
    """hfgen's DiT and diffusers' are the same math: the same FLOPs (diffusers' per-block copy of the timestep MLP runs
    on B rows, not B x N tokens), the attention matmuls counted on a CPU too."""
    inputs = None
    flops = {}
    for library in ("hfgen", "diffusers"):
        torch.manual_seed(0)
        model, spec = bench_gpu.build("dit-b2", library, dry_run=True)
        inputs = inputs or bench_gpu.make_inputs(spec, 2, torch.device("cpu"))
        flops[library] = bench_gpu.count_train_flops(model.train(), inputs, torch.bfloat16)
    assert abs(flops["hfgen"] / flops["diffusers"] - 1) < 0.01, flops
    config = bench_gpu.hfgen.DIT_PRESETS[bench_gpu.SIZES["dit-b2"][True]]  # the dry run's preset
    B, N, D = 2, (32 // config["patch_size"]) ** 2, config["hidden_size"]
    attention = 12 * B * N**2 * D * config["depth"]  # QK^T and AV: 4 B N^2 D forward, twice that backward, per block
    assert flops["hfgen"] > attention
