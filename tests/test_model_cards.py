"""Every hfgen model's ``push_to_hub`` uploads safetensors, config and a model card (upload intercepted, no network)."""

import os

import PIL.Image
import pytest

import hfgen
import hfgen.cards


def _tiny(name):
    if name == "unet":
        return hfgen.UNetModel(**hfgen.UNET_PRESETS["unet-tiny"], sample_size=8)
    if name == "dit":
        return hfgen.DiTModel(**hfgen.DIT_PRESETS["DiT-tiny/2"], sample_size=8, num_classes=3)
    return hfgen.RINModel(**hfgen.RIN_PRESETS["RIN-tiny"], sample_size=8)


@pytest.mark.parametrize("name", ["unet", "dit", "rin"])
def test_model_push_to_hub_writes_card(name, monkeypatch):
    model = _tiny(name)
    staged = {}

    def fake_upload(folder, repo_id, token, private, commit_message, create_pr):
        staged["repo_id"] = repo_id
        staged["files"] = sorted(os.listdir(folder))
        staged["card"] = open(os.path.join(folder, "README.md"), encoding="utf-8").read()

    monkeypatch.setattr(hfgen.cards, "_upload", fake_upload)
    images = [PIL.Image.new("RGB", (8, 8), (255, 0, 0))] * 4
    model.push_to_hub("user/tiny", training_info={"max_train_steps": 10}, images=images)

    cls = type(model).__name__
    assert staged["repo_id"] == "user/tiny"
    assert staged["files"] == ["README.md", "config.json", "diffusion_pytorch_model.safetensors", "samples.png"]
    card = staged["card"]
    assert card.startswith("---\nlibrary_name: hfgen\n")
    assert f'{cls}.from_pretrained("user/tiny")' in card
    assert "| max_train_steps | 10 |" in card
    assert "![samples](samples.png)" in card


def test_model_push_to_hub_rejects_unknown_arguments():
    with pytest.raises(TypeError, match="unexpected arguments"):
        _tiny("unet").push_to_hub("user/tiny", bogus=1)
