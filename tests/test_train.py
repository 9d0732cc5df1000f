import dataclasses
import itertools

import pandas as pd
import pytest
import torch

from aihpc.config import ModelConfig, TrainConfig
from aihpc.models import load_artifact
from aihpc.train import TrainPaths, cosine_with_warmup, fit, random_crop_flip


def tiny_model(**train) -> ModelConfig:
    settings = {"epochs": 2, "batch_size": 16, "lr": 0.05, "accelerator": "cpu", **train}
    return ModelConfig(
        name="tiny", arch="resnet_s", kwargs={"widths": [4, 8, 8]}, train=TrainConfig(**settings)
    )


def paths(tmp_path, data_dir, tag="run") -> TrainPaths:
    out = tmp_path / tag
    return TrainPaths(data_dir, out / "model.pt", out / "metrics.csv", tmp_path / "work" / tag)


def test_fit_writes_a_loadable_artifact_and_curves(tmp_path, preprocessed_dir):
    run = paths(tmp_path, preprocessed_dir)
    record = fit(run, tiny_model(), threads=1)

    model, artifact = load_artifact(run.model_out)
    assert artifact["meta"] == record
    assert record["dataset"] == "cifar10"
    assert record["epochs"] == 2 and record["world_size"] == 1
    assert record["accelerator"] == "cpu" and record["precision"] == "32-true"
    assert len(record["config_hash"]) == 12 and record["versions"]["torch"].startswith("2.13")
    assert 0.0 <= record["best_val_accuracy"] <= 1.0
    assert model(torch.rand(3, 3, 32, 32)).shape == (3, 10)

    curves = pd.read_csv(run.metrics_out)
    assert {"epoch", "train_loss", "val_loss", "val_acc", "lr"} <= set(curves.columns)
    assert sorted(curves["epoch"].unique()) == [0, 1]
    assert curves["train_loss"].dropna().notna().all()


def test_same_seed_same_weights_and_resume_from_last_checkpoint(tmp_path, preprocessed_dir):
    first, second = paths(tmp_path, preprocessed_dir, "a"), paths(tmp_path, preprocessed_dir, "b")
    fit(first, tiny_model(), threads=1)
    fit(second, tiny_model(), threads=1)
    weights_a = load_artifact(first.model_out)[0].state_dict()
    weights_b = load_artifact(second.model_out)[0].state_dict()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)

    # Rerunning after the artifact was lost resumes from work_dir's last.ckpt instead of
    # training again: the finished run's weights come back unchanged.
    first.model_out.unlink()
    record = fit(first, tiny_model(), threads=1)
    assert record["resumed"] is True
    resumed = load_artifact(first.model_out)[0].state_dict()
    assert all(torch.equal(weights_a[k], resumed[k]) for k in weights_a)


def test_changed_config_does_not_resume_a_stale_run(tmp_path, preprocessed_dir):
    run = paths(tmp_path, preprocessed_dir)
    fit(run, tiny_model(epochs=1), threads=1)
    record = fit(run, tiny_model(epochs=1, lr=0.01), threads=1)
    assert record["resumed"] is False


@pytest.mark.parametrize(
    "train", [{"optimizer": "adamw", "lr": 1e-3, "schedule": "cosine"}, {"crop_padding": 0}]
)
def test_other_recipes_train(tmp_path, preprocessed_dir, train):
    record = fit(paths(tmp_path, preprocessed_dir), tiny_model(epochs=1, **train), threads=1)
    assert record["train_seconds"] > 0


def test_no_validation_split(tmp_path):
    from fixtures import write_preprocessed

    data_dir = write_preprocessed(tmp_path / "data", val_fraction=0.0)
    record = fit(paths(tmp_path, data_dir), tiny_model(epochs=1), threads=1)
    assert record["best_val_accuracy"] is None


def test_gpu_requested_without_cuda_is_a_clear_error(tmp_path, preprocessed_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match=r"train\.accelerator is 'gpu'"):
        fit(paths(tmp_path, preprocessed_dir), tiny_model(accelerator="gpu"))


def test_random_crop_flip_only_translates_and_flips():
    torch.manual_seed(0)
    images = torch.rand(64, 2, 6, 6)
    out = random_crop_flip(images, padding=2, hflip=True)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    seen = set()
    for i in range(len(images)):
        candidates = {
            (dy, dx, flip): padded[i, :, dy : dy + 6, dx : dx + 6].flip(2)
            if flip
            else padded[i, :, dy : dy + 6, dx : dx + 6]
            for dy, dx, flip in itertools.product(range(5), range(5), (False, True))
        }
        match = [key for key, crop in candidates.items() if torch.equal(crop, out[i])]
        assert match, f"image {i} is not a translated/flipped copy"
        seen.add(match[0])
    assert len(seen) > 10  # per-image randomness, not one shift for the whole batch
    assert torch.equal(random_crop_flip(images, padding=0, hflip=False), images)


def test_cosine_with_warmup():
    assert cosine_with_warmup(0, 10, 110) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 10, 110) == pytest.approx(1.0)
    assert cosine_with_warmup(60, 10, 110) == pytest.approx(0.5)
    assert cosine_with_warmup(110, 10, 110) == pytest.approx(0.0)


def test_train_config_fields_match_schema():
    import yaml

    from aihpc.config import SCHEMA

    schema = yaml.safe_load(SCHEMA.read_text())
    assert set(schema["$defs"]["train"]["properties"]) == {
        f.name for f in dataclasses.fields(TrainConfig)
    }


def test_fine_tune_from_an_artifact_with_callbacks_and_meta(tmp_path, preprocessed_dir):
    import pytorch_lightning as pl

    base = paths(tmp_path, preprocessed_dir, "base")
    fit(base, tiny_model(epochs=1), threads=1)

    class CountSteps(pl.Callback):
        steps = 0

        def on_train_batch_end(self, *args):
            CountSteps.steps += 1

    tuned = paths(tmp_path, preprocessed_dir, "tuned")
    # A different architecture in the config is ignored: the artifact's spec wins.
    config = dataclasses.replace(tiny_model(epochs=1), arch="seed_cnn")
    record = fit(
        tuned,
        config,
        threads=1,
        init_from=base.model_out,
        callbacks=[CountSteps()],
        extra_meta={"stage": "finetune"},
    )
    assert record["stage"] == "finetune"
    assert CountSteps.steps > 0
    base_model, base_record = load_artifact(base.model_out)
    tuned_model, tuned_record = load_artifact(tuned.model_out)
    assert tuned_record["spec"] == base_record["spec"]
    assert any(
        not torch.equal(a, b)
        for a, b in zip(
            base_model.state_dict().values(), tuned_model.state_dict().values(), strict=True
        )
    )


def test_resume_mid_run_with_augmentation_matches_an_uninterrupted_run(tmp_path, preprocessed_dir):
    import pytorch_lightning as pl

    class Crash(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 1:
                raise RuntimeError("preempted")

    model = tiny_model(epochs=2, crop_padding=2, hflip=True)
    reference = paths(tmp_path, preprocessed_dir, "reference")
    fit(reference, model, threads=1)
    crashed = paths(tmp_path, preprocessed_dir, "crashed")
    with pytest.raises(RuntimeError, match="preempted"):
        fit(crashed, model, threads=1, callbacks=[Crash()])
    record = fit(crashed, model, threads=1)
    assert record["resumed"] is True
    expected = load_artifact(reference.model_out)[0].state_dict()
    resumed = load_artifact(crashed.model_out)[0].state_dict()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    curves = pd.read_csv(crashed.metrics_out)
    assert sorted(curves["epoch"].unique()) == [0, 1]
