import random

import numpy as np
import pytest
import torch

from hfgen.metrics import (
    DigitClassifier,
    class_balance,
    classifier_accuracy,
    fid_kid,
    fit_digit_classifier,
    judge_shape_color,
    load_digits,
    pad_digits,
    shape_color_accuracy,
)


@pytest.fixture(scope="module")
def digits():
    from conftest import MNIST_PATH

    if not MNIST_PATH.exists():
        pytest.skip(f"{MNIST_PATH} not found")
    train_x, train_y = load_digits(MNIST_PATH, "train")
    test_x, test_y = load_digits(MNIST_PATH, "test")
    return train_x[:2000], train_y[:2000], test_x[:500], test_y[:500]


@pytest.fixture(scope="module")
def quick_classifier(digits):
    """A narrow classifier trained for a few seconds: good enough to tell digits apart (~80%)."""
    torch.manual_seed(0)
    model = DigitClassifier(channels=(8, 16, 16), feature_dim=32)
    train_x, train_y, _, _ = digits
    return fit_digit_classifier(model, train_x, train_y, num_steps=100, batch_size=64, learning_rate=1e-2)


def test_load_digits_shape_and_range(digits):
    train_x, train_y, _, _ = digits
    assert train_x.shape == (2000, 1, 32, 32) and train_y.dtype == torch.long
    assert train_x.min() == -1 and train_x.max() == 1
    assert (train_x[:, :, :2] == -1).all() and (train_x[:, :, :, -2:] == -1).all()  # 2-pixel background padding


def test_pad_digits_frames_28x28_samples_as_the_data(digits):
    train_x = digits[0][:8]
    native = train_x[..., 2:30, 2:30]  # what a model trained at MNIST's own 28x28 sees
    assert torch.equal(pad_digits(native), train_x)
    unit = pad_digits((native + 1) / 2, background=0.0)  # a pipeline's output_type="pt" range
    assert torch.equal(unit, (train_x + 1) / 2)
    assert torch.equal(pad_digits(train_x), train_x)
    with pytest.raises(ValueError, match="27x27"):
        pad_digits(native[..., 1:, 1:])
    with pytest.raises(ValueError, match="36x36"):
        pad_digits(torch.zeros(1, 1, 36, 36))


def test_fid_of_a_set_against_itself_is_zero(digits):
    torch.manual_seed(0)
    untrained = DigitClassifier(channels=(8, 16, 16), feature_dim=32)
    x = digits[0][:300]
    assert abs(fid_kid(x, x, untrained, kid_subsets=5)["fid"]) < 1e-3


def test_fid_real_vs_noise_far_above_real_vs_real(digits, quick_classifier):
    train_x, _, test_x, _ = digits
    real = fid_kid(train_x[:500], test_x, quick_classifier, kid_subsets=10)
    noise = fid_kid(train_x[:500], torch.rand_like(test_x) * 2 - 1, quick_classifier, kid_subsets=10)
    assert noise["fid"] > 20 * real["fid"]
    assert noise["kid_mean"] > 20 * abs(real["kid_mean"])


def test_value_range_zero_one_gives_the_same_fid(digits, quick_classifier):
    train_x, _, test_x, _ = digits
    a = fid_kid(train_x[:300], test_x[:300], quick_classifier, kid_subsets=2)["fid"]
    b = fid_kid((train_x[:300] + 1) / 2, (test_x[:300] + 1) / 2, quick_classifier, (0, 1), kid_subsets=2)["fid"]
    assert a == pytest.approx(b, rel=1e-4)


def test_uint8_scaled_input_and_bad_value_range_are_rejected(digits, quick_classifier):
    x = digits[0][:10]
    with pytest.raises(ValueError, match="value_range"):
        fid_kid((x + 1) * 127.5, x, quick_classifier)
    with pytest.raises(ValueError, match="value_range must be one of"):
        fid_kid(x, x, quick_classifier, value_range=(0, 255))


def test_class_balance_flags_a_one_class_set(digits, quick_classifier):
    _, _, test_x, test_y = digits
    assert classifier_accuracy(quick_classifier, test_x, test_y) > 0.7
    balanced = class_balance(test_x, quick_classifier)
    assert not balanced.collapsed and balanced.max_class_share < 0.3 and balanced.normalized_entropy > 0.9
    ones = class_balance(test_x[test_y == 1], quick_classifier)
    assert ones.collapsed and ones.max_class_share > 0.6
    assert sum(ones.counts) == int((test_y == 1).sum())


def test_classifier_save_load_round_trip(tmp_path, quick_classifier, digits):
    quick_classifier.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = DigitClassifier.from_pretrained(tmp_path).eval()
    x = digits[2][:8]
    torch.testing.assert_close(loaded.features(x), quick_classifier.features(x))


def _shapes_batch(num_images):
    from hfgen.data import SHAPE_PAIRS, make_shapes_dataset

    ds = make_shapes_dataset(num_images=num_images, image_size=32, seed=1)
    images = torch.stack(
        [torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1) for img in ds["image"]]
    )
    pairs = [SHAPE_PAIRS[label] for label in ds["label"]]
    return images, [c for c, _ in pairs], [s for _, s in pairs]


def test_shapes_judge_is_right_on_real_shapes_and_wrong_on_shuffled_labels():
    images, colors, shapes = _shapes_batch(180)
    real = shape_color_accuracy(images, colors, shapes, value_range=(0, 1))
    assert real["accuracy"] >= 0.97, real
    pairs = list(zip(colors, shapes))
    random.Random(0).shuffle(pairs)
    shuffled = shape_color_accuracy(images, [c for c, _ in pairs], [s for _, s in pairs], value_range=(0, 1))
    assert shuffled["accuracy"] < 0.3, shuffled
    # [-1, 1] input is judged the same
    assert shape_color_accuracy(images * 2 - 1, colors, shapes)["accuracy"] == real["accuracy"]


def test_shapes_judge_on_a_blank_image_and_bad_names():
    assert judge_shape_color(torch.zeros(3, 32, 32)) == (None, None)
    with pytest.raises(ValueError, match="unknown colour 'purple'"):
        shape_color_accuracy(torch.zeros(1, 3, 32, 32), ["purple"], ["circle"])
    with pytest.raises(ValueError, match="one colour and one shape per image"):
        shape_color_accuracy(torch.zeros(2, 3, 32, 32), ["red"], ["circle"])


def test_classifier_scores_run_without_autograd():
    """classifier_accuracy and asked_label_share only read the classifier: no graph is built (memory on big sets)."""
    from hfgen.metrics import DigitClassifier, asked_label_share, classifier_accuracy

    classifier = DigitClassifier(channels=(8, 16, 16), feature_dim=32)
    grad_enabled = []
    classifier.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    images, labels = torch.rand(4, 1, 32, 32), torch.zeros(4, dtype=torch.long)
    classifier_accuracy(classifier, images * 2 - 1, labels)
    asked_label_share(classifier, images, labels)
    assert grad_enabled == [False, False]
