"""Pack a weights file small enough to travel in the device tool's 64 MiB carry, and unpack it there.

Float32 weights barely compress byte by byte (gzip: 18.3 -> 17.3 MB for EfficientNet-Lite0), but their bytes of
equal rank (sign/exponent, high and low mantissa) do: grouping them into four planes before xz gives 15.8 MB,
which is what lets the PACS images, the weights and the repository travel in one call. Lossless for any file.

    python benchmarks/tools/pack_weights.py pack .data/weights/F.pth .data/wgz/F.pth.bsxz
    python benchmarks/tools/pack_weights.py unpack .data/wgz/F.pth.bsxz .data/weights/F.pth
"""
import argparse
import lzma
import os

import numpy as np

_PLANES = 4
_HEADER = 8  # the original length, little-endian, so the padding to a multiple of 4 bytes can be dropped


def pack(src: str, dst: str) -> None:
    """Write ``src`` byte-plane shuffled and xz-compressed to ``dst``."""
    raw = np.fromfile(src, dtype=np.uint8)
    padded = np.concatenate([raw, np.zeros(-raw.size % _PLANES, np.uint8)])
    planes = padded.reshape(-1, _PLANES).T.tobytes()
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    with open(dst, "wb") as f:
        f.write(lzma.compress(raw.size.to_bytes(_HEADER, "little") + planes, preset=9 | lzma.PRESET_EXTREME))


def unpack(src: str, dst: str) -> None:
    """Invert :func:`pack`; writes through a temporary file so an interrupted unpack leaves no partial ``dst``."""
    with open(src, "rb") as f:
        data = lzma.decompress(f.read())
    size = int.from_bytes(data[:_HEADER], "little")
    planes = np.frombuffer(data, dtype=np.uint8, offset=_HEADER).reshape(_PLANES, -1)
    tmp = dst + ".tmp"
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(planes.T.tobytes()[:size])
    os.replace(tmp, dst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["pack", "unpack"])
    parser.add_argument("src")
    parser.add_argument("dst")
    args = parser.parse_args()
    (pack if args.action == "pack" else unpack)(args.src, args.dst)


if __name__ == "__main__":
    main()
