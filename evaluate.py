"""Evaluation of class-conditional AR image models: FID with the bundled FID Inception, FID-cls with
an in-domain classifier, and on the same feature pass KID, precision/recall, Inception Score and
class accuracy; held-out NLL and KL to the teacher; the main job's table.

    python evaluate.py out/varkd/ckpt.pt                  # 10000 samples drawn, FID-cls and friends
    python evaluate.py out/varkd/ckpt.pt --features inception --inception-weights pt_inception-2015-12-05-6726825d.pth
    python evaluate.py samples.npz                        # arr_0: uint8 (N, H, W, C), as ADM and LlamaGen write
    python evaluate.py folder_of_pngs/
    torchrun --nproc_per_node 8 evaluate.py out/varkd/ckpt.pt --tokenizer vq_ds16_c2i.pt --features inception \
        --num-samples 50000 --cfg-scale 2.0 --ref VIRTUAL_imagenet256_labeled.npz     # ImageNet: 50k samples over 8 GPUs

Every figure is named by its features: "FID" with the FID Inception (pytorch-fid's 2015-12-05
weights; the network is in inception.py), "FID-cls" with the shipped classifier, weights/classifier.pt,
a small CNN trained on Fashion-MNIST's training split (classifier.py): FID-cls always means that
classifier, so every machine's figures compare. There is no fallback from one to the other.
Reference features of the real test split (or of --ref's images) are computed once and cached by
fingerprint (<out-dir>/ref/); --ref's mu/sigma are used as they are. Results go to metrics.json
beside the target (under <out-dir>/weights/ for a shipped file).
"""
import argparse
import contextlib
import functools
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from classifier import as_input, load_classifier
from checks import (check_memory, check_output, existing_device, output_lock, positive_int, ranged, read_checkpoint, scale_list,
                    seed_int)
from data import CLASSES, atomic_write, beside, fingerprint, load_fashion_mnist, load_image_folder, parents, save_grid
from inception import InceptionV3, load_inception  # noqa: F401 (re-exported: evaluate.InceptionV3, evaluate.load_inception)
from model import GPTConfig, add_decode_flag, compile_decode, load_checkpoint
from sample import generate, sampling_speed
from tokenizer import load_tokenizer


# ------------------------------------------------------------------------------------------------
# Metrics on features. real/fake are (N, D) arrays; logits (N, K).


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2) (Heusel et al. 2017). With S1 = L L^T
    (Cholesky), S1 S2 has the eigenvalues of the symmetric PSD matrix L^T S2 L, so the trace of the
    square root is the sum of their square roots: no sqrtm (a Schur decomposition, ~13x slower at
    2048-d). A singular S1 (fewer samples than dimensions) takes its symmetric square root instead."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    try:
        root1 = np.linalg.cholesky(sigma1)
    except np.linalg.LinAlgError:
        w, U = np.linalg.eigh(sigma1)
        root1 = (U * np.sqrt(w.clip(0))) @ U.T
    m = root1.T @ sigma2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eig.clip(0)).sum())


def gaussian(feats):
    feats = np.asarray(feats, np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def kid(real, fake, subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 with the cubic kernel
    k(x, y) = (x.y / d + 1)^3, on `subsets` random pairs of subsets. Returns (mean, std)."""
    real, fake = torch.as_tensor(np.asarray(real), dtype=torch.float32), torch.as_tensor(np.asarray(fake), dtype=torch.float32)
    m, d = min(subset_size, len(real), len(fake)), real.shape[1]
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=g)[:m]]
        y = fake[torch.randperm(len(fake), generator=g)[:m]]
        kxx, kyy, kxy = ((a @ b.T / d + 1).double() ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off_diagonal = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        values.append(off_diagonal - 2 * kxy.mean())
    values = torch.stack(values)
    return values.mean().item(), values.std().item()


def precision_recall(real, fake, k=3, batch_size=1000):
    """Improved precision and recall (Kynkaanniemi et al. 2019). A point is inside a set's manifold
    when it is within the distance from some member of the set to that member's k-th nearest
    neighbour. Precision: the fraction of fakes inside the real manifold; recall: of reals inside the fake one."""
    real, fake = torch.as_tensor(np.asarray(real), dtype=torch.float32), torch.as_tensor(np.asarray(fake), dtype=torch.float32)

    def radii(x):  # k + 1: the nearest neighbour of a point in its own set is itself
        return torch.cat([torch.cdist(x[i:i + batch_size], x).kthvalue(k + 1, 1).values
                          for i in range(0, len(x), batch_size)])

    def inside(points, ref, r):
        return torch.cat([(torch.cdist(points[i:i + batch_size], ref) <= r).any(1)
                          for i in range(0, len(points), batch_size)]).float().mean().item()

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def inception_score(logits, splits=10):
    """exp(E_x KL(p(y|x) || p(y))) on each of `splits` parts (Salimans et al. 2016): (mean, std)."""
    logp = torch.as_tensor(np.asarray(logits), dtype=torch.float64).log_softmax(-1)
    # parts of a fixed random permutation: samples saved class by class would give one class per part
    logp = logp[torch.randperm(len(logp), generator=torch.Generator().manual_seed(0))]
    scores = []
    for part in logp.chunk(splits):
        log_py = part.exp().mean(0).log()
        scores.append((part.exp() * (part - log_py)).sum(1).mean().exp())
    scores = torch.stack(scores)
    return scores.mean().item(), (scores.std().item() if len(scores) > 1 else 0.0)


def metrics(real, fake, logits, labels=None, suffix="", real_stats=None):
    """Every figure of one feature pass, each named by its features (suffix "-cls" or ""). With
    real_stats (mu, sigma) from a file, FID uses them; KID and precision/recall need real features."""
    out = {"FID": frechet_distance(*(real_stats or gaussian(real)), *gaussian(fake))}
    if real is not None:
        out["KID"], out["KID_std"] = kid(real, fake)
        out["precision"], out["recall"] = precision_recall(real, fake)
    out["IS"], out["IS_std"] = inception_score(logits)
    if labels is not None:  # does the classifier agree with the class the sample was drawn for
        out["class_acc"] = float((np.asarray(logits).argmax(1) == np.asarray(labels)).mean())
    return {f"{k}{suffix}": v for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# Feature passes, reference statistics, targets.


@torch.no_grad()
def extract(extractor, images, device="cpu", batch_size=200):
    """uint8 images (N, H, W, C) -> features (N, D) and logits (N, K), float32 numpy. Grey images
    are replicated to the Inception's three channels."""
    channels = 3 if isinstance(extractor, InceptionV3) else None
    feats, logits = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="features", leave=False):
        f, z = extractor(as_input(images[i:i + batch_size], channels).to(device), logits=True)
        feats.append(f.float().cpu())
        logits.append(z.float().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


@functools.lru_cache(maxsize=2)  # a table scores every model with the same extractor
def load_extractor(features, data_dir, inception_weights=None, device="cpu"):
    """'cls': the shipped classifier; 'inception': the FID Inception. Fingerprinted, so that
    reference features are cached per extractor."""
    model = load_classifier(data_dir) if features == "cls" else load_inception(inception_weights)
    model.fingerprint = fingerprint(*(v.numpy() for v in model.state_dict().values()))
    return model.to(device)


def reference(extractor, images, cache_dir, device="cpu"):
    """Features of the real images, computed once: cached in cache_dir by the fingerprints of the
    extractor's weights and of the images."""
    path = Path(cache_dir) / f"{fingerprint(extractor.fingerprint, images)}.npz"
    if not path.exists():
        feats, logits = extract(extractor, images, device)
        atomic_write(path, lambda tmp: np.savez(tmp, feats=feats, logits=logits))
    return np.load(path)["feats"]


@torch.no_grad()
def draw(model, tokenizer, n, cfg_scale=2.0, batch_size=500, seed=0, rank=0, world=1, sampler=generate):
    """n class-balanced samples of a checkpoint: uint8 images (n, H, W, C) and their labels (n,);
    under torchrun, this rank's share of them (every world-th, its own random stream). sampler:
    generate() or another with its arguments (bench.py scores speculative samplers' output)."""
    device = next(model.parameters()).device
    check_memory(-(-n // world), (tokenizer.cfg.image_size, tokenizer.cfg.image_size, tokenizer.cfg.in_channels),
                 "--num-samples")
    labels = (torch.arange(n, device=device) % model.config.num_classes)[rank::world]
    g = torch.Generator(device).manual_seed(seed + 1_000_003 * rank)
    grid, images = model.config.grid_size, []
    for i in tqdm(range(0, len(labels), batch_size), desc="sampling", leave=False, disable=rank > 0):
        codes = sampler(model, labels[i:i + batch_size], cfg_scale, generator=g)
        codes = codes.view(-1, grid, grid).to(next(tokenizer.parameters()).device)
        images.append(torch.as_tensor(tokenizer.decode(codes)).cpu())
    return torch.cat(images).numpy(), labels.cpu().numpy()


MIN_SAMPLES = 4  # precision/recall's radius is the distance to the k-th (k = 3) other sample


def read_png(path):
    """One sample PNG -> uint8 (H, W, C), refused in one sentence if unreadable. A palette image is
    read as the colours it shows (grey levels when its palette is grey), 16-bit grey as its top 8
    bits, transparency dropped: the pixels a viewer sees, never the palette's indices."""
    try:
        with Image.open(path) as im:
            if im.mode == "P":
                im = im.convert("RGB")
                a = np.asarray(im)
                a = a[..., :1] if (a == a[..., :1]).all() else a
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = (np.asarray(im).astype(np.int64) >> (16 if im.mode == "I" else 8)).clip(0, 255).astype(np.uint8)
            elif im.mode in ("L", "RGB"):
                a = np.asarray(im)
            elif im.mode in ("1", "LA"):
                a = np.asarray(im.convert("L"))
            elif im.mode in ("RGBA", "CMYK", "YCbCr"):
                a = np.asarray(im.convert("RGB"))
            else:
                raise SystemExit(f"{path} is a PNG of mode {im.mode}: save samples as 8-bit grey (L) or colour (RGB)")
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path} is not a readable PNG ({e}): delete or replace it") from None
    return a[..., None] if a.ndim == 2 else a


def load_target(target, args):
    """A checkpoint (samples drawn at each --cfg-scale), an .npz (arr_0 images, arr_1 labels if
    present) or a folder of PNGs -> [(uint8 images (N, H, W, C), labels or None)], one per scale."""
    path = Path(target)
    if path.is_dir():
        files = sorted(path.glob("*.png"))
        if not files:
            raise SystemExit(f"{path} holds no .png files: pass a folder of PNG samples, an .npz or a checkpoint")
        images = [read_png(f) for f in tqdm(files, desc="reading PNGs")]
        if len({im.shape for im in images}) > 1:
            odd = next(f for f, im in zip(files, images) if im.shape != images[0].shape)
            raise SystemExit(f"{path} holds PNGs of different shapes ({files[0].name} is {images[0].shape}, {odd.name} "
                             f"{images[files.index(odd)].shape}): pass a folder of samples of one size and mode")
        return [(np.stack(images), None)]
    if path.suffix == ".npz":
        try:
            npz = np.load(path)
            images, labels = npz["arr_0"], (npz["arr_1"] if "arr_1" in npz else None)
        except Exception as e:
            raise SystemExit(f"{path} is not an .npz with uint8 images under arr_0 ({e}): save samples with "
                             f"np.savez(path, images) as ADM and LlamaGen do") from None
        if images.ndim not in (3, 4) or (labels is not None and labels.shape != images.shape[:1]):
            raise SystemExit(f"{path} holds images {images.shape} and labels {None if labels is None else labels.shape}: "
                             f"pass images (N, H, W[, C]) under arr_0 and N labels under arr_1")
        return [((images[..., None] if images.ndim == 3 else images), labels)]
    if not path.exists():
        raise SystemExit(f"no {path}: pass a checkpoint, an .npz of uint8 images or a folder of PNGs")
    tokenizer = load_tokenizer(args.tokenizer, image_size=args.image_size).to(args.device)
    model = load_checkpoint(path, args.preset, tokenizer.cfg.grid_size, tokenizer.fingerprint).to(args.device)
    return [draw(compile_decode(model.eval(), args.decode), tokenizer, args.num_samples, scale, seed=args.seed, rank=args.rank, world=args.world)
            for scale in args.cfg_scale]


def reference_stats(ref):
    """--ref's statistics (mu (d,), sigma (d, d), finite) or None, and whether it holds real images."""
    if ref is None:
        return None, False
    if not (Path(ref).is_dir() or (Path(ref).suffix == ".npz" and Path(ref).is_file())):
        raise SystemExit(f"no reference at {ref}: pass an .npz (mu/sigma and/or arr_0 images) or an image folder")
    if Path(ref).is_dir():
        return None, False
    try:
        npz = np.load(ref)
        stats = (npz["mu"], npz["sigma"]) if "mu" in npz and "sigma" in npz else None
        has_images = "arr_0" in npz
    except Exception as e:
        raise SystemExit(f"{ref} is not a readable .npz ({e}): pass reference statistics saved with np.savez") from None
    if stats is None and not has_images:
        raise SystemExit(f"{ref} has neither mu/sigma nor arr_0: pass reference statistics (mu, sigma) or real images")
    if stats is not None and (stats[0].ndim != 1 or stats[1].shape != 2 * stats[0].shape
                              or not all(np.isfinite(s).all() for s in stats)):
        raise SystemExit(f"the reference statistics in {ref} are damaged (mu {stats[0].shape}, sigma {stats[1].shape}, "
                         f"finite: {all(np.isfinite(s).all() for s in stats)}): pass mu (d,) and sigma (d, d), finite")
    return stats, has_images


def reference_images(ref, size, data_dir):
    """The real images to compare with: Fashion-MNIST's test split (ref None), an .npz's arr_0, or
    an image folder with one subfolder per class (e.g. ImageNet's val/, centre-cropped to `size`)."""
    if ref is None:
        return load_fashion_mnist("test", data_dir)[0]
    if Path(ref).is_dir():
        return load_image_folder(ref, size)[0]
    return np.load(ref)["arr_0"]


def evaluate_images(images, labels, features, out_dir, data_dir, inception_weights=None, device="cpu", ref=None):
    """All figures of a set of generated images against real ones: the test split by default, or
    `ref`: an .npz with the reference statistics mu / sigma (ADM's and LlamaGen's reference batches;
    FID and IS then) and/or real images arr_0, or an image folder. Under torchrun every rank passes
    its share; rank 0 gets the figures, the others None."""
    if images.dtype != np.uint8:
        raise SystemExit(f"the images are {images.dtype}, not uint8: pass pixels in 0..255")
    if labels is not None and (not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1 or len(labels) != len(images)):
        raise SystemExit(f"the labels are {labels.dtype} {labels.shape}, not {len(images)} integer class ids: pass one "
                         f"class id per image (arr_1), or none")
    if labels is not None and features == "cls" and len(labels) and not 0 <= labels.min() <= labels.max() < len(CLASSES):
        raise SystemExit(f"the labels run from {labels.min()} to {labels.max()}, the classifier knows classes 0 to "
                         f"{len(CLASSES) - 1}: pass the class ids the samples were drawn for")
    real = reference_images(None, None, data_dir) if ref is None else None  # checked before any feature pass
    stats, has_images = reference_stats(ref)
    if real is not None and images.shape[1:] != real.shape[1:]:
        raise SystemExit(f"the images are {'x'.join(map(str, images.shape[1:]))} but the reference test split is "
                         f"{'x'.join(map(str, real.shape[1:]))}: pass images of the dataset's size")
    extractor = load_extractor(features, data_dir, inception_weights, device)
    feats, logits = extract(extractor, images, device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, (feats, logits, labels))
        if dist.get_rank() > 0:
            return None
        feats, logits = np.concatenate([f for f, _, _ in shares]), np.concatenate([z for _, z, _ in shares])
        labels = None if labels is None else np.concatenate([y for _, _, y in shares])
    if stats is not None and stats[0].shape != feats.shape[1:]:
        raise SystemExit(f"the reference statistics in {ref} are {stats[0].shape[0]}-d, the {features} features "
                         f"{feats.shape[1]}-d: pass --features inception for Inception statistics")
    real_feats = None
    if ref is None or Path(ref).is_dir() or has_images:
        real = real if ref is None else reference_images(ref, images.shape[1], data_dir)
        if images.shape[1:] != real.shape[1:]:
            raise SystemExit(f"the images are {'x'.join(map(str, images.shape[1:]))} but the reference images are "
                             f"{'x'.join(map(str, real.shape[1:]))}: pass images of the dataset's size")
        real_feats = reference(extractor, real, Path(out_dir) / "ref", device)
    suffix = "-cls" if features == "cls" else ""  # every figure is named by its features
    return metrics(real_feats, feats, logits, labels if features == "cls" else None, suffix, stats)


# ------------------------------------------------------------------------------------------------
# The main job's table (distill.py): one line per model, each measured once.

SPEED_BATCHES = (64, 1)  # images per call of the sampling speed: throughput, and one image at a time


@torch.no_grad()
def held_out(model, codes, labels, teacher=None, batch_size=500, by_row=False):
    """Test NLL per code (nats) and, with a teacher, KL(p_T || p_model) per code on the same data
    contexts: how far a student is from what it is taught. by_row: also both per row of the code
    grid, top to bottom (test_nll_rows, test_kl_rows): where in the image a student drifts."""
    was_training = model.training
    model.eval()
    T = codes.shape[1]
    nll, kl = torch.zeros(T, dtype=torch.float64), torch.zeros(T, dtype=torch.float64)  # sums per position
    # the whole test split at 196 codes with a teacher takes minutes on a CPU: a bar, not silence
    for i in tqdm(range(0, len(codes), batch_size), desc="held-out NLL", leave=False, disable=len(codes) <= 4 * batch_size):
        x, y = codes[i:i + batch_size], labels[i:i + batch_size]
        logp = F.log_softmax(model(x, y), -1)  # (B, T, V)
        nll -= logp.gather(-1, x[..., None])[..., 0].sum(0).double().cpu()
        if teacher is not None:
            t_logp = F.log_softmax(teacher(x, y), -1)
            kl += (t_logp.exp() * (t_logp - logp)).sum(-1).sum(0).double().cpu()
    model.train(was_training)
    out = {"test_nll": nll.sum().item() / codes.numel()}
    if teacher is not None:
        out["test_kl"] = kl.sum().item() / codes.numel()
    if by_row:
        grid = model.config.grid_size
        out["test_nll_rows"] = (nll.view(grid, grid).sum(1) / (len(codes) * grid)).tolist()
        if teacher is not None:
            out["test_kl_rows"] = (kl.view(grid, grid).sum(1) / (len(codes) * grid)).tolist()
    return out


def metrics_entries(path):
    """The entries of a metrics.json of ours ({target name: {"key": ..., figures}}), {} if none; a
    foreign or damaged file is refused, never replaced."""
    if not path.exists():
        return {}
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        entries = None
    if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
        raise SystemExit(f"{path} is not a metrics.json of evaluate.py (damaged, or another program's): move it "
                         f"away, it is not overwritten")
    return entries


def save_metrics(target, key, line):
    """metrics.json beside the target holds one entry per target name."""
    path = Path(target).parent / "metrics.json"
    with output_lock(path, "metrics.json"):
        entries = metrics_entries(path)
        entries[Path(target).name] = {"key": key, **line}
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(entries, indent=1)))


def cached_metrics(target, key):
    entry = metrics_entries(Path(target).parent / "metrics.json").get(Path(target).name, {})
    return entry if entry.get("key") == key else None


def held_figures(path, weights_fp, recorded, model, codes, labels, teacher, teacher_fp, out_dir, by_row=False):
    """The held-out figures of the checkpoint at `path` (test_nll, test_kl; per grid row too with
    by_row): those its training run recorded against this teacher (`recorded`: its metrics, {} if
    measured against another), else measured here once and kept in the metrics.json beside it (a
    shipped file's under <out-dir>/weights/). The teacher's KL to itself is 0."""
    at = beside(path, out_dir)
    at = at.with_name(f"{at.name}@held")  # an entry of its own in metrics.json
    key = fingerprint(weights_fp, teacher_fp, by_row)
    cached = cached_metrics(at, key)
    if cached is not None:
        return {k: v for k, v in cached.items() if k != "key"}
    keys = ("test_nll", "test_kl") + (("test_nll_rows", "test_kl_rows") if by_row else ())
    if teacher is not None and weights_fp == teacher_fp:
        recorded = {**recorded, "test_kl": 0.0, "test_kl_rows": [0.0] * model.config.grid_size}
    if all(k in recorded for k in keys) or (teacher is None and "test_nll" in recorded and not by_row):
        return {k: recorded[k] for k in (*keys, "test_nll_rows", "test_kl_rows") if k in recorded}
    held = {**held_out(model, codes, labels, None if weights_fp == teacher_fp else teacher, by_row=by_row),
            **{k: v for k, v in recorded.items() if k in ("test_kl", "test_kl_rows") and weights_fp == teacher_fp}}
    save_metrics(at, key, held)
    return held


def report(path, ckpt, tokenizer, test_codes, test_labels, teacher, teacher_fp, args):
    """The table line of the checkpoint at `path`: its held-out figures (NLL and KL to the teacher;
    per grid row for the study) and, at each guidance scale of args.eval_cfg, the sample figures and
    a grid of samples beside it (<path>.cfg<s>.png: ten per class, the same sampling seed for every
    model). Each is computed once and kept in metrics.json with the fingerprints it was measured with."""
    shadow = beside(path, args.out_dir)  # its samples and metrics.json (out/weights/ for a shipped file)
    weights_fp = ckpt.get("fingerprint") or fingerprint(*(v.numpy() for v in ckpt["model"].values()))
    model = compile_decode(load_checkpoint(path, tokenizer=tokenizer.fingerprint).to(test_codes.device).eval(), args.decode)
    recorded = ckpt["metrics"] if ckpt.get("fingerprints", {}).get("teacher", teacher_fp) == teacher_fp else {}
    line = {"params": sum(p.numel() for p in model.parameters()), "steps": ckpt["step"],
            "wall_time": ckpt["metrics"].get("wall_time", 0.0), "teacher_seqs": ckpt["metrics"].get("teacher_seqs", 0),
            **held_figures(path, weights_fp, recorded, model, test_codes, test_labels, teacher, teacher_fp,
                           args.out_dir, getattr(args, "by_row", False))}  # by_row: the study's drift table
    line["cfg"] = {}
    for scale in args.eval_cfg if args.eval_samples > 0 else []:
        at = shadow.with_name(f"{shadow.name}@cfg{scale:g}")  # an entry of its own in metrics.json
        key = fingerprint(weights_fp, teacher_fp, args.eval_samples, scale, args.seed)
        samples = shadow.with_suffix(f".cfg{scale:g}.png")
        figures = cached_metrics(at, key)
        if figures is None or not samples.exists():
            t0 = time.time()
            images, labels = draw(model, tokenizer, max(args.eval_samples, 10 * model.config.num_classes), scale,
                                  seed=args.seed)
            figures = evaluate_images(images, labels, "cls", args.out_dir, args.data_dir, device=test_codes.device)
            figures.update(eval_time=time.time() - t0, samples=str(samples))
            order = np.argsort(labels[:10 * model.config.num_classes], kind="stable")  # labels cycle the classes
            save_grid(images[order].reshape(model.config.num_classes, 10, *images.shape[1:]), samples)
            save_metrics(at, key, figures)
        line["cfg"][scale] = {k: v for k, v in figures.items() if k != "key" and not k.startswith("img_s")}
    if line["cfg"]:  # each model at its own best scale: one fixed scale is another point of each curve
        best = min(line["cfg"], key=lambda s: line["cfg"][s]["FID-cls"])
        line.update(best_cfg=best, **line["cfg"][best])
    return line


def table(paths, tokenizer, test_codes, test_labels, args):
    """Print the lines of every finished checkpoint in `paths` (duplicates and unfinished runs skipped),
    one per guidance scale; args: teacher, teacher_preset, out_dir, data_dir, eval_samples, eval_cfg
    (a list of scales), seed, device. With two scales or more, <out-dir>/fid_vs_cfg.png plots them."""
    device = torch.device(args.device)
    test_codes, test_labels = test_codes.to(device), test_labels.to(device)
    teacher, teacher_fp = None, ""
    if Path(args.teacher).exists():
        teacher = load_checkpoint(args.teacher, args.teacher_preset, tokenizer.cfg.grid_size, tokenizer.fingerprint)
        teacher, teacher_fp = teacher.to(device), teacher.fingerprint
    if args.eval_samples > 0:
        load_extractor("cls", args.data_dir, None, device)  # refused if missing, before the table
    cols = ("FID-cls", "KID-cls", "precision-cls", "recall-cls", "IS-cls", "class_acc-cls", "img_s_64", "img_s_1")
    print(f"\n{'model':<22} {'params':>7} {'steps':>5} {'NLL':>6} {'KL(T|m)':>7} {'train':>6} {'CFG':>4} {'FID-cls':>7} "
          f"{'KID-cls':>7} {'prec':>5} {'recall':>6} {'IS-cls':>6} {'acc':>5} {'img/s64':>7} {'img/s1':>6}  samples")
    lines, configs = {}, {}
    for path in dict.fromkeys(str(p) for p in paths):
        if not Path(path).exists():
            continue
        ckpt = read_checkpoint(path)
        if "metrics" not in ckpt or ckpt["step"] != ckpt["args"]["max_iters"]:
            continue  # unfinished, or not trained here (a LlamaGen teacher: no figures recorded)
        lines[path] = report(path, ckpt, tokenizer, test_codes, test_labels, teacher, teacher_fp, args)
        configs[path] = GPTConfig(**ckpt["config"])
    # the sampling cost beside the quality: measured here, on this machine, never kept (another
    # machine's figure would be read as this one's), once per architecture for every model of it
    scales = [s for m in lines.values() for s in m["cfg"]]
    speed = sampling_speed(configs, sorted(set(scales)), SPEED_BATCHES, device, args.decode) if scales else {}
    for path, m in lines.items():
        for scale, f in m["cfg"].items():
            f.update({f"img_s_{b}": speed[path, scale, b] for b in SPEED_BATCHES})
        if "best_cfg" in m:
            m.update(m["cfg"][m["best_cfg"]])
    for path, m in lines.items():
        kl = f"{m['test_kl']:.4f}" if "test_kl" in m else "-"
        head = f"{path:<22} {m['params'] / 1e6:>6.2f}M {m['steps']:>5} {m['test_nll']:>6.3f} {kl:>7} {m['wall_time'] / 60:>5.1f}m"
        for i, (scale, f) in enumerate(m["cfg"].items() or [(None, {})]):
            figures = [f"{f[c]:.{d}f}" if c in f else "-" for c, d in zip(cols, (2, 2, 3, 3, 2, 3, 0, 1))]
            print(f"{head if i == 0 else '':<{len(head)}} {'-' if scale is None else f'{scale:g}':>4} " +
                  " ".join(f"{x:>{w}}" for x, w in zip(figures, (7, 7, 5, 6, 6, 5, 7, 6))) + f"  {f.get('samples', '')}")
    print(f"(NLL and KL(teacher || model) in nats per code on the test split; the -cls figures on "
          f"{args.eval_samples} samples at each CFG scale against the test split; train: wall time; img/s: "
          f"images sampled per second at 64 and 1 per call on {args.device}, {torch.get_num_threads()} threads)")
    curves = {Path(p).parent.name if Path(p).name == "ckpt.pt" else Path(p).stem: m["cfg"] for p, m in lines.items()}
    if args.eval_samples > 0 and len(args.eval_cfg) > 1 and curves:
        cfg_plot({n: {s: f["FID-cls"] for s, f in c.items()} for n, c in curves.items()}, Path(args.out_dir) / "fid_vs_cfg.png")
    return lines


def cfg_plot(curves, path, spreads=None, title="FID-cls against classifier-free guidance"):
    """A line per model of {name: {scale: FID-cls}} (and error bars from spreads, the same shape),
    drawn with PIL alone; written atomically to path."""
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    W, H, left, right, top, bottom = 760, 420, 60, 210, 30, 40
    scales = sorted({s for c in curves.values() for s in c})
    values = [v for c in curves.values() for v in c.values()]
    err = [spreads[n][s] for n in curves for s in curves[n]] if spreads else [0.0]
    lo, hi = min(values) - max(err), max(values) + max(err)
    lo, hi = lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9)
    x = lambda s: left + (W - left - right) * (s - scales[0]) / max(scales[-1] - scales[0], 1e-9)
    y = lambda v: top + (H - top - bottom) * (hi - v) / (hi - lo)
    canvas = Image.new("RGB", (W, H), "white")
    pen = ImageDraw.Draw(canvas)
    pen.text((left, 8), title, fill=0)
    pen.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    for s in scales:
        pen.line([x(s), H - bottom, x(s), H - bottom + 4], fill=0)
        pen.text((x(s) - 8, H - bottom + 6), f"{s:g}", fill=0)
    pen.text(((left + W - right) // 2 - 30, H - 16), "CFG scale", fill=0)
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        pen.line([left - 4, y(v), left, y(v)], fill=0)
        pen.text((4, y(v) - 6), f"{v:.1f}", fill=0)
    for i, (name, curve) in enumerate(curves.items()):
        colour = palette[i % len(palette)]
        points = [(x(s), y(curve[s])) for s in sorted(curve)]
        if len(points) > 1:
            pen.line(points, fill=colour, width=2)
        for s, (px, py) in zip(sorted(curve), points):
            pen.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
            if spreads:
                e = spreads[name][s]
                pen.line([px, y(curve[s] + e), px, y(curve[s] - e)], fill=colour)
        ly = top + 14 * i
        pen.line([W - right + 12, ly + 6, W - right + 30, ly + 6], fill=colour, width=2)
        pen.text((W - right + 36, ly), name[:26], fill=0)
    png = io.BytesIO()
    canvas.save(png, format="PNG")
    if not (Path(path).exists() and Path(path).read_bytes() == png.getvalue()):  # a table run again changes nothing
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(png.getvalue()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="a checkpoint, an .npz of uint8 images (arr_0) or a folder of PNGs")
    p.add_argument("--features", default="cls", choices=["cls", "inception"], help="cls: the in-domain "
                   "classifier (FID-cls, offline); inception: the FID Inception (FID) (default: cls)")
    # not --n: torchrun's parser would take it for an abbreviation of one of its own flags
    p.add_argument("--num-samples", type=ranged(int, MIN_SAMPLES), default=10000, help="samples drawn from a checkpoint, "
                   f"class-balanced, split over the ranks under torchrun, >= {MIN_SAMPLES} (default: 10000; ImageNet: 50000)")
    p.add_argument("--cfg-scale", type=scale_list, default="2.0", help="classifier-free guidance of a checkpoint's "
                   "samples, >= 0, as LlamaGen's --cfg-scale; a list (1,1.5,2,3) scores each scale in one call, on "
                   "one reference pass (default: 2.0)")
    p.add_argument("--seed", type=seed_int, default=0, help="sampling seed, >= 0 (default: 0)")
    p.add_argument("--ref", help="real reference: an .npz with mu/sigma (e.g. ADM's VIRTUAL_imagenet256_labeled.npz) "
                   "and/or arr_0 images, or an image folder (default: the Fashion-MNIST test split)")
    p.add_argument("--tokenizer", help="the checkpoint's tokenizer (default: the shipped one, weights/tokenizer.pt; "
                   "with --grid 14, weights/grid14/tokenizer.pt, or <out-dir>/grid14/tokenizer.pt where not shipped)")
    p.add_argument("--grid", type=int, default=7, choices=[7, 14], help="the default --tokenizer: the shipped 7x7 "
                   "one, or the 14x14 one (shipped in weights/grid14/, else what distill.py --grid 14 built) (default: 7)")
    p.add_argument("--preset", help="preset of a checkpoint without a config, e.g. B for LlamaGen's c2i_B_256.pt")
    p.add_argument("--image-size", type=positive_int, help="the tokenizer's image side, e.g. 384 (default: its own)")
    p.add_argument("--out-dir", default="out", help="where reference features are cached (default: out)")
    p.add_argument("--data-dir", default="data", help="Fashion-MNIST folder (default: data, then the Debian package's)")
    p.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth (default: downloaded once)")
    p.add_argument("--save-npz", help="also write the drawn samples here (arr_0 images, arr_1 labels), for "
                   "other evaluators; an existing file needs --force")
    p.add_argument("--force", action="store_true", help="replace an existing --save-npz (never a checkpoint)")
    p.add_argument("--device", type=existing_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="a device this machine has (default: cuda if available)")
    add_decode_flag(p)
    args = p.parse_args(argv)
    args.tokenizer = args.tokenizer or parents(args.grid, args.out_dir)["tokenizer"]
    args.rank, args.world = 0, 1
    if "RANK" in os.environ:  # torchrun: each rank draws and scores its share, rank 0 reports
        cuda = args.device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
        args.rank, args.world = dist.get_rank(), dist.get_world_size()
    if args.save_npz and args.world > 1:
        p.error("--save-npz writes one file from one process: run without torchrun, or drop it")
    if args.save_npz and not args.save_npz.endswith(".npz"):
        p.error(f"--save-npz {args.save_npz}: name it .npz (numpy would add the suffix and write elsewhere)")
    # the outputs, checked before any work
    if args.save_npz:
        if Path(args.save_npz).resolve() == Path(args.target).resolve():
            p.error(f"--save-npz {args.save_npz} is the target itself: pass --save-npz elsewhere")
        check_output(args.save_npz, "--save-npz", args.force, kind="array")
    metrics_json = beside(args.target, args.out_dir).parent / "metrics.json"
    check_output(metrics_json, "the target's")
    metrics_entries(metrics_json)  # a foreign one is refused now, not after the work
    check_output(Path(args.out_dir, "ref", "features.npz"), "--out-dir")
    saved = Path(args.target).is_dir() or Path(args.target).suffix == ".npz"
    if args.save_npz and len(args.cfg_scale) > 1:
        p.error("--save-npz writes the samples of one scale: pass one --cfg-scale with it")
    if saved and len(args.cfg_scale) > 1:
        p.error(f"--cfg-scale {','.join(f'{s:g}' for s in args.cfg_scale)}: saved samples have the scale they were "
                f"drawn with; pass one scale (it is recorded), or a checkpoint to draw at several")
    with output_lock(args.save_npz, "--save-npz") if args.save_npz else contextlib.nullcontext():
        if args.save_npz:  # again, holding the lock: a writer that finished meanwhile left its file
            check_output(args.save_npz, "--save-npz", args.force, kind="array")
        return score(args, saved)


def score(args, saved):
    """evaluate.py's work once its flags and outputs are checked: the target's figures at each scale,
    each kept in metrics.json under the target's name and the settings it was scored with."""
    t0 = time.time()
    drawn = load_target(args.target, args)
    results = {}
    for scale, (images, labels) in zip(args.cfg_scale, drawn):
        n = len(images) if saved else args.num_samples
        if n < MIN_SAMPLES:
            raise SystemExit(f"{args.target} holds {n} images, too few to score: pass at least {MIN_SAMPLES} (FID and "
                             f"friends want thousands)")
        if saved:  # each rank scores its share of saved samples; a checkpoint's are drawn per rank
            images, labels = images[args.rank::args.world], None if labels is None else labels[args.rank::args.world]
        result = evaluate_images(images, labels, args.features, args.out_dir, args.data_dir, args.inception_weights,
                                 args.device, args.ref)
        if args.save_npz:
            atomic_write(args.save_npz, lambda tmp: np.savez(tmp, images, labels))
        if args.rank == 0:
            result["n"], result["cfg_scale"], result["seconds"] = n, scale, time.time() - t0
            key = fingerprint(args.features, result["n"], scale, args.seed, args.ref)
            name = beside(args.target, args.out_dir)
            # one entry per target and setting: another scale, seed or reference is another entry, and
            # none is the main job's table's (<name>@cfg<s>)
            setting = f"{args.features}-cfg{scale:g}-seed{args.seed}-n{n}" + (f"-ref-{Path(args.ref).name}" if args.ref else "")
            save_metrics(name.with_name(f"{name.name}@{setting}"), key, result)
            width = max(map(len, result))
            if len(args.cfg_scale) > 1:
                print(f"\n{args.target} at CFG {scale:g}:")
            for k, v in result.items():
                print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
        results[scale], t0 = result, time.time()
    if dist.is_initialized():
        dist.destroy_process_group()
    return results[args.cfg_scale[0]] if len(args.cfg_scale) == 1 else results


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # metrics.json, the reference features and --save-npz are written atomically
        raise SystemExit("interrupted: nothing was half-written; run the same command again") from None
