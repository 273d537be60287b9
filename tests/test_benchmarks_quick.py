"""Every benchmark script's --quick mode, in this process, so that the scripts cannot rot (full runs are not tests)."""

import sys

import pytest
import torch
from conftest import MNIST_PATH, ROOT
from tolerances import assert_close_float32

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


def test_bench_speed_frozen_variant_is_timed_for_sampling_only(tmp_path):
    """--quick --compile traces with the "eager" backend (no C++ builds): the variants' code runs, and the frozen one
    (a no-grad graph with its weights folded in) has a sampling time and no training step."""
    args = ["--quick", "--compile", "--models", "dit", "--variants", "eager,compiled_frozen"]
    out = bench_speed.main(bench_speed.parse_args([*args, "--results", str(tmp_path / "RESULTS.md")]))
    frozen = out["variants"]["dit_hfgen"]["compiled_frozen"]
    assert frozen["train_s"] is None and frozen["sample_s"] > 0
    ratio = out["ratios"]["dit"]["compiled_frozen / eager"]
    assert ratio["train"] is None and ratio["sample"] > 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| dit | compiled_frozen | eager | - |" in text
    assert "with backend eager the frozen variants are compiled, not frozen" in text  # no row passes for frozen


def test_bench_speed_autocast_variant_runs_the_forward_in_bf16(tmp_path):
    """autocast_bf16: float32 weights, the forward's matmuls in bfloat16 (the output comes back in bfloat16), timed
    beside eager with its GFLOP/s against the bfloat16 matmul peak."""
    model, spec = bench_speed.build("dit_hfgen", "quick")
    inputs = bench_speed.make_inputs(spec, 2, "cpu", torch.float32)
    wrapped, _ = bench_speed.prepare_variant(model.eval(), inputs, "autocast_bf16", "eager")
    assert not wrapped.training and bench_speed.forward(wrapped, *inputs).dtype == torch.bfloat16
    assert (
        next(wrapped.parameters()).dtype == torch.float32 and bench_speed.forward(model, *inputs).dtype == torch.float32
    )
    args = ["--quick", "--models", "dit", "--variants", "eager,autocast_bf16", "--results", str(tmp_path / "R.md")]
    out = bench_speed.main(bench_speed.parse_args(args))
    assert out["matmul_peak_gflops_bf16"] > 0
    assert out["ratios"]["dit"]["autocast_bf16 / eager"]["train"] > 0
    assert "bfloat16 (the autocast variants' peak)" in (tmp_path / "R.md").read_text()


def test_bench_speed_trains_in_train_mode_and_samples_in_eval_mode(tmp_path, monkeypatch):
    """Sampling is timed as a pipeline runs it, on an eval-mode model; training on the model in train mode."""
    seen = {"train": set(), "sample": set()}
    for step in seen:
        original = getattr(bench_speed, f"{step}_step")

        def record(model, *inputs, step=step, original=original):
            seen[step].add(model.training)
            return original(model, *inputs)

        monkeypatch.setattr(bench_speed, f"{step}_step", record)
    args = ["--quick", "--models", "unet", "--variants", "eager,channels_last", "--repeats", "1"]
    bench_speed.main(bench_speed.parse_args([*args, "--results", str(tmp_path / "RESULTS.md")]))
    assert seen == {"train": {True}, "sample": {False}}


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


def test_bench_text_to_image_images_do_not_depend_on_the_batch_size(monkeypatch):
    """Image j is drawn from seed + j, so a smaller --batch_size (less memory) judges the same images."""
    judged = []
    judge = bench_text_to_image.shape_color_accuracy
    monkeypatch.setattr(
        bench_text_to_image, "shape_color_accuracy", lambda x, *a, **k: judged.append(x) or judge(x, *a, **k)
    )
    for batch_size in ("18", "5"):
        bench_text_to_image.main(bench_text_to_image.parse_args(["--quick", "--batch_size", batch_size]))
    assert len(judged) == 4  # 2 guidance scales x 2 batch sizes, all pairs seen
    for a, b in zip(judged[:2], judged[2:]):
        assert_close_float32(a, b, num_eps=256, floor=1.0)


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
    assert out["best"] in ("hfgen", "diffusers")  # the DDPM-trained ones, which bench_sampler_steps re-samples
    assert out["better_hfgen_objective"] in bench_quality.OBJECTIVE_NAMES.values()
    for name in ("diffusers", "hfgen", "hfgen-flow"):
        assert out[name]["steps"] > 0 and out[name]["fid"] > 0
        assert (quality / name / "model_index.json").exists() and (quality / name / "samples.pt").exists()
    flow = bench_quality.HFGenPipeline.from_pretrained(quality / "hfgen-flow")
    assert type(flow.scheduler).__name__ == "FlowMatchHeunDiscreteScheduler"  # as many calls as 25 DDIM steps
    for model in ("hfgen", "diffusers"):
        steps = bench_sampler_steps.main(
            bench_sampler_steps.parse_args(
                ["--quick", "--quality_dir", str(quality), "--classifier", str(clf), "--model", model]
            )
        )
        assert steps["best"] == model and len(steps["rows"]) == 4  # floor + DDIM + DDPM + DPM-Solver
    flow_steps = bench_sampler_steps.main(
        bench_sampler_steps.parse_args(
            ["--quick", "--quality_dir", str(quality), "--classifier", str(clf), "--model", "hfgen-flow"]
        )
    )
    assert [(r["sampler"], r["steps"], r["calls"]) for r in flow_steps["rows"][1:]] == [
        ("diffusers FlowMatchEuler", 2, 2),
        ("diffusers FlowMatchHeun", 2, 3),  # Heun: two denoiser calls a step but the last
    ]


@needs_mnist
def test_eval_ae_gan_scores_every_kind(tmp_path):
    import eval_ae_gan

    from hfgen import AUTOENCODER_PRESETS, DIT_PRESETS, GAN_PRESETS, DiTModel, GANGenerator, VAEModel
    from hfgen.metrics import DigitClassifier
    from hfgen.pipelines import HFGenGANPipeline, HFGenPipeline, HFGenVAEPipeline
    from hfgen.schedulers import DDIMScheduler

    torch.manual_seed(0)
    clf = tmp_path / "clf"
    DigitClassifier(channels=(8, 16, 16), feature_dim=32).save_pretrained(clf)  # untrained: scoring runs, not quality
    vae = VAEModel(**AUTOENCODER_PRESETS["ae-tiny"], in_channels=1, out_channels=1, sample_size=32).eval()
    generator = GANGenerator(**GAN_PRESETS["dcgan-tiny"][0], sample_size=32, out_channels=1).eval()
    dit = DiTModel(**DIT_PRESETS["DiT-tiny/2"], sample_size=8, in_channels=4, num_classes=10).eval()
    pipes = {
        "vae": HFGenVAEPipeline(vae=vae),
        "gan": HFGenGANPipeline(generator=generator),
        "ldit": HFGenPipeline(denoiser=dit, scheduler=DDIMScheduler(), vae=vae),
    }
    common = ["--classifier", str(clf), "--num_images", "24", "--per_class", "2", "--num_inference_steps", "2"]
    for kind, pipe in pipes.items():
        pipe.save_pretrained(tmp_path / kind)
        report = eval_ae_gan.main(eval_ae_gan.parse_args([kind, str(tmp_path / kind), *common]))
        assert (tmp_path / kind / f"eval_{kind}.json").exists()
        if kind == "ldit":
            assert set(report["accuracy"]) == {"1", "3"} and (tmp_path / kind / "eval_ldit_g3.png").exists()
            assert 0 <= report["vae_reconstruction_accuracy"] <= 1
        else:
            assert report["fid"] > 0 and sum(report["class_counts"]) == 24 and 0 <= report["class_entropy"] <= 1
    with pytest.raises(FileNotFoundError, match="--classifier"):
        eval_ae_gan.main(eval_ae_gan.parse_args(["vae", str(tmp_path / "vae"), "--classifier", str(tmp_path)]))
