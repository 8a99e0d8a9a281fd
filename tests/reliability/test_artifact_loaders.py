"""A malicious pickle through every loader of the project runs nothing.

tests/ml/test_store.py feeds one to ``load_tensors`` and ``load_meta``, and
tests/test_architecture.py forbids ``pickle.load``/``torch.load`` in the code. Here every
loader that reads a user- or disk-supplied file gets the payload, in each form it could
arrive: a plain pickle, a ``torch.save`` zip (the ``.pt``/``.bin`` format), and a pickle
hidden behind a safetensors header. The payload creates a marker file when unpickled (the
test first proves it does); after every attempt the marker must be absent and the loader
must have raised one of the library's errors.

Loaders: ``ConceptBank.load``, ``load_model`` / ``PCBM.load`` / ``PCBMHybrid.load``,
``EmbeddedDataset.load``, ``EmbeddingCache`` (indexing and reading shards), the app's
``ArtifactStore`` (``get`` and the integrity check in ``put``), backbone checkpoints
(``open_clip:local-dir:`` folders, with a pickled ``.bin`` beside the safetensors file,
and ``open_clip:NAME@file``), dataset manifests (a Parquet file whose Arrow schema asks
for a pickled extension type: CVE-2023-47248), and the web app's workspace import and
model service.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch

from ml.errors import PCBMError

MARKER_NAME = "pwned"


class Payload:
    """Unpickling this creates ``marker`` (open(marker, "w")): harmless, and impossible to miss."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payloads(marker: Path) -> dict[str, bytes]:
    evil = {"state_dict": {"weight": Payload(marker)}, "names": ["a"]}
    buffer = io.BytesIO()
    torch.save(evil, buffer)
    plain = pickle.dumps(evil, protocol=4)
    header = json.dumps({"__metadata__": {"pcbm_meta": "{}"}}).encode()
    disguised = struct.pack("<Q", len(header)) + header + plain  # a safetensors header, then a pickle
    return {"pickle": plain, "torch_zip": buffer.getvalue(), "disguised": disguised}


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / MARKER_NAME


def test_the_payloads_really_run_when_unpickled(marker):
    """Without this, an absent marker would prove nothing."""
    for name, data in payloads(marker).items():
        if name == "pickle":
            pickle.loads(data)
        elif name == "torch_zip":
            torch.load(io.BytesIO(data), weights_only=False)
        else:
            continue
        assert marker.exists(), name
        marker.unlink()


def attempt(load, marker: Path, what: str) -> None:
    with pytest.raises(PCBMError):
        load()
    assert not marker.exists(), f"{what}: the payload ran"


def test_library_loaders(tmp_path, marker):
    from ml.concepts import ConceptBank
    from ml.embed import EmbeddedDataset
    from ml.pcbm import PCBM, PCBMHybrid, load_model
    from ml.store import EmbeddingCache

    for kind, data in payloads(marker).items():
        folder = tmp_path / kind
        folder.mkdir()
        (folder / "bank.safetensors").write_bytes(data)
        (folder / "model.safetensors").write_bytes(data)
        attempt(lambda: ConceptBank.load(folder), marker, f"ConceptBank.load ({kind})")
        attempt(lambda: ConceptBank.load(folder / "bank.safetensors"), marker, f"ConceptBank.load file ({kind})")
        for loader in (load_model, PCBM.load, PCBMHybrid.load):
            attempt(lambda: loader(folder), marker, f"{loader.__qualname__} ({kind})")
        for name in ("embeddings.safetensors", "embeddings.pt", "embeddings.bin"):
            (folder / name).write_bytes(data)
            attempt(lambda: EmbeddedDataset.load(folder / name), marker, f"EmbeddedDataset.load {name} ({kind})")
        identity = "ab" * 32
        shards = tmp_path / f"cache-{kind}" / identity
        shards.mkdir(parents=True)
        (shards / "shard-0000.safetensors").write_bytes(data)
        cache = EmbeddingCache(tmp_path / f"cache-{kind}")
        assert cache.missing(identity, ["h1"]) == ["h1"]  # a shard that does not load is skipped
        assert not marker.exists()
        attempt(lambda: cache.get(identity, ["h1"]), marker, f"EmbeddingCache.get ({kind})")


def test_the_app_artifact_store(tmp_path, marker):
    from app.services.artifacts import ArtifactStore
    from ml.store import tensors_sha256

    store = ArtifactStore(tmp_path / "artifacts")
    tensors = {"weight": torch.ones(2, 3)}
    for kind, data in payloads(marker).items():
        sha = tensors_sha256(tensors)
        key = store.key_for(sha)
        path = store.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)  # a file swapped on disk behind the database's back
        attempt(lambda: store.get(key, expected_sha256=sha), marker, f"ArtifactStore.get ({kind})")
        stored = store.put(tensors)  # the integrity check reads it, finds it damaged, rewrites it
        assert not marker.exists(), f"ArtifactStore.put ({kind})"
        assert store.get(stored.key, expected_sha256=sha)[0]["weight"].equal(tensors["weight"])


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> Path:
    from tests.app.workspace_helpers import make_backbone

    folder = tmp_path_factory.mktemp("tiny-clip")
    make_backbone(folder)
    return folder


def test_backbone_checkpoints(tmp_path, marker, backbone_dir):
    from ml.backbone import load_backbone

    for kind, data in payloads(marker).items():
        folder = tmp_path / f"clip-{kind}"
        shutil.copytree(backbone_dir, folder)
        # a pickled checkpoint next to the real one: open_clip would pick a .bin if it were preferred
        (folder / "open_clip_pytorch_model.bin").write_bytes(payloads(marker)["torch_zip"])
        (folder / "pytorch_model.bin").write_bytes(payloads(marker)["pickle"])
        load_backbone(f"open_clip:local-dir:{folder}", device="cpu")  # still the safetensors weights
        assert not marker.exists(), f"local-dir with pickles beside the weights ({kind})"
        (folder / "open_clip_model.safetensors").write_bytes(data)  # now the weights file itself
        attempt(lambda: load_backbone(f"open_clip:local-dir:{folder}", device="cpu"), marker,
                f"local-dir weights ({kind})")
        for name in ("weights.pt", "weights.bin", "weights.pth"):
            (tmp_path / name).write_bytes(data)
            attempt(lambda: load_backbone(f"open_clip:ViT-B-32@{tmp_path / name}", device="cpu"), marker,
                    f"checkpoint {name} ({kind})")


@pytest.mark.slow
def test_a_named_architecture_with_a_pickled_safetensors_checkpoint(tmp_path, marker):
    from ml.backbone import load_backbone

    for kind, data in payloads(marker).items():
        path = tmp_path / f"{kind}.safetensors"
        path.write_bytes(data)
        attempt(lambda: load_backbone(f"open_clip:ViT-B-32@{path}", device="cpu"), marker, f"@checkpoint ({kind})")


def test_a_parquet_manifest_cannot_ask_for_a_pickled_extension_type(tmp_path, marker):
    """CVE-2023-47248: pyarrow < 14.0.1 unpickled "arrow.py_extension_type" metadata on read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ml.data import load_dataset

    evil = pickle.dumps(Payload(marker))
    field = pa.field("path", pa.binary(), metadata={b"ARROW:extension:name": b"arrow.py_extension_type",
                                                    b"ARROW:extension:metadata": evil})
    table = pa.table({"path": pa.array([b"a.png"]), "label": ["cat"]},
                     schema=pa.schema([field, pa.field("label", pa.string())]))
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(table, manifest)
    try:
        load_dataset(manifest)
    except PCBMError:
        pass  # refusing it is fine (a.png does not exist); running the payload is not
    assert not marker.exists()
    manifest.write_bytes(payloads(marker)["pickle"])  # a pickle named .parquet
    attempt(lambda: load_dataset(manifest), marker, "a pickle named manifest.parquet")


def test_the_web_app_imports_and_serves_no_pickled_model(tmp_path, marker, db, ctx, tiny_workspace):
    from app.services.workspace_import import import_and_load
    from tests.app.workspace_helpers import copy_workspace

    workspace = copy_workspace(tiny_workspace, tmp_path / "evil-ws")
    for file in (workspace / "models" / "pcbm" / "model.safetensors", workspace / "banks" / "concepts" / "bank.safetensors",
                 workspace / "embeddings" / "toy.safetensors"):
        file.write_bytes(payloads(marker)["torch_zip"])
    ctx.settings.workspace = workspace
    import_and_load(ctx)  # logs what it cannot import; must not run anything
    assert not marker.exists()
    assert ctx.models.imported_model_ids() == [] or all(
        ctx.models.errors.get(i) for i in ctx.models.imported_model_ids())
