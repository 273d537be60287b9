"""Save / load / Hub for HFGenPipeline, offline: folders, fp16, a repo id from a Hub cache snapshot, generic diffusers
loading with and without trust_remote_code, push_to_hub contents (upload intercepted), scheduler swapping."""

import json
import os
import shutil
from pathlib import Path

import diffusers
import diffusers.utils.dynamic_modules_utils as dynamic_modules_utils
import pytest
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import HfApi
from safetensors.torch import load_file

import hfgen
from hfgen import UNET_PRESETS, HFGenPipeline, UNetModel
from hfgen.pipelines import push_model_to_hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"
STEPS = 2


def tiny_pipe(num_classes=None, scheduler=None):
    torch.manual_seed(0)
    unet = UNetModel(**UNET_PRESETS["unet-tiny"], sample_size=8, num_classes=num_classes)
    with torch.no_grad():  # give the zero-initialised output layers weights, so outputs depend on the weights
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    pipe = HFGenPipeline(unet.eval(), scheduler or hfgen.schedulers.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs
    ).images


def hub_snapshot(pipe, cache_dir: Path, repo_id="user/repo") -> Path:
    """Lay a saved pipeline out as the Hub cache does: models--user--repo/snapshots/<commit> + refs/main."""
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT
    pipe.save_pretrained(snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return snapshot


def plant_marker(snapshot: Path, marker: Path):
    """Make the repository's code files write ``marker`` if anything ever executes them."""
    for f in [snapshot / "pipeline.py", *snapshot.glob("*/hfgen.*.py")]:
        f.write_text(f.read_text() + f"\nopen({str(marker)!r}, 'a').write({f.name!r})\n")


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """diffusers copies trusted remote code into HF_MODULES_CACHE: keep it in tmp."""
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    return tmp_path / "modules"


# ----------------------------------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------------------------------


def test_save_pretrained_folder_layout(tmp_path):
    pipe = tiny_pipe()
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["denoiser"] == ["hfgen.unet", "UNetModel"]
    assert index["scheduler"] == ["hfgen.schedulers", "DDPMScheduler"]
    assert index["vae"] == [None, None]
    assert index["_class_name"] == ["pipeline", "HFGenPipeline"]
    assert "from hfgen.pipelines.pipeline_hfgen import HFGenPipeline" in (tmp_path / "pipeline.py").read_text()
    assert "from hfgen.unet import UNetModel" in (tmp_path / "denoiser" / "hfgen.unet.py").read_text()
    weights = load_file(tmp_path / "denoiser" / "diffusion_pytorch_model.safetensors")
    assert set(weights) == set(pipe.denoiser.state_dict())


def test_save_load_gives_identical_images(tmp_path):
    pipe = tiny_pipe(num_classes=3)
    pipe.save_pretrained(tmp_path)
    loaded = HFGenPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.denoiser, UNetModel) and loaded.vae is None
    torch.testing.assert_close(sample(loaded, class_labels=[0, 2]), sample(pipe, class_labels=[0, 2]), atol=0, rtol=0)


def test_fp16_load(tmp_path):
    pipe = tiny_pipe()
    pipe.save_pretrained(tmp_path)
    half = HFGenPipeline.from_pretrained(tmp_path, torch_dtype=torch.float16)
    assert half.denoiser.dtype == torch.float16
    torch.testing.assert_close(sample(half), sample(pipe), atol=0.05, rtol=0)


def test_component_override_and_unknown_argument(tmp_path):
    tiny_pipe().save_pretrained(tmp_path)
    ddim = hfgen.schedulers.DDIMScheduler()
    assert HFGenPipeline.from_pretrained(tmp_path, scheduler=ddim).scheduler is ddim
    with pytest.raises(TypeError, match=r"unknown arguments \['unet'\]"):
        HFGenPipeline.from_pretrained(tmp_path, unet=None)


def test_refuses_component_libraries_outside_hfgen_and_diffusers(tmp_path):
    tiny_pipe().save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["denoiser"] = ["os", "system"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="component library 'os'"):
        HFGenPipeline.from_pretrained(tmp_path)


def test_bad_path_is_a_specific_error(tmp_path):
    with pytest.raises(ValueError, match="existing folder or a Hub repo id"):
        HFGenPipeline.from_pretrained(str(tmp_path / "missing" / "x" / "y"))


# ----------------------------------------------------------------------------------------------------------------------
# Hub repo ids, offline from the cache
# ----------------------------------------------------------------------------------------------------------------------


def test_repo_id_loads_offline_from_the_hub_cache_without_running_repo_code(tmp_path):
    pipe = tiny_pipe()
    snapshot = hub_snapshot(pipe, tmp_path / "hub")
    marker = tmp_path / "executed"
    plant_marker(snapshot, marker)
    loaded = HFGenPipeline.from_pretrained("user/repo", cache_dir=tmp_path / "hub")
    assert loaded.name_or_path == "user/repo"
    torch.testing.assert_close(sample(loaded), sample(pipe), atol=0, rtol=0)
    assert not marker.exists()


def test_generic_diffusers_load_needs_trust_remote_code(tmp_path, modules_cache):
    pipe = tiny_pipe(scheduler=hfgen.schedulers.DDIMScheduler())
    snapshot = hub_snapshot(pipe, tmp_path / "hub")
    marker = tmp_path / "executed"
    plant_marker(snapshot, marker)
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained("user/repo", cache_dir=tmp_path / "hub")
    assert not marker.exists()

    loaded = DiffusionPipeline.from_pretrained("user/repo", cache_dir=tmp_path / "hub", trust_remote_code=True)
    assert type(loaded) is HFGenPipeline
    assert type(loaded.denoiser) is UNetModel and type(loaded.scheduler) is hfgen.schedulers.DDIMScheduler
    torch.testing.assert_close(sample(loaded), sample(pipe), atol=0, rtol=0)
    assert marker.exists()  # with trust_remote_code the repository's files did run


# ----------------------------------------------------------------------------------------------------------------------
# push_to_hub: intercept at the huggingface_hub boundary
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def uploads(tmp_path, monkeypatch):
    """Replace HfApi.create_repo / upload_folder; copy each staged folder before it is deleted."""
    staged = []

    class RepoUrl:
        def __init__(self, repo_id):
            self.repo_id = repo_id

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(repo_id)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        dest = tmp_path / f"upload{len(staged)}"
        shutil.copytree(folder_path, dest)
        staged.append((repo_id, dest, kwargs))
        return f"https://huggingface.co/{repo_id}/commit/{COMMIT}"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return staged


def front_matter(readme: str) -> str:
    assert readme.startswith("---\n")
    return readme.split("---\n")[1]


def test_push_to_hub_stages_weights_card_and_grid(uploads):
    pipe = tiny_pipe(num_classes=3)
    info = {"dataset": "shapes", "resolution": 8, "max_train_steps": 100, "learning_rate": 1e-4}
    pipe.push_to_hub("user/repo", training_info=info, num_sample_images=4)
    ((repo_id, folder, _),) = uploads
    assert repo_id == "user/repo"
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {
        "model_index.json",
        "pipeline.py",
        "README.md",
        "samples.png",
        "denoiser/diffusion_pytorch_model.safetensors",
        "denoiser/config.json",
        "scheduler/scheduler_config.json",
    } <= files
    readme = (folder / "README.md").read_text()
    meta = front_matter(readme)
    assert "library_name: hfgen" in meta
    for tag in ("hfgen", "diffusers", "class-conditional-image-generation", "unetmodel"):
        assert f"- {tag}" in meta
    assert "from hfgen import HFGenPipeline" in readme
    assert 'HFGenPipeline.from_pretrained("user/repo")' in readme
    assert (
        "![samples](samples.png)" in readme
        and "| dataset | shapes |" in readme
        and "| max_train_steps | 100 |" in readme
    )
    from PIL import Image

    assert Image.open(folder / "samples.png").size == (16, 16)  # 4 samples of 8x8 in a 2x2 grid
    # the staged folder is itself loadable
    torch.testing.assert_close(
        sample(HFGenPipeline.from_pretrained(folder), class_labels=1), sample(pipe, class_labels=1)
    )


def test_unconditional_card_tags_and_model_push(uploads):
    pipe = tiny_pipe()
    images = pipe(batch_size=2, num_inference_steps=STEPS, output_type="pil").images
    pipe.push_to_hub("user/uncond", images=images)
    push_model_to_hub(pipe.denoiser, "user/unet", training_info={"objective": "epsilon"}, images=images)
    (_, pipe_folder, _), (_, model_folder, _) = uploads
    assert "pipeline_tag: unconditional-image-generation" in front_matter((pipe_folder / "README.md").read_text())
    readme = (model_folder / "README.md").read_text()
    assert "library_name: hfgen" in front_matter(readme)
    assert 'UNetModel.from_pretrained("user/unet")' in readme and "| objective | epsilon |" in readme
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md", "samples.png"} <= set(
        os.listdir(model_folder)
    )


# ----------------------------------------------------------------------------------------------------------------------
# Scheduler swapping
# ----------------------------------------------------------------------------------------------------------------------

SCHEDULERS = [
    (hfgen.schedulers.DDPMScheduler, {}),
    (hfgen.schedulers.DDIMScheduler, {}),
    (diffusers.DDPMScheduler, {}),
    (diffusers.DDIMScheduler, {}),
    (diffusers.PNDMScheduler, {"skip_prk_steps": True}),  # PRK steps need more than a few inference steps
    (diffusers.DPMSolverMultistepScheduler, {}),
    (diffusers.EulerDiscreteScheduler, {}),
    (diffusers.UniPCMultistepScheduler, {}),
]


@pytest.mark.parametrize(
    "scheduler_cls, extra", SCHEDULERS, ids=lambda x: getattr(x, "__module__", "")[:6] + getattr(x, "__name__", "")
)
def test_scheduler_swap_runs_saves_and_reloads(tmp_path, scheduler_cls, extra):
    pipe = tiny_pipe()
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **extra)
    images = sample(pipe)
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    pipe.save_pretrained(tmp_path)
    loaded = HFGenPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is scheduler_cls
    torch.testing.assert_close(sample(loaded), images, atol=1e-6, rtol=0)
