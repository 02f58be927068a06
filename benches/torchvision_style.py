"""The CPU data path a PyTorch user runs for MimCo stage 2, without PyTorch itself.

torchvision's ImageFolder + RandomResizedCrop(224, scale=(0.67, 1)) + RandomHorizontalFlip
+ ToTensor + Normalize, in a DataLoader with N worker processes, does per image: PIL
decode (full size), PIL crop + bilinear resize with antialiasing, flip, conversion to
float32 CHW in [0, 1], normalisation, and a copy of the batch back to the main process.
This script does the same operations with Pillow and NumPy in a multiprocessing pool
(PyTorch's CPU wheels are not on PyPI, only the multi-GB CUDA ones). The crop sampling
is torchvision's rule, written out below.

    python benches/torchvision_style.py IMAGE_FOLDER --workers N [--batch 128] [--limit M]
"""

import argparse
import math
import multiprocessing as mp
import os
import random
import time

import numpy as np
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)


def rrc_params(width, height, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision.transforms.RandomResizedCrop.get_params."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return random.randint(0, height - h), random.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def load(path, size=224):
    with open(path, "rb") as f:
        img = Image.open(f).convert("RGB")
    i, j, h, w = rrc_params(*img.size)
    img = img.resize((size, size), Image.BILINEAR, box=(j, i, j + w, i + h))
    if random.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return (x - MEAN) / STD


def load_batch(paths):
    return np.stack([load(p) for p in paths])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--decode-only", action="store_true", help="one process, PIL (libjpeg-turbo) full-size decode only")
    args = ap.parse_args()
    paths = sorted(
        os.path.join(d, f) for d, _, fs in os.walk(args.folder) for f in fs if f.upper().endswith(".JPEG")
    )
    random.seed(0)
    random.shuffle(paths)
    if args.limit:
        paths = paths[: args.limit]
    if args.decode_only:
        start = time.perf_counter()
        for p in paths:
            with open(p, "rb") as f:
                Image.open(f).convert("RGB")
        secs = time.perf_counter() - start
        print(f"PIL (libjpeg-turbo {Image.core.libjpeg_turbo_version}) decode-only, 1 thread: {len(paths) / secs:.0f} images/s")
        return
    batches = [paths[i : i + args.batch] for i in range(0, len(paths), args.batch)]
    start = time.perf_counter()
    n = 0
    with mp.Pool(args.workers) as pool:
        for b in pool.imap(load_batch, batches):
            n += len(b)
    secs = time.perf_counter() - start
    print(f"python: {n} images in {secs:.2f} s = {n / secs:.0f} images/s with {args.workers} workers "
          f"({n / secs / args.workers:.0f} per worker)")


if __name__ == "__main__":
    main()
