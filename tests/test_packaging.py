"""The package is laid out so diffusers can save, resolve and load every hfgen component."""

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import diffusers
import diffusers.pipelines
import pytest
from diffusers import ModelMixin, SchedulerMixin
from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple

import hfgen

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = [
    obj
    for obj in vars(hfgen).values()
    if inspect.isclass(obj) and issubclass(obj, (ModelMixin, SchedulerMixin, diffusers.DiffusionPipeline))
]


def test_every_public_component_is_exported_at_top_level():
    names = {c.__name__ for c in COMPONENTS}
    expected = {
        "DDPMScheduler", "DDIMScheduler", "UNetModel", "DiTModel", "RINModel", "AutoencoderModel", "VAEModel",
        "GANGenerator", "GANDiscriminator", "HFGenPipeline", "HFGenTextToImagePipeline", "HFGenVAEPipeline",
        "HFGenGANPipeline",
    }  # fmt: skip
    assert expected <= names


@pytest.mark.parametrize("cls", COMPONENTS, ids=lambda c: c.__name__)
def test_diffusers_records_the_hfgen_module_and_resolves_it(cls):
    library, class_name = _fetch_class_library_tuple(cls)
    # never mistaken for a diffusers pipeline subpackage (which would make diffusers look for it in its own tree)
    assert library == cls.__module__ and library.startswith("hfgen")
    assert not hasattr(diffusers.pipelines, cls.__module__.split(".")[-2] if cls.__module__.count(".") > 1 else "")
    module = importlib.import_module(library)
    assert getattr(module, class_name) is cls
    if issubclass(cls, ModelMixin):
        assert module.ModelMixin is ModelMixin  # diffusers looks the base class up on the module
    if issubclass(cls, SchedulerMixin):
        assert module.SchedulerMixin is SchedulerMixin


def test_pipelines_and_training_are_installed_under_hfgen():
    import hfgen.pipelines
    import hfgen.training.train_diffusion

    assert Path(hfgen.pipelines.__file__).parent.name == "pipelines"
    assert callable(hfgen.training.train_diffusion.main)


@pytest.mark.parametrize(
    "cmd",
    [["-m", "hfgen.training.train_diffusion"]]
    + [
        [str(ROOT / "training" / f"{s}.py")]
        for s in ("train_diffusion", "train_clip", "train_autoencoder", "train_gan")
    ],
    ids=lambda c: " ".join(c).replace(str(ROOT) + "/", ""),
)
def test_training_scripts_run_as_modules_and_as_files(cmd):
    out = subprocess.run([sys.executable, *cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--output_dir" in out.stdout
