"""benchmarks/bench_time_to_digit.py: chunked training that equals one run, scored after every chunk."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_time_to_digit as bench  # noqa: E402


def denoiser_weights(folder: Path) -> dict:
    return load_file(folder / "denoiser" / "diffusion_pytorch_model.safetensors")


def test_quick_run_scores_every_chunk_and_chunks_train_as_one_run(mnist_path, tmp_path):
    argv = ["--quick", "--models", "rin", "--mnist", str(mnist_path), "--output_dir", str(tmp_path / "chunked"),
            "--set", "num_latents=8", "--set", "learning_rate=5e-4", "--set", "optimizer=lamb"]  # fmt: skip
    report = bench.main(bench.parse_args(argv))

    (r,) = report["models"]
    assert [p["steps"] for p in r["curve"]] == [2, 4] and r["minutes_to_target"] is None
    assert all(0.0 <= p["share"] <= 1.0 and p["minutes"] > 0 for p in r["curve"])
    assert all(
        set(p["x0_error"]) == {"300", "700", "300_wrong", "700_wrong"} and min(p["x0_error"].values()) > 0
        for p in r["curve"]
    )
    assert r["config"]["num_latents"] == 8 and r["learning_rate"] == 5e-4 and r["optimizer"] == "lamb"
    assert "lamb" in bench.markdown(report)
    assert json.loads((tmp_path / "chunked" / "results.json").read_text()) == json.loads(json.dumps(report))
    assert Path(r["grid"]).exists()

    # the same recipe in one uninterrupted 4-step run: the chunked run resumed exactly
    args = bench.parse_args(argv)
    settings, _ = bench.recipe("rin", args)
    config = tmp_path / "chunked" / "rin_config.json"
    flags = bench.chunk_flags("rin", settings, config, tmp_path / "straight", 4, 2, args)
    assert flags[flags.index("--optimizer") + 1] == "lamb"  # LAMB's moments, too, carry over between chunks
    bench.train_diffusion.main(bench.train_diffusion.parse_args(flags))
    straight, chunked = denoiser_weights(tmp_path / "straight"), denoiser_weights(tmp_path / "chunked" / "rin")
    assert straight.keys() == chunked.keys()
    for key, value in straight.items():
        torch.testing.assert_close(chunked[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_a_used_output_dir_is_refused(mnist_path, tmp_path):
    (tmp_path / "rin").mkdir()
    (tmp_path / "rin" / "checkpoint-2").mkdir()
    args = bench.parse_args(["--quick", "--models", "rin", "--mnist", str(mnist_path), "--output_dir", str(tmp_path)])
    with pytest.raises(FileExistsError, match="not empty"):
        bench.main(args)


def test_overrides_are_parsed_and_bad_ones_named(mnist_path):
    assert bench.parse_overrides(["learning_rate=2e-3", "num_latents=64", "name=x"]) == {
        "learning_rate": 2e-3,
        "num_latents": 64,
        "name": "x",
    }
    with pytest.raises(ValueError, match="--set takes key=value"):
        bench.parse_overrides(["num_latents"])
    with pytest.raises(ValueError, match="--target"):
        bench.parse_args(["--mnist", str(mnist_path), "--target", "1.5"])


@pytest.mark.parametrize("objective", ["v_prediction", "flow"])
def test_heldout_x0_error_is_zero_for_an_oracle_and_not_for_a_wrong_denoiser(objective):
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    from hfgen.schedulers import DDIMScheduler

    digits = torch.rand(8, 1, 32, 32) * 2 - 1
    seed = 3
    eps = torch.randn(digits.shape, generator=torch.Generator().manual_seed(seed))  # the noise the function draws
    if objective == "flow":
        scheduler = FlowMatchEulerDiscreteScheduler()
    else:
        scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")

    def oracle(x_t, timesteps, class_labels=None):
        t = int(timesteps[0])
        if objective == "flow":
            out = eps - digits  # the velocity
        else:
            alpha_bar = scheduler.alphas_cumprod[t]
            out = alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * digits  # v
        return SimpleNamespace(sample=out if (class_labels == 0).all() else torch.zeros_like(out))  # knows digit 0

    errors = bench.heldout_x0_error(oracle, scheduler, digits, torch.zeros(8, dtype=torch.long), seed)
    assert errors["300"] < 1e-6 and errors["700"] < 1e-6  # right label: exact
    assert errors["300_wrong"] > 0.01 and errors["700_wrong"] > 0.01  # the next digit's label
    zeros = bench.heldout_x0_error(
        lambda x_t, t, class_labels=None: SimpleNamespace(sample=torch.zeros_like(x_t)), scheduler, digits,
        torch.zeros(8, dtype=torch.long), seed,
    )  # fmt: skip
    assert min(zeros.values()) > 0.01
