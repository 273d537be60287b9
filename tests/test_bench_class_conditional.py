"""benchmarks/bench_class_conditional.py: the quick mode runs end to end for all three denoisers and writes its report."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_class_conditional as bench  # noqa: E402


def test_grid_rows_are_asked_classes():
    per_class = 3
    labels = torch.arange(10).repeat_interleave(per_class)  # class-major, as the benchmark samples
    images = (labels.float() / 10)[:, None, None, None].expand(-1, 1, 4, 4)  # image of class c is filled with c / 10
    grid = torch.tensor(list(bench.grid_image(images, per_class, scale=1).getdata())).view(40, 12)
    for c in range(10):
        assert grid[4 * c : 4 * c + 4].unique().tolist() == [round(255 * c / 10)]


def test_quick_run_writes_report_and_grids(mnist_path, tmp_path):
    args = bench.parse_args(["--quick", "--mnist", str(mnist_path), "--output_dir", str(tmp_path)])
    report = bench.main(args)

    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(report))
    assert [r["model"] for r in report["models"]] == ["unet", "dit", "rin"]
    assert [r["denoiser"] for r in report["models"]] == ["UNetModel", "DiTModel", "RINModel"]
    assert report["objective"] == "diffusion" and {r["sampler"] for r in report["models"]} == {"DDIMScheduler"}
    for r in report["models"]:
        assert r["train_steps"] == 3 and r["train_seconds"] > 0
        assert (tmp_path / r["model"] / "pipeline" / "model_index.json").exists()
        for key in ("1", "3"):
            assert 0.0 <= r["accuracy"][key] <= 1.0
            assert len(r["per_class_accuracy"][key]) == 10
            assert r["samples_per_second"][key] > 0
            grid = Path(r["grids"][key])
            assert grid.parent == tmp_path and grid.exists()
            with bench.PIL.Image.open(grid) as im:
                assert im.size == (2 * 32 * 2, 10 * 32 * 2)  # 2 per class x 10 rows of 32 px, upscaled x2


def test_flow_matching_flags_leave_out_the_diffusion_ones(mnist_path, tmp_path):
    args = bench.parse_args(["--quick", "--mnist", str(mnist_path), "--objective", "flow_matching"])
    config = tmp_path / "config.json"
    config.write_text(json.dumps(bench.model_config("unet", quick=True)))
    flags = bench.train_flags("unet", config, tmp_path / "out", 3, args)
    assert flags[flags.index("--objective") + 1] == "flow_matching"
    assert not {"--prediction_type", "--snr_gamma", "--beta_schedule"} & set(flags)
    parsed = bench.train_diffusion.parse_args(flags)  # train_diffusion refuses --prediction_type/--snr_gamma with flow
    assert parsed.objective == "flow_matching" and parsed.weighting_scheme == "logit_normal"


def test_quick_flow_matching_run_samples_with_the_saved_flow_scheduler(mnist_path, tmp_path):
    args = ["--quick", "--mnist", str(mnist_path), "--output_dir", str(tmp_path), "--objective", "flow_matching"]
    report = bench.main(bench.parse_args([*args, "--models", "unet"]))

    assert report["objective"] == "flow_matching"
    (r,) = report["models"]
    assert r["objective"] == "flow_matching" and r["sampler"] == "FlowMatchEulerDiscreteScheduler"
    assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
    saved = bench.HFGenPipeline.from_pretrained(tmp_path / "unet" / "pipeline")
    assert type(saved.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert json.loads((tmp_path / "results.json").read_text())["models"][0]["objective"] == "flow_matching"
