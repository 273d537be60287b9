"""The two course pictures run end to end in their quick modes: examples/compare_denoisers.py (U-Net, DiT and RIN
side by side) and examples/dit_modulation.py (adaLN-Zero's shift, scale and gate per block)."""

import importlib.util
import json
import math
from pathlib import Path

import PIL.Image
import pytest

from hfgen import UNET_PRESETS, HFGenPipeline, UNetModel
from hfgen.schedulers import DDIMScheduler

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"hfgen_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with PIL.Image.open(path) as im:
        im.verify()
    with PIL.Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 100


def test_compare_denoisers_quick_writes_the_figure_and_finite_scores(mnist_path, tmp_path):
    example = load_example("compare_denoisers")
    args = example.parse_args(["--quick", "--mnist_npz", str(mnist_path), "--output_dir", str(tmp_path)])
    report = example.main(args)

    assert_png(tmp_path / "compare_denoisers.png")
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    assert [r["denoiser"] for r in report["models"]] == ["UNetModel", "DiTModel", "RINModel"]
    for r in report["models"]:
        assert r["parameters"] > 0 and r["train_steps"] == 3
        assert math.isfinite(r["train_seconds"]) and r["train_seconds"] > 0
        assert math.isfinite(r["score"]) and 0.0 <= r["score"] <= 1.0
        assert len(r["per_class_score"]) == 10 and all(0.0 <= s <= 1.0 for s in r["per_class_score"])
        assert (Path(r["pipeline"]) / "model_index.json").is_file()
    assert all(math.isfinite(s) and s >= 0 for s in report["stage_seconds"].values())


def test_dit_modulation_quick_gates_are_zero_at_init_and_not_after_training(tmp_path):
    example = load_example("dit_modulation")
    report = example.main(example.parse_args(["--quick", "--output_dir", str(tmp_path)]))

    assert_png(tmp_path / "dit_modulation.png")
    assert json.loads((tmp_path / "dit_modulation.json").read_text()) == json.loads(json.dumps(report))
    assert report["init_max_abs"] == 0.0  # adaLN-Zero: shift, scale and gate of a fresh model are exactly 0
    assert report["trained_min_gate"] > 0.0  # a few updates already open every gate
    depth, kinds = report["config"]["depth"], len(example.KINDS)
    curves = report["trained_curves"]
    assert (len(curves), len(curves[0]), len(curves[0][0])) == (depth, kinds, len(report["timesteps"]))
    assert all(math.isfinite(v) and v > 0 for block in curves for kind in block for v in kind)


def test_dit_modulation_refuses_a_pipeline_without_a_dit(tmp_path):
    example = load_example("dit_modulation")
    denoiser = UNetModel(**UNET_PRESETS["unet-tiny"], sample_size=16)
    HFGenPipeline(denoiser=denoiser, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="holds a UNetModel"):
        example.main(example.parse_args(["--pipeline", str(tmp_path / "unet"), "--output_dir", str(tmp_path)]))
