"""Datasets as uint8 image arrays (N, H, W, C) + int64 labels, the token cache, and the data order.

Two sources:
  - Fashion-MNIST: the four official IDX .gz files, looked up in --data-dir (default data/), then
    in /usr/share/datasets/fashion-mnist (Debian: `apt-get install dataset-fashion-mnist`), else
    downloaded from the official mirror with a sha256 check.
  - a folder of images with one subfolder per class (centre crop + resize), e.g. ImageNet's train/.

The token cache stores a split encoded once by a tokenizer: codes (N, h, w) in an .npy (memory
mappable for big sets), labels in a second .npy, and a .json that records the fingerprints of the
tokenizer and the images it was built from. A cache built by another tokenizer is refused.
`prepare_tokens` builds both splits' caches on first use (`python distill.py --prepare` runs it
alone; under torchrun every rank encodes its share of an image folder). The order in which
training reads the cache is a pure function of the step (`batch_indices`), so a resumed run reads
exactly the data an uninterrupted one would.

    python data.py                       # fetch Fashion-MNIST if missing, print what was found
    python data.py --folder path/to/train --image-size 64
"""
import argparse
import functools
import gzip
import hashlib
import json
import os
import shutil
import struct
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from checks import WEIGHTS, atomic_write, fingerprint, positive_int  # noqa: F401 (data.atomic_write, .fingerprint, .WEIGHTS)

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {  # name -> sha256 of the official .gz
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}




def beside(path, out_dir="out"):
    """Where what is computed about a file (its samples, its metrics.json) goes: beside it, or under
    <out_dir>/weights/ for a shipped file (weights/grid14/x.pt: <out_dir>/weights/grid14/x.pt), since
    weights/ holds the shipped files alone."""
    path = Path(path)
    if path.resolve().is_relative_to(WEIGHTS.resolve()):
        return Path(out_dir) / "weights" / path.resolve().relative_to(WEIGHTS.resolve())
    return path


def parents(grid, out_dir="out"):
    """{"tokenizer", "teacher", "student"}: the parents of a Fashion-MNIST code grid, as paths. Each is
    the shipped file (weights/ for 7x7 codes, weights/grid14/ for 14x14) where the repository ships
    it with the shipped tokenizer, else where distill.py builds it in the grid's tree of runs (out_dir
    for 7x7, <out_dir>/grid14/ for 14x14): <tree>/tokenizer.pt, <tree>/teacher.pt, <tree>/ce/ckpt.pt."""
    home = WEIGHTS if grid == 7 else WEIGHTS / f"grid{grid}"
    tree = out_dir if grid == 7 or Path(out_dir).name == f"grid{grid}" else f"{out_dir}/grid{grid}"
    built = {"tokenizer": f"{tree}/tokenizer.pt", "teacher": f"{tree}/teacher.pt", "student": f"{tree}/ce/ckpt.pt"}
    if not (home / "tokenizer.pt").exists():
        return built
    return {k: f"{home}/{k}.pt" if (home / f"{k}.pt").exists() else built[k] for k in built}


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, path, sha256):
    """Download url to path with a progress bar; the file appears only if its sha256 matches."""
    def fetch(tmp):
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                total = int(r.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=Path(path).name) as bar:
                    for chunk in iter(lambda: r.read(1 << 16), b""):
                        f.write(chunk)
                        bar.update(len(chunk))
        except OSError as e:
            raise SystemExit(f"could not download {url} ({e}): check the network, or put the "
                             f"file at {path} yourself") from None
        got = sha256_file(tmp)
        if got != sha256:
            raise SystemExit(f"download of {url} has sha256 {got}, expected {sha256}: the mirror "
                             f"served a wrong or damaged file; try again later or place it at {path}")
    atomic_write(path, fetch)


def read_idx(path, expect_magic):
    """One IDX .gz file -> uint8 array; magic number and sizes checked against the payload."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise SystemExit(f"{path} is missing: run `apt-get install dataset-fashion-mnist` or "
                         f"let data.py download it") from None
    except (IsADirectoryError, PermissionError) as e:  # there, whole, but not readable: fetching it again would not help
        raise SystemExit(f"{path} cannot be read ({e.strerror.lower()}): make it a readable file, or pass --data-dir "
                         f"with the four Fashion-MNIST files") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise SystemExit(f"{path} is truncated or not a gzip file ({e}): delete it and fetch "
                         f"it again") from None
    if len(raw) < 4 or struct.unpack(">I", raw[:4])[0] != expect_magic:
        got = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
        raise SystemExit(f"{path} has magic number {got}, expected {expect_magic}: it is not an "
                         f"IDX {'image' if expect_magic == 2051 else 'label'} file; replace it "
                         f"with the official one")
    ndim = expect_magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SystemExit(f"{path} is truncated inside its header: delete it and fetch it again")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(dims)):
        raise SystemExit(f"{path} holds {len(raw) - header} bytes of data but its header says "
                         f"{dims}: the file is truncated or corrupt; delete it and fetch it again")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def find_fashion_mnist(data_dir="data"):
    """The folder holding the four files: data_dir, else the Debian package's, else download."""
    for d in (Path(data_dir), Path(SYSTEM_DIR)):
        if all((d / name).exists() for name in FASHION_MNIST_FILES):
            return d
    print(f"Fashion-MNIST is not in {data_dir}/ nor {SYSTEM_DIR}: downloading it to {data_dir}/ "
          f"(offline: apt-get install dataset-fashion-mnist)")
    for name, sha in FASHION_MNIST_FILES.items():
        if not (Path(data_dir) / name).exists():
            download(FASHION_MNIST_URL + name, Path(data_dir) / name, sha)
    return Path(data_dir)


def load_fashion_mnist(split="train", data_dir="data"):
    """-> images uint8 (N, 28, 28, 1), labels int64 (N,)."""
    if split not in ("train", "test"):
        raise SystemExit(f"unknown split {split!r}: use 'train' or 'test'")
    d = find_fashion_mnist(data_dir)
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(d / f"{prefix}-images-idx3-ubyte.gz", 2051)
    labels = read_idx(d / f"{prefix}-labels-idx1-ubyte.gz", 2049)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise SystemExit(f"{d}/{prefix}-*: {images.shape} images but {labels.shape} labels: the "
                         f"files come from different sets; fetch both again")
    if labels.size and labels.max() >= len(CLASSES):
        raise SystemExit(f"{d}/{prefix}-labels-idx1-ubyte.gz has label {labels.max()}, Fashion-MNIST "
                         f"has {len(CLASSES)} classes: replace it with the official file")
    return images[..., None].copy(), labels.astype(np.int64)


def image_folder_files(root):
    """A folder with one subfolder per class -> (paths, labels int64, class names)."""
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"image folder {root} does not exist: pass a folder with one subfolder "
                         f"of images per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"image folder {root} has no class subfolders: put each class's images "
                         f"in a subfolder named after the class")
    paths, labels = [], []
    for i, c in enumerate(classes):
        files = sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise SystemExit(f"class folder {root / c} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}): "
                             f"add images or remove the folder")
        paths += files
        labels += [i] * len(files)
    return paths, np.array(labels, np.int64), classes


def load_image(path, size, channels=3):
    """One image file -> uint8 (size, size, channels) as ADM and LlamaGen crop: halve with a box
    filter while the short side is at least 2 x size, resize it to size (bicubic), crop the centre."""
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            while min(im.size) >= 2 * size:
                im = im.resize(tuple(x // 2 for x in im.size), Image.BOX)
            scale = size / min(im.size)
            im = im.resize(tuple(max(size, round(x * scale)) for x in im.size), Image.BICUBIC)
            left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
            a = np.asarray(im.crop((left, top, left + size, top + size)), np.uint8)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path} is not a readable image ({e}): delete or replace it") from None
    return a.reshape(size, size, channels)


def load_image_folder(root, size, channels=3):
    """-> images uint8 (N, size, size, channels), labels int64 (N,), class names."""
    paths, labels, classes = image_folder_files(root)
    images = np.stack([load_image(p, size, channels) for p in tqdm(paths, desc=f"reading {root}")])
    return images, labels, classes


def save_grid(images, path, pad=2):
    """uint8 (rows, cols, H, W, C) -> one PNG, written atomically."""
    images = np.asarray(images)
    R, C, H, W, ch = images.shape
    grid = np.full((R * (H + pad) + pad, C * (W + pad) + pad, ch), 255, np.uint8)
    for r in range(R):
        for c in range(C):
            y, x = pad + r * (H + pad), pad + c * (W + pad)
            grid[y:y + H, x:x + W] = images[r, c]
    im = Image.fromarray(grid[..., 0] if ch == 1 else grid)
    atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))


def token_cache(prefix, images, labels, encode, tokenizer_fingerprint, batch_size=500):
    """Codes of a split, encoded once: <prefix>.codes.npy (N, h, w), <prefix>.labels.npy, and
    <prefix>.json with the fingerprints. Returns (codes, labels, fingerprint of the images); reuses a matching cache and
    refuses one built by another tokenizer or from other images."""
    prefix = Path(prefix)
    data_fp = fingerprint(images, labels)
    if cached(prefix, tokenizer_fingerprint, data_fp):
        return (*load_cache(prefix), data_fp)
    codes = np.concatenate([encode(images[i:i + batch_size]) for i in
                            tqdm(range(0, len(images), batch_size), desc=f"encoding {prefix.name}")])
    codes = codes.astype(np.int16 if codes.max() < 2 ** 15 else np.int32)
    atomic_write(f"{prefix}.codes.npy", lambda tmp: np.save(tmp, codes))
    finish_cache(prefix, labels, tokenizer_fingerprint, data_fp, codes.shape)
    return codes, labels, data_fp


def cached(prefix, tokenizer_fingerprint, data_fp):
    """True when the cache at prefix is complete and was built by this tokenizer from these images."""
    meta_path = Path(prefix).with_suffix(".json")
    if not meta_path.exists():
        return False
    try:
        meta = json.loads(meta_path.read_text())
        meta["tokenizer"], meta["data"], meta["shape"]
    except (OSError, ValueError, TypeError, KeyError):
        raise SystemExit(f"token cache {meta_path} is damaged or not ours: delete {prefix}.* to rebuild it") from None
    if meta["tokenizer"] != tokenizer_fingerprint:
        raise SystemExit(f"token cache {meta_path} was built by tokenizer {meta['tokenizer']}, "
                         f"not by this one ({tokenizer_fingerprint}): delete {prefix}.* to "
                         f"rebuild it, or pass the tokenizer it was built with")
    if meta["data"] != data_fp:
        raise SystemExit(f"token cache {meta_path} was built from other images (data "
                         f"{meta['data']}, now {data_fp}): delete {prefix}.* to rebuild it")
    return True


def load_cache(prefix):
    """The codes (memory-mapped) and labels of a complete cache, refused in one sentence if damaged."""
    meta = json.loads(Path(prefix).with_suffix(".json").read_text())
    try:
        codes, labels = np.load(f"{prefix}.codes.npy", mmap_mode="r"), np.load(f"{prefix}.labels.npy")
    except (OSError, ValueError, EOFError) as e:
        raise SystemExit(f"token cache {prefix}.* is damaged ({e}): delete {prefix}.* to rebuild it") from None
    if list(codes.shape) != meta["shape"] or labels.shape != codes.shape[:1]:
        raise SystemExit(f"token cache {prefix}.* is damaged (codes {codes.shape}, labels {labels.shape}, recorded "
                         f"{meta['shape']}): delete {prefix}.* to rebuild it")
    if not (np.issubdtype(codes.dtype, np.integer) and np.issubdtype(labels.dtype, np.integer)):
        raise SystemExit(f"token cache {prefix}.* holds codes of {codes.dtype} and labels of {labels.dtype}, not "
                         f"integers: delete {prefix}.* to rebuild it")
    # what was written, codes and labels alike (a cache from before this check has no "content")
    if meta.get("content", fingerprint(codes, labels)) != fingerprint(codes, labels):
        raise SystemExit(f"token cache {prefix}.* changed after it was built: its codes or labels no longer match "
                         f"their fingerprint {meta['content']}; delete {prefix}.* to rebuild it")
    return codes, labels


def finish_cache(prefix, labels, tokenizer_fingerprint, data_fp, shape):
    atomic_write(f"{prefix}.labels.npy", lambda tmp: np.save(tmp, labels))
    codes = np.load(f"{prefix}.codes.npy", mmap_mode="r")
    # the .json goes last: it marks the cache complete, and records what it holds
    meta = {"tokenizer": tokenizer_fingerprint, "data": data_fp, "shape": list(shape),
            "content": fingerprint(codes, labels)}
    atomic_write(Path(prefix).with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))


def load_batch(paths, size):
    return np.stack([load_image(p, size) for p in paths])


def folder_token_cache(prefix, root, size, encode, tokenizer_fingerprint, rank=0, world=1, chunk=1024,
                       batch_size=64, workers=min(8, os.cpu_count() or 1)):
    """An image folder (one subfolder per class, e.g. ImageNet's train/) encoded once as LlamaGen
    extracts it: the centre crop and its horizontal flip, two rows of codes per image (image i's
    at rows 2i, 2i + 1). Every rank calls it and encodes its chunks (encode_chunks); rank 0 then
    merges them into token_cache's format. Returns (codes, labels, data fingerprint) on every rank.
    encode: uint8 images (B, H, W, 3) -> codes (B, h, w)."""
    prefix, root = Path(prefix), Path(root)
    paths, labels, _ = image_folder_files(root)
    data_fp = fingerprint([str(p.relative_to(root)) for p in paths], labels, size)
    if not cached(prefix, tokenizer_fingerprint, data_fp):
        parts = Path(f"{prefix}.parts")
        stamp, mine = parts / "built_from.json", {"tokenizer": tokenizer_fingerprint, "data": data_fp}
        if stamp.exists() and json.loads(stamp.read_text()) != mine:
            raise SystemExit(f"{parts} holds chunks encoded by another tokenizer or from other images: "
                             f"delete it to start the extraction again")
        if rank == 0:
            atomic_write(stamp, lambda tmp: Path(tmp).write_text(json.dumps(mine)))
        encode_chunks(parts, paths, size, encode, rank, world, chunk, batch_size, workers)
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            chunks = [np.load(parts / f"{k:06d}.npy", mmap_mode="r") for k in range(-(-len(paths) // chunk))]
            shape = (2 * len(paths), *chunks[0].shape[1:])

            def merge(tmp):
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.result_type(*chunks), shape=shape)
                for k, c in enumerate(chunks):
                    out[2 * k * chunk:2 * k * chunk + len(c)] = c
                out.flush()
            atomic_write(f"{prefix}.codes.npy", merge)
            finish_cache(prefix, np.repeat(labels, 2), tokenizer_fingerprint, data_fp, shape)
            shutil.rmtree(parts)
    if dist.is_initialized():
        dist.barrier()
    return (*load_cache(prefix), data_fp)


def encode_chunks(parts, paths, size, encode, rank=0, world=1, chunk=1024, batch_size=64, workers=0):
    """Rank `rank`'s share of the extraction: chunk k (images k * chunk ...) belongs to rank k % world
    and is saved to parts/<k>.npy the moment its last batch is encoded, so a killed extraction
    resumes at the chunks it lacks, with any number of ranks. Images are read by `workers` processes."""
    parts = Path(parts)
    parts.mkdir(parents=True, exist_ok=True)
    todo = [k for k in range(rank, -(-len(paths) // chunk), world) if not (parts / f"{k:06d}.npy").exists()]
    # batches never straddle two chunks
    batches = [list(range(i, min(i + batch_size, (k + 1) * chunk, len(paths))))
               for k in todo for i in range(k * chunk, min((k + 1) * chunk, len(paths)), batch_size)]
    loader = torch.utils.data.DataLoader(paths, batch_sampler=batches, num_workers=workers,
                                         collate_fn=functools.partial(load_batch, size=size))
    done = []
    with tqdm(total=sum(map(len, batches)), unit="img", desc=f"encoding (rank {rank})", disable=not batches) as bar:
        for idx, images in zip(batches, loader):
            codes = np.asarray(encode(np.concatenate([images, images[:, :, ::-1]])))  # crops, then flips
            done.append(np.stack([codes[:len(images)], codes[len(images):]], 1).reshape(-1, *codes.shape[1:]))
            bar.update(len(images))
            k = idx[0] // chunk
            if idx[-1] + 1 in ((k + 1) * chunk, len(paths)):
                chunk_codes = np.concatenate(done)
                chunk_codes = chunk_codes.astype(np.int16 if chunk_codes.max() < 2 ** 15 else np.int32)
                atomic_write(parts / f"{k:06d}.npy", lambda tmp: np.save(tmp, chunk_codes))
                done = []
    return todo


def prepare_tokens(tokenizer, data_dir, cache_dir, rank=0, world=1, flip=False):
    """The train/test token caches of `tokenizer` under cache_dir, built on first use: Fashion-MNIST
    (called by rank 0 alone), or an image folder with train/ (and val/) encoded over every rank.
    flip: Fashion-MNIST's training split also as mirror images, two rows per image as an image
    folder's (train_flip.*); the test split is never flipped.
    Returns {split: (codes (N, T), labels (N,), data fingerprint)}; the training codes stay int16
    (ImageNet: 2.6M sequences x 256 codes) and are cast per batch."""
    folder = Path(data_dir, "train").is_dir()
    encode = lambda x: tokenizer.encode(x).cpu().numpy()  # noqa: E731
    splits = {}
    for split in ("train", "test"):
        prefix = Path(cache_dir) / ("train_flip" if split == "train" and flip and not folder else split)
        if not prefix.with_suffix(".json").exists() and rank == 0:
            print(f"no token cache at {prefix}.*: encoding the {split} split once")
        if folder:
            root = Path(data_dir, "train" if split == "train" or not Path(data_dir, "val").is_dir() else "val")
            if split == "test" and root.name == "train" and rank == 0:
                print(f"no {data_dir}/val/: the held-out figures are measured on 10,000 training sequences")
            codes, labels, data_fp = folder_token_cache(prefix.with_name(root.name), root, tokenizer.cfg.image_size,
                                                        encode, tokenizer.fingerprint, rank, world)
            if split == "test" and root.name == "train":
                codes, labels = codes[:10000], labels[:10000]
        else:
            images, labels = load_fashion_mnist(split, data_dir)
            if split == "train" and flip:  # rows 2i, 2i + 1: image i and its mirror image
                images, labels = np.stack([images, images[:, :, ::-1]], 1).reshape(-1, *images.shape[1:]), labels.repeat(2)
            codes, labels, data_fp = token_cache(prefix, images, labels, encode, tokenizer.fingerprint)
        classes = (sum(p.is_dir() for p in root.iterdir()) if folder else len(CLASSES))
        for what, values, top in (("codes", codes, tokenizer.cfg.codebook_size), ("labels", labels, classes)):
            if len(values) and not 0 <= values.min() <= values.max() < top:
                raise SystemExit(f"token cache {prefix}.* holds {what} from {values.min()} to {values.max()}, outside "
                                 f"0..{top - 1}: delete {prefix}.* to rebuild it")
        codes = torch.from_numpy(np.array(codes).reshape(len(codes), -1))
        splits[split] = (codes if split == "train" else codes.long(), torch.from_numpy(np.asarray(labels)), data_fp)
    return splits


@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(step, n, batch_size, seed):
    """Batch number `step` of an endless stream of shuffled epochs: a pure function of the step,
    so a resumed run reads exactly the data an uninterrupted one would."""
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    return torch.cat([epoch_order(n, seed, int(e))[pos[pos // n == e] % n] for e in (pos // n).unique()])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data", help="where Fashion-MNIST's .gz files are looked for "
                   "first and downloaded to (default: data)")
    p.add_argument("--folder", help="instead, read a folder of images with one subfolder per class")
    p.add_argument("--image-size", type=positive_int, default=64, help="with --folder: side in pixels after "
                   "centre crop and resize, >= 1 (default: 64)")
    args = p.parse_args(argv)
    if args.folder:
        images, labels, classes = load_image_folder(args.folder, args.image_size)
        print(f"{args.folder}: {images.shape} uint8, {len(classes)} classes")
        return
    print(f"Fashion-MNIST found in {find_fashion_mnist(args.data_dir)}")
    for split in ("train", "test"):
        images, labels = load_fashion_mnist(split, args.data_dir)
        print(f"{split}: images {images.shape} {images.dtype}, labels {labels.shape}, "
              f"per class {np.bincount(labels).tolist()}")


if __name__ == "__main__":
    main()
