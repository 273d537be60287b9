"""diffusers' loading arguments and calling conventions on hfgen's pipelines (issue 14, part 4): ``dtype`` /
``torch_dtype`` (also per component), ``variant``, ``subfolder``, ``low_cpu_mem_usage``, ``device_map``, the loading
log, model ``push_to_hub(variant=...)``, a batch that follows the class labels, and a text-to-image pipeline built
only to encode prompts."""

import logging
import shutil

import pytest
import torch
from test_hub import tiny_pipe, uploads  # noqa: F401 (the uploads fixture)
from tiny_clip import make_tiny_clip_tokenizer, make_tiny_text_encoder
from tolerances import assert_close_float32

from hfgen import HFGenPipeline
from hfgen.autoencoder import AUTOENCODER_PRESETS, VAEModel
from hfgen.pipelines import HFGenTextToImagePipeline


def saved(tmp_path, **kwargs):
    pipe = tiny_pipe(num_classes=3)
    pipe.vae = None
    pipe.save_pretrained(tmp_path / "pipe", **kwargs)
    return pipe, tmp_path / "pipe"


def test_dtype_alias_and_per_component_dtypes(tmp_path):
    _, folder = saved(tmp_path)
    assert HFGenPipeline.from_pretrained(folder, dtype=torch.bfloat16).denoiser.dtype == torch.bfloat16
    assert HFGenPipeline.from_pretrained(folder, torch_dtype=torch.float16).denoiser.dtype == torch.float16
    by_name = HFGenPipeline.from_pretrained(folder, torch_dtype={"denoiser": torch.bfloat16, "default": torch.float16})
    assert by_name.denoiser.dtype == torch.bfloat16
    assert HFGenPipeline.from_pretrained(folder, torch_dtype={"vae": torch.float16}).denoiser.dtype == torch.float32
    with pytest.raises(ValueError, match="torch_dtype or its alias dtype"):
        HFGenPipeline.from_pretrained(folder, torch_dtype=torch.float16, dtype=torch.bfloat16)


def test_variant_subfolder_low_cpu_mem_usage_and_device_map(tmp_path):
    pipe, folder = saved(tmp_path, variant="fp16")
    assert (folder / "denoiser" / "diffusion_pytorch_model.fp16.safetensors").exists()
    loaded = HFGenPipeline.from_pretrained(folder, variant="fp16", low_cpu_mem_usage=False, device_map="cpu")
    torch.testing.assert_close(loaded.denoiser.state_dict(), pipe.denoiser.state_dict(), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"You are trying to load the model files of the `variant=bf16`, but no such"):
        HFGenPipeline.from_pretrained(folder, variant="bf16")

    shutil.copytree(folder, tmp_path / "repo" / "pipelines" / "tiny")
    nested = HFGenPipeline.from_pretrained(tmp_path / "repo", subfolder="pipelines/tiny", variant="fp16")
    assert nested.denoiser.config.num_classes == 3
    with pytest.raises(ValueError, match="subfolder 'nope'"):
        HFGenPipeline.from_pretrained(tmp_path / "repo", subfolder="nope")
    balanced = HFGenPipeline.from_pretrained(folder, variant="fp16", device_map="balanced")
    assert set(balanced.hf_device_map) == {"denoiser"} and balanced.denoiser.device.type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device_map must be a device or 'balanced'"):
        HFGenPipeline.from_pretrained(folder, variant="fp16", device_map="everywhere")


def test_loading_logs_the_class_of_each_component(tmp_path, caplog):
    _, folder = saved(tmp_path)
    with caplog.at_level(logging.INFO, logger="hfgen.pipelines.hub"):
        HFGenPipeline.from_pretrained(folder)
    assert "Loaded denoiser as UNetModel from `denoiser` subfolder" in caplog.text
    assert "Loaded scheduler as DDPMScheduler from `scheduler` subfolder" in caplog.text


def test_model_push_to_hub_with_a_variant(uploads):  # noqa: F811
    pipe = tiny_pipe()
    pipe.denoiser.push_to_hub("user/unet-fp16", variant="fp16")
    [(repo_id, folder, _)] = uploads
    assert repo_id == "user/unet-fp16" and (folder / "diffusion_pytorch_model.fp16.safetensors").exists()


def test_the_batch_follows_the_class_labels_as_in_dit_pipeline():
    pipe = tiny_pipe(num_classes=10)
    gens = [torch.Generator().manual_seed(i) for i in (3, 4)]
    two = pipe(class_labels=[1, 7], num_inference_steps=2, generator=gens, output_type="pt").images
    assert two.shape[0] == 2
    # image i depends on generator i and label i only: the same as asking for it alone
    alone = pipe(class_labels=[7], num_inference_steps=2, generator=[torch.Generator().manual_seed(4)],
                 output_type="pt").images  # fmt: skip
    # other batch sizes take other kernel blockings: ~10-300 float32 eps per step (see test_pipeline's DDPM test),
    # amplified by guidance s = 3; 1024 eps of the images' magnitude per step allows that, another generator does not
    assert_close_float32(two[1:], alone, num_eps=1024 * 2, floor=1.0)
    assert pipe(num_inference_steps=2, generator=gens, output_type="pt").images.shape[0] == 2
    assert pipe(class_labels=3, num_inference_steps=2, output_type="pt").images.shape[0] == 1
    with pytest.raises(ValueError, match="class_labels must be one int or 3 labels"):
        pipe(batch_size=3, class_labels=[1, 7], num_inference_steps=2)


def test_a_text_pipeline_without_denoiser_encodes_prompts(tmp_path):
    tokenizer = make_tiny_clip_tokenizer(tmp_path / "tok")
    encoder = make_tiny_text_encoder(tokenizer, hidden_size=32)
    pipe = HFGenTextToImagePipeline(denoiser=None, scheduler=None, text_encoder=encoder, tokenizer=tokenizer)
    embeds, mask, negative, negative_mask = pipe.encode_prompt(["a red circle"], "cpu", 2, True)
    assert embeds.shape[0] == 2 and embeds.shape[-1] == 32 and negative.shape == embeds.shape
    assert mask.shape == negative_mask.shape == embeds.shape[:2]
    with pytest.raises(ValueError, match="no denoiser or scheduler"):
        pipe("a red circle")
    vae = VAEModel(**AUTOENCODER_PRESETS["ae-tiny"], sample_size=16)  # a VAE alone needs no denoiser either
    assert HFGenTextToImagePipeline(None, None, encoder, tokenizer, vae=vae).vae is vae


def test_models_take_the_same_loading_arguments(tmp_path):
    from hfgen import UNetModel

    pipe, folder = saved(tmp_path, variant="fp16")
    model = UNetModel.from_pretrained(folder, subfolder="denoiser", variant="fp16", dtype=torch.float16,
                                      device_map="cpu")  # fmt: skip
    assert UNetModel.from_pretrained(folder, subfolder="denoiser", variant="fp16", low_cpu_mem_usage=False).dtype == (
        torch.float32
    )
    assert model.dtype == torch.float16 and model.device.type == "cpu"
    expected = {k: v.half() for k, v in pipe.denoiser.state_dict().items()}
    torch.testing.assert_close(model.state_dict(), expected, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.bf16\.safetensors"):
        UNetModel.from_pretrained(folder, subfolder="denoiser", variant="bf16")
