"""Every benchmark script's --quick mode, in this process, so that the scripts cannot rot (full runs are not tests)."""

import sys

import pytest
import torch
from conftest import MNIST_PATH, ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_quality  # noqa: E402
import bench_sampler_steps  # noqa: E402
import bench_scheduler  # noqa: E402
import bench_speed  # noqa: E402
import bench_text_to_image  # noqa: E402
import train_digit_classifier  # noqa: E402

needs_mnist = pytest.mark.skipif(not MNIST_PATH.exists(), reason=f"{MNIST_PATH} not found")


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_speed_quick(tmp_path):
    results_md = tmp_path / "RESULTS.md"
    out = bench_speed.main(bench_speed.parse_args(["--quick", "--profile", "--results", str(results_md)]))
    for pair in ("unet", "dit"):
        assert out["pairs"][pair]["train_speed_ratio"] > 0
    assert 0.95 < out["pairs"]["unet"]["param_ratio"] < 1.05  # the matched U-Nets really match
    assert out["pairs"]["unet_hfgen"]["train_gflop"] > out["pairs"]["unet_hfgen"]["sample_gflop"] > 0
    assert "Top ops" in results_md.read_text()


def test_bench_speed_memory_worker_measures_the_step():
    small = bench_speed.memory_worker("unet_hfgen", "quick", 2)
    large = bench_speed.memory_worker("unet_hfgen", "quick", 64)
    assert large["peak_step_mb"] > max(small["peak_step_mb"], 0) + 5  # activations of 64 images are tens of MB


def test_bench_scheduler_quick():
    out = bench_scheduler.main(bench_scheduler.parse_args(["--quick"]))
    assert len(out) == 4 and all(r["hfgen_steps_s"] > 0 and r["diffusers_steps_s"] > 0 for r in out.values())


def test_bench_text_to_image_quick():
    out = bench_text_to_image.main(bench_text_to_image.parse_args(["--quick", "--left_out", "red triangle"]))
    for row in out.values():
        assert set(row) == {"seen", "left_out"}
        assert 0 <= row["seen"]["accuracy"] <= 1


def test_bench_text_to_image_rejects_a_bad_pair():
    with pytest.raises(ValueError, match="purple square"):
        bench_text_to_image.main(bench_text_to_image.parse_args(["--quick", "--left_out", "purple square"]))


@needs_mnist
def test_classifier_quality_and_sampler_steps_quick(tmp_path, monkeypatch):
    clf = tmp_path / "clf"
    train_digit_classifier.main(train_digit_classifier.parse_args(["--quick", "--output_dir", str(clf)]))
    assert (clf / "diffusion_pytorch_model.safetensors").exists()
    monkeypatch.setattr(bench_quality, "CLASSIFIER", clf)
    quality = tmp_path / "quality"
    out = bench_quality.main(bench_quality.parse_args(["--quick", "--output_dir", str(quality)]))
    assert out["best"] in ("hfgen", "diffusers") and out["hfgen"]["steps"] > 0 and out["diffusers"]["steps"] > 0
    assert (quality / "hfgen" / "model_index.json").exists() and (quality / "diffusers" / "model_index.json").exists()
    for model in ("hfgen", "diffusers"):
        steps = bench_sampler_steps.main(
            bench_sampler_steps.parse_args(
                ["--quick", "--quality_dir", str(quality), "--classifier", str(clf), "--model", model]
            )
        )
        assert steps["best"] == model and len(steps["rows"]) == 4  # floor + DDIM + DDPM + DPM-Solver
