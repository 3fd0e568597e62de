"""Storage URIs: local and S3 (moto) round trips, Parquet through pyarrow, publish-last."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3").uri("root")


def test_bytes_json_npy_round_trip(root):
    storage.write_text(storage.join(root, "a", "b.txt"), "hello")
    assert storage.read_text(storage.join(root, "a", "b.txt")) == "hello"
    storage.write_json(storage.join(root, "m.json"), {"x": [1, 2]})
    assert storage.read_json(storage.join(root, "m.json")) == {"x": [1, 2]}
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    storage.write_npy(storage.join(root, "a.npy"), arr)
    np.testing.assert_array_equal(storage.read_npy(storage.join(root, "a.npy")), arr)
    assert storage.listdir(root) == ["a", "a.npy", "m.json"]
    assert list(storage.walk_files(root, ".txt")) == ["a/b.txt"]
    assert storage.exists(storage.join(root, "a.npy"))
    storage.remove(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a", "b.txt"))


def test_parquet_round_trip(root):
    table = pa.table({"clip_id": ["x", "y"], "frames": [751, 750]})
    fs, path = storage.arrow_filesystem(storage.join(root, "t.parquet"))
    if storage.is_remote(root):
        pq.write_table(table, path, filesystem=fs)
    else:
        storage.makedirs(root)
        pq.write_table(table, path, filesystem=fs)
    back = pq.read_table(path, filesystem=fs)
    assert back.to_pylist() == table.to_pylist()


def test_npy_never_unpickles(tmp_path):
    obj = np.array([{"a": 1}], dtype=object)
    np.save(tmp_path / "o.npy", obj, allow_pickle=True)
    with pytest.raises(ValueError):
        storage.read_npy(str(tmp_path / "o.npy"))


def test_redact_hides_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "supersecretvalue")
    assert "supersecretvalue" not in storage.redact("failed with key supersecretvalue")
    assert "abc" not in storage.redact("token=abc")
