"""Weights identity of model folders: the sha256 of the checkpoint files, each file hashed
once (cached by path, size and modification time; a Hugging Face cache blob's own name used as
its hash), so loading the same checkpoint again hashes nothing, and flipping one byte of one
shard changes the identity."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from specsight.models.load import hash_weights, load_model
from specsight.models.load.identity import HashStats, checkpoint_files, checkpoint_identity


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECSIGHT_CACHE", str(tmp_path / "cache"))


def _sharded(folder: Path) -> list[Path]:
    lm = load_model("tiny-llama", device="cpu", seed=3)
    lm.model.save_pretrained(str(folder), max_shard_size="100KB")
    lm.tokenizer.save(folder / "tokenizer.json")
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) >= 3
    return shards


def _by_hand(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in checkpoint_files(folder):
        digest.update(f"{path.name}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def test_the_identity_is_the_files_sha256_and_a_second_time_hashes_nothing(tmp_path):
    folder = tmp_path / "ckpt"
    shards = _sharded(folder)
    first = checkpoint_identity(folder)
    assert first == _by_hand(folder)
    assert HashStats.hashed_files == len(shards) + 1  # the shards and config.json
    assert HashStats.hashed_bytes == sum(p.stat().st_size for p in checkpoint_files(folder))
    assert checkpoint_identity(folder) == first
    assert (HashStats.hashed_files, HashStats.from_cache) == (0, len(shards) + 1)
    loaded = load_model(str(folder), device="cpu")  # loading reads the cache too
    assert loaded.weights_sha256 == first and HashStats.hashed_files == 0


def test_one_flipped_byte_of_one_shard_changes_the_identity(tmp_path):
    folder = tmp_path / "ckpt"
    shards = _sharded(folder)
    before = checkpoint_identity(folder)
    data = bytearray(shards[1].read_bytes())
    data[-7] ^= 0x01
    stat = shards[1].stat()
    shards[1].write_bytes(bytes(data))
    os.utime(shards[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000))
    after = checkpoint_identity(folder)
    assert after != before and after == _by_hand(folder)
    assert HashStats.hashed_files == 1  # only the changed shard


def test_hub_cache_blob_names_are_used_without_hashing(tmp_path):
    folder = tmp_path / "plain"
    _sharded(folder)
    snapshot = tmp_path / "hub" / "snapshots" / "abc"
    blobs = tmp_path / "hub" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for path in checkpoint_files(folder):
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        (blobs / sha).write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", sha))
    plain = checkpoint_identity(folder)
    assert checkpoint_identity(snapshot) == plain
    assert HashStats.from_blob_names == len(checkpoint_files(folder))
    assert HashStats.hashed_files == 0


def test_a_checkpoint_gone_before_the_identity_is_read_falls_back_to_the_tensors(tmp_path):
    folder = tmp_path / "ckpt"
    shards = _sharded(folder)
    loaded = load_model(str(folder), device="cpu")
    loaded.identity.result()  # let the first hashing finish, then start a second load
    again = load_model(str(folder), device="cpu")
    for shard in shards:
        shard.unlink()
    # the files may be gone before or after the thread read them: either identity is sound
    assert again.weights_sha256 in (loaded.weights_sha256, hash_weights(again.model))


def test_a_shard_of_the_loaded_list_gone_raises_instead_of_hashing_a_subset(tmp_path):
    # the race of the test above made deterministic: the glob ran after one shard was gone
    folder = tmp_path / "ckpt"
    shards = _sharded(folder)
    files = checkpoint_files(folder)
    checkpoint_identity(folder, files=files)  # every file cached: no read would notice
    shards[0].unlink()
    with pytest.raises(FileNotFoundError):
        checkpoint_identity(folder, files=files)


def test_the_execution_device_is_the_one_accelerate_runs_on():
    from types import SimpleNamespace

    from specsight.models.load import execution_device

    assert execution_device(SimpleNamespace(hf_device_map={"a": "cpu", "b": 0})) == "cuda:0"
    assert execution_device(SimpleNamespace(hf_device_map={"a": "disk", "b": "cpu"})) == "cpu"
    assert execution_device(SimpleNamespace(hf_device_map={"a": "cuda:1"})) == "cuda:1"
