"""benchmarks/tools/pack_weights.py: packing is lossless for any length (the 4-byte planes are padded) and shrinks
float32 weights more than compressing their bytes in file order."""
import lzma
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "tools"))
import pack_weights  # noqa: E402


@pytest.mark.parametrize("size", [0, 1, 7, 4096, 10_001])
def test_pack_then_unpack_gives_the_same_bytes(tmp_path, size):
    src, packed, back = tmp_path / "w", tmp_path / "w.bsxz", tmp_path / "w2"
    src.write_bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes())
    back.write_bytes(b"poison")
    pack_weights.pack(str(src), str(packed))
    pack_weights.unpack(str(packed), str(back))
    assert back.read_bytes() == src.read_bytes()
    assert not (tmp_path / "w2.tmp").exists()


def test_pack_and_unpack_create_missing_folders(tmp_path):
    src = tmp_path / "w"
    src.write_bytes(b"weights")
    packed, back = tmp_path / "wgz" / "w.bsxz", tmp_path / "weights" / "deep" / "w"
    pack_weights.pack(str(src), str(packed))
    pack_weights.unpack(str(packed), str(back))
    assert back.read_bytes() == b"weights"


def test_planes_compress_float32_weights_better_than_file_order(tmp_path):
    weights = np.random.default_rng(0).normal(0, 0.05, 50_000).astype(np.float32)
    src, packed = tmp_path / "w", tmp_path / "w.bsxz"
    src.write_bytes(weights.tobytes())
    pack_weights.pack(str(src), str(packed))
    in_file_order = lzma.compress(weights.tobytes(), preset=9 | lzma.PRESET_EXTREME)
    assert os.path.getsize(packed) < 0.97 * len(in_file_order)
