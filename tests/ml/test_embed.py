import json

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import ml.embed as embed_module
from ml.backbone import load_backbone
from ml.data import load_image_folder, open_image
from ml.embed import EmbeddedDataset, embed_dataset, embed_images, embed_paths
from ml.errors import DataError
from ml.store import EmbeddingCache, save_tensors

SIZE = 64


TINY = {  # a real open_clip ViT, small enough that these tests are about caching, not compute
    "embed_dim": 32,
    "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in open_clip.CLIP(**TINY).state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    return load_backbone(f"open_clip:local-dir:{folder}", device="cpu")


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    for i in range(10):
        split = "train" if i < 7 else "test"
        label = "red" if i % 2 else "blue"
        path = root / split / label / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20 + i, 16), (25 * i, 255 - 20 * i, 7 * i)).save(path)
    return load_image_folder(root)


@pytest.fixture
def decodes(monkeypatch):
    """Count the images embed actually decodes."""
    calls = []

    def counting(path, *args, **kwargs):
        calls.append(path)
        return open_image(path, *args, **kwargs)

    monkeypatch.setattr(embed_module, "open_image", counting)
    return calls


def test_embed_dataset_matches_direct_encoding(backbone, dataset):
    embedded = embed_dataset(backbone, dataset, batch_size=4)
    assert embedded.embeddings.shape == (10, 32) and embedded.embeddings.dtype == torch.float32
    assert torch.isfinite(embedded.embeddings).all()
    assert embedded.image_ids == [r.image_id for r in dataset]
    assert torch.equal(embedded.labels, dataset.labels_tensor())
    assert embedded.classes == ["blue", "red"] and embedded.backbone_identity == backbone.identity
    direct = embed_images(backbone, [open_image(r.path) for r in dataset])
    torch.testing.assert_close(embedded.embeddings, direct, rtol=1e-4, atol=1e-5)
    test = embedded.split("test")
    assert test.image_ids == [r.image_id for r in dataset.split("test")]
    rows = [i for i, r in enumerate(dataset) if r.split == "test"]
    assert len(rows) == 3
    torch.testing.assert_close(test.embeddings, direct[rows], rtol=1e-4, atol=1e-5)
    with pytest.raises(DataError, match="no split 'val'"):
        embedded.split("val")


def test_save_load_round_trip(backbone, dataset, tmp_path):
    embedded = embed_dataset(backbone, dataset)
    embedded.groups[0] = "water"
    embedded.save(tmp_path / "e.safetensors")
    again = EmbeddedDataset.load(tmp_path / "e.safetensors")
    assert torch.equal(again.embeddings, embedded.embeddings) and torch.equal(again.labels, embedded.labels)
    assert again.labels.dtype == torch.long
    for field in ("image_ids", "classes", "splits", "groups", "backbone_identity", "dataset_root"):
        assert getattr(again, field) == getattr(embedded, field), field
    save_tensors(tmp_path / "other.safetensors", {"x": torch.zeros(1)}, {"kind": "bank"})
    with pytest.raises(DataError, match="not an embedded dataset"):
        EmbeddedDataset.load(tmp_path / "other.safetensors")


def test_cached_images_are_not_decoded_again(backbone, dataset, tmp_path, decodes):
    cache = EmbeddingCache(tmp_path / "cache")
    first = embed_dataset(backbone, dataset, cache=cache, batch_size=4)
    assert len(decodes) == 10
    seen = []
    second = embed_dataset(backbone, dataset, cache=EmbeddingCache(tmp_path / "cache"), progress=lambda d, t: seen.append((d, t)))
    assert len(decodes) == 10, "the second run decoded images"
    assert seen == [(10, 10)]
    assert torch.equal(second.embeddings, first.embeddings)


def test_interrupted_run_resumes(backbone, dataset, tmp_path, decodes):
    reference = embed_dataset(backbone, dataset, batch_size=4)
    decodes.clear()

    def stop_after_first_batch(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_dataset(backbone, dataset, cache=EmbeddingCache(tmp_path / "c"), batch_size=4,
                      progress=stop_after_first_batch)
    assert len(decodes) == 4
    seen = []
    resumed = embed_dataset(backbone, dataset, cache=EmbeddingCache(tmp_path / "c"), batch_size=4,
                            progress=lambda d, t: seen.append((d, t)))
    assert len(decodes) == 10, "only the 6 images not cached may be decoded"
    assert sorted(map(str, decodes[4:])) == sorted(str(r.path) for r in dataset.records[4:])
    assert seen == [(8, 10), (10, 10)]
    torch.testing.assert_close(resumed.embeddings, reference.embeddings, rtol=1e-4, atol=1e-5)


def test_identical_files_are_decoded_once(backbone, dataset, tmp_path, decodes):
    copy = tmp_path / "copy.png"
    copy.write_bytes(dataset.records[0].path.read_bytes())
    vectors = embed_paths(backbone, [dataset.records[0].path, copy, dataset.records[1].path])
    assert len(decodes) == 2
    assert torch.equal(vectors[0], vectors[1]) and not torch.equal(vectors[0], vectors[2])


def test_worker_processes_give_the_same_result(backbone, dataset):
    serial = embed_dataset(backbone, dataset, batch_size=3)
    parallel = embed_dataset(backbone, dataset, batch_size=3, num_workers=1)
    torch.testing.assert_close(parallel.embeddings, serial.embeddings, rtol=1e-4, atol=1e-5)


def test_unreadable_and_missing_images(backbone, dataset, tmp_path):
    broken = dataset.records[3].path
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cache = EmbeddingCache(tmp_path / "cache")
    with pytest.raises(DataError, match=broken.name):
        embed_dataset(backbone, dataset, cache=cache, batch_size=2, num_workers=1)
    gone = dataset.records[5].path
    gone.unlink()
    with pytest.raises(DataError, match=gone.name):
        embed_dataset(backbone, dataset, cache=cache)


class _NaNBackbone:
    """Wraps a backbone but returns NaN for the second image of every batch."""

    def __init__(self, inner):
        self.inner = inner
        self.identity, self.embed_dim, self.device = inner.identity, inner.embed_dim, inner.device
        self.preprocess = inner.preprocess

    def encode_images(self, images):
        out = self.inner.encode_images(images)
        out[1:2] = float("nan")
        return out


def test_nan_embeddings_are_refused_and_not_cached(backbone, dataset, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    with pytest.raises(DataError, match=f"NaN/Inf.*{dataset.records[1].path.name}"):
        embed_dataset(_NaNBackbone(backbone), dataset, cache=cache, batch_size=4)
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    with pytest.raises(DataError, match="NaN/Inf.*image #1"):
        embed_images(_NaNBackbone(backbone), [Image.new("RGB", (8, 8))] * 2)
