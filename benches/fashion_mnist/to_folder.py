"""Fashion-MNIST (Debian's dataset-fashion-mnist: IDX files) to an ImageNet-style folder of
greyscale PNGs that `shardtool pack` takes: OUT/train/<class>/<n>.png, OUT/val/<class>/<n>.png
(the test split becomes val). Standard library only.

    python3 to_folder.py OUT [--train N] [--val N]   # first N of each split; all by default
"""
import argparse
import gzip
import os
import struct
import zlib

SRC = "/usr/share/datasets/fashion-mnist"
CLASSES = ["0-tshirt", "1-trouser", "2-pullover", "3-dress", "4-coat",
           "5-sandal", "6-shirt", "7-sneaker", "8-bag", "9-boot"]


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, count = struct.unpack(">II", data[:8])
    if magic == 2051:  # images
        rows, cols = struct.unpack(">II", data[8:16])
        size = rows * cols
        return [data[16 + i * size:16 + (i + 1) * size] for i in range(count)], (rows, cols)
    if magic == 2049:  # labels
        return list(data[8:8 + count]), None
    raise SystemExit(f"{path}: not an IDX file (magic {magic})")


def png(pixels, rows, cols):
    raw = b"".join(b"\x00" + pixels[r * cols:(r + 1) * cols] for r in range(rows))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", cols, rows, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=None, help="first N training images (default: all 60,000)")
    ap.add_argument("--val", type=int, default=None, help="first N test images (default: all 10,000)")
    args = ap.parse_args()
    if not os.path.isdir(SRC):
        raise SystemExit(f"{SRC} is missing: apt-get install dataset-fashion-mnist")
    for split, prefix, limit in [("train", "train", args.train), ("val", "t10k", args.val)]:
        images, (rows, cols) = read_idx(f"{SRC}/{prefix}-images-idx3-ubyte.gz")
        labels, _ = read_idx(f"{SRC}/{prefix}-labels-idx1-ubyte.gz")
        n = len(images) if limit is None else min(limit, len(images))
        for c in CLASSES:
            os.makedirs(f"{args.out}/{split}/{c}", exist_ok=True)
        for i in range(n):
            with open(f"{args.out}/{split}/{CLASSES[labels[i]]}/{i:05d}.png", "wb") as f:
                f.write(png(images[i], rows, cols))
        print(f"{split}: {n} images")


if __name__ == "__main__":
    main()
