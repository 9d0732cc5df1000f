import pytest
import torch

from aihpc.models import MODELS, build_model, load_artifact, model_spec, save_artifact


def stats(shape=(28, 28, 1), classes=10):
    return {
        "image_shape": list(shape),
        "num_classes": classes,
        "mean": [0.5] * shape[2],
        "std": [0.25] * shape[2],
    }


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_output_shape(arch, shape):
    model = build_model(model_spec(arch, stats(shape, classes=7))).eval()
    x = torch.rand(5, shape[2], shape[0], shape[1])
    assert model(x).shape == (5, 7)


def test_default_residual_model_size():
    # The default recipe (docs/benchmarks.md) is tuned for this size on a 2-core CPU.
    model = build_model(model_spec("resnet_s", stats(), widths=[16, 32, 64]))
    assert sum(p.numel() for p in model.parameters()) == 116_592


def test_seed_cnn_is_three_conv_two_dense():
    model = build_model(model_spec("seed_cnn", stats()))
    kinds = [type(m).__name__ for m in model.modules()]
    assert kinds.count("Conv2d") == 3
    assert kinds.count("Linear") == 2


def test_normalisation_uses_dataset_statistics():
    model = build_model(model_spec("seed_cnn", stats()))
    x = torch.full((1, 1, 28, 28), 0.75)
    assert torch.allclose(model[0](x), torch.ones_like(x))


def test_unknown_arch_and_non_square_images():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        model_spec("vgg", stats())
    with pytest.raises(ValueError, match="square"):
        model_spec("resnet_s", stats((28, 32, 1)))


def test_artifact_round_trip_with_weights_only(tmp_path):
    spec = model_spec("resnet_s", stats(), widths=[4, 8, 8])
    model = build_model(spec)
    path = tmp_path / "model.pt"
    save_artifact(model, spec, path, variant="v", model="m")
    rebuilt, record = load_artifact(path)
    assert record["meta"] == {"variant": "v", "model": "m"}
    assert record["spec"] == spec
    for (name, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not rebuilt.training
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # nothing temporary left
