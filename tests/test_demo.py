"""The main job (``make demo``) runs end to end in its quick mode: CLIP, text-conditioned denoiser, grid, pipeline."""

import importlib.util
import json
from pathlib import Path

from hfgen import HFGenTextToImagePipeline

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def test_demo_quick_writes_grid_report_and_a_loadable_pipeline(tmp_path):
    spec = importlib.util.spec_from_file_location("hfgen_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    report = demo.main(demo.parse_args(["--quick", "--output_dir", str(tmp_path)]))

    assert (tmp_path / "grid.png").is_file()
    saved = json.loads((tmp_path / "demo_report.json").read_text())
    assert saved["left_out_pairs"] == report["left_out_pairs"]
    assert set(saved["shape_color_accuracy"]) == {"seen", "left_out"}
    # every one of the 18 prompts is judged: 16 seen and the 2 left-out pairs, one image each in quick mode
    assert saved["shape_color_accuracy"]["seen"]["num_images"] == 16
    assert saved["shape_color_accuracy"]["left_out"]["num_images"] == 2
    assert set(saved["seconds"]) == {"clip", "denoiser", "sampling", "total"}
    assert saved["seconds"]["total"] >= saved["seconds"]["denoiser"] > 0
    pipe = HFGenTextToImagePipeline.from_pretrained(str(tmp_path / "pipeline"))
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3)
