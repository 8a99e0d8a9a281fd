import pickle

import pytest
import torch

from ml.errors import DataError
from ml.store import (
    EmbeddingCache,
    bytes_sha256,
    file_sha256,
    load_meta,
    load_tensors,
    safe_join,
    save_tensors,
    tensors_sha256,
)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_save_load_round_trip_is_bit_exact(tmp_path):
    generator = torch.Generator().manual_seed(0)
    floats = torch.randn(7, 5, generator=generator)
    floats[0, 0] = float("nan")
    floats[0, 1] = -0.0
    tensors = {
        "floats": floats,
        "halves": torch.randn(3, generator=generator).to(torch.bfloat16),
        "ints": torch.arange(-5, 5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.25),
    }
    meta = {"names": ["a", "é", "c"], "nested": {"k": [1, 2.5, None]}}
    save_tensors(tmp_path / "sub" / "a.safetensors", tensors, meta)
    loaded, loaded_meta = load_tensors(tmp_path / "sub" / "a.safetensors")
    assert loaded_meta == meta
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert _bits(loaded[name]) == _bits(tensor), name
    assert load_meta(tmp_path / "sub" / "a.safetensors") == meta
    assert tensors_sha256(loaded) == tensors_sha256(tensors)
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.endswith(".tmp")]


def test_tensors_sha256_sees_every_byte_and_scalars():
    a = {"w": torch.zeros(4), "s": torch.tensor(1.0)}
    b = {"w": torch.zeros(4), "s": torch.tensor(1.0000001)}
    assert tensors_sha256(a) != tensors_sha256(b)
    assert tensors_sha256({"w": torch.zeros(4)}) != tensors_sha256({"w": torch.zeros(4, dtype=torch.float64)})


def test_hashes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert file_sha256(path) == bytes_sha256(b"abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    with pytest.raises(DataError, match="missing.bin"):
        file_sha256(tmp_path / "missing.bin")


@pytest.mark.parametrize("bad", [
    "../etc/passwd", "a/../../b", "..\\secret", "a\\..\\..\\b", "%2e%2e%2fsecret", "%2E%2E%2Fsecret",
    "..%2fsecret", "%252e%252e%252fsecret", "..%255csecret", "/etc/passwd", "C:\\Windows", "a\x00b", "%00",
])
def test_safe_join_refuses_traversal(tmp_path, bad):
    with pytest.raises(DataError, match="invalid path"):
        safe_join(tmp_path, bad)


def test_safe_join_allows_inside_and_refuses_symlink_escape(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    assert safe_join(root, "a", "b.png") == (root / "a" / "b.png").resolve()
    assert safe_join(root, "a/./b.png") == (root / "a" / "b.png").resolve()
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(DataError, match="leaves"):
        safe_join(root, "link/x.png")


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_malicious_pickle_is_refused_and_never_run(tmp_path):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Evil(proof)))
    assert proof.exists(), "the payload must really execute when unpickled, or this test proves nothing"
    marker = tmp_path / "pwned"
    for name in ("model.safetensors", "weights.pt", "bank.bin"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps({"state": _Evil(marker)}))
        with pytest.raises(DataError, match=name):
            load_tensors(path)
        with pytest.raises(DataError):
            load_meta(path)
    assert not marker.exists()


def test_load_tensors_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_tensors(tmp_path / "nope.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(DataError, match="empty.safetensors"):
        load_tensors(tmp_path / "empty.safetensors")


def test_embedding_cache_put_get_and_torn_shards(tmp_path):
    cache = EmbeddingCache(tmp_path)
    ident = "ab" * 32
    cache.put(ident, ["h1", "h2"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    cache.put(ident, ["h3"], torch.tensor([[5.0, 6.0]]))
    fresh = EmbeddingCache(tmp_path)  # a new process sees the shards on disk
    assert fresh.missing(ident, ["h3", "h4", "h1"]) == ["h4"]
    assert torch.equal(fresh.get(ident, ["h3", "h1"]), torch.tensor([[5.0, 6.0], [1.0, 2.0]]))
    assert fresh.missing("cd" * 32, ["h1"]) == ["h1"]  # another backbone never sees these
    with pytest.raises(DataError, match="not in the cache"):
        fresh.get(ident, ["h4"])
    shard = next((tmp_path / ident).glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-8])  # a crash mid-write
    assert len(EmbeddingCache(tmp_path).missing(ident, ["h1", "h2", "h3"])) in (1, 2)
    with pytest.raises(DataError, match="NaN"):
        cache.put(ident, ["h5"], torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(DataError, match="hex digest"):
        cache.put("../x", ["h6"], torch.zeros(1, 2))
