"""The domain classifier: learns real digits, saves/loads exactly, trains from shards."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.domain_classifier import (DomainClassifier, DomainClassifierConfig, accuracy,
                                          load_domain_classifier, train_domain_classifier)


def test_small_classifier_learns_digits(small_classifier, digits):
    model, _, info = small_classifier
    images, labels = digits
    assert info["val_accuracy"] > 0.8
    assert accuracy(model, images[4000:4500], labels[4000:4500]) > 0.8  # digits it never saw


def test_save_load_round_trip(small_classifier, digits, tmp_path):
    model, path, info = small_classifier
    loaded = load_domain_classifier(path)
    x = digits[0][:5]
    (a_pool, _, a_logits), (b_pool, b_spatial, b_logits) = model.extract(x), loaded.extract(x)
    assert torch.equal(a_pool, b_pool) and torch.equal(a_logits, b_logits) and b_spatial is None
    assert loaded.extra["val_accuracy"] == info["val_accuracy"]
    assert a_pool.shape == (5, 32) and a_logits.shape == (5, 10)
    assert model.extract(digits[0][:2, 2:30, 2:30])[0].shape == (2, 32)  # other sizes are resized
    with pytest.raises(FileNotFoundError, match="train"):
        load_domain_classifier(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a domain classifier"):
        load_domain_classifier(tmp_path / "other.pt")


def test_bad_training_inputs(digits):
    images, labels = digits
    with pytest.raises(ValueError, match="labels"):
        train_domain_classifier((images[:10], labels[:9]), epochs=1, log=None)
    with pytest.raises(ValueError, match="uint8"):
        train_domain_classifier((images[:10].astype(np.float32), labels[:10]), epochs=1, log=None)
    with pytest.raises(ValueError, match="image_size"):
        train_domain_classifier("some/shards", epochs=1, log=None)
    with pytest.raises(ValueError, match="invalid"):
        DomainClassifier(DomainClassifierConfig(image_size=32, num_classes=1))


def write_digit_shards(folder, images, labels, per_shard):
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(images), per_shard):
        with wds.TarWriter(str(folder / f"train-{s // per_shard:06d}.tar")) as sink:
            for i in range(s, min(s + per_shard, len(images))):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="PNG")
                sink.write({"__key__": f"{i:06d}", "png": buf.getvalue(), "cls": str(int(labels[i])).encode()})


def test_trains_from_webdataset_shards(digits, tmp_path):
    images, labels = digits
    write_digit_shards(tmp_path / "shards", images[:300], labels[:300], per_shard=128)
    model, info = train_domain_classifier(str(tmp_path / "shards"), tmp_path / "c.pt", image_size=32,
                                          widths=(8, 16), epochs=1, log=None)
    assert info["num_train"] + info["num_val"] == 300
    assert model.config.num_classes == 10 and (tmp_path / "c.pt").is_file()
