"""The in-domain classifier behind FID-cls: a small CNN trained on Fashion-MNIST's training split,
shipped as weights/classifier.pt, so that FID-cls means the same network on every machine.

    python classifier.py --out weights/classifier.pt     # rebuilds the shipped one: 8 epochs, ~12 min on 2 CPU cores

evaluate.py takes its 128-d penultimate layer as the FID-cls feature (as the FID Inception's pool
layer gives FID's), and its softmax for IS-cls and class accuracy.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from checks import check_output, integrity, output_lock, positive_int, read_checkpoint, weights_fingerprint
from data import WEIGHTS, atomic_write, fingerprint, load_fashion_mnist


CLASSIFIER = WEIGHTS / "classifier.pt"
EPOCHS = 8  # the shipped classifier's: test accuracy 91.9% after 2, 92.6% after 4, 93.0% after 8 (RESULTS.md)


class Classifier(nn.Module):
    """Three conv blocks (two of them halving the side), then a 128-d layer on the flattened map:
    its output is the FID-cls feature, a linear head gives the class logits. forward(x, logits=False)
    takes floats (N, C, H, W) in [0, 1], as InceptionV3 does."""

    def __init__(self, in_channels=1, num_classes=10, image_size=28, width=32):
        super().__init__()
        blocks, c = [], in_channels
        for i, out in enumerate((width, 2 * width, 4 * width)):
            blocks += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            blocks += [nn.MaxPool2d(2)] if i < 2 else []
            c = out
        side = image_size // 4  # a flattened map keeps where things are: garments differ by shape
        self.features = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(c * side * side, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x, logits=False):
        f = self.features(x * 2 - 1)
        return (f, self.head(f)) if logits else f


def as_input(images, channels=None):
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [0, 1]; grey replicated when channels=3."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255
    return x.expand(-1, 3, -1, -1) if channels == 3 and x.shape[1] == 1 else x


def train_classifier(images, labels, test_images, test_labels, epochs=EPOCHS, batch_size=128, lr=2e-3, seed=0):
    """AdamW with a one-cycle schedule; returns (model, test accuracy)."""
    torch.manual_seed(seed)
    model = Classifier(images.shape[-1], int(labels.max()) + 1, images.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * (len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels)
    model.train()
    for step in (bar := tqdm(range(steps), desc="classifier")):
        idx = torch.randint(len(images), (batch_size,), generator=g)
        x = as_input(images[idx.numpy()])
        loss = F.cross_entropy(model(x, logits=True)[1], labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model, accuracy(model.eval(), test_images, test_labels)


@torch.no_grad()
def accuracy(model, images, labels, batch_size=500):
    logits = torch.cat([model(as_input(images[i:i + batch_size]), logits=True)[1] for i in range(0, len(images), batch_size)])
    return float((logits.argmax(1).numpy() == np.asarray(labels)).mean())


def build(path, data_dir="data", epochs=EPOCHS):
    """Train the FID-cls classifier on Fashion-MNIST's training split and save it to path, with its
    test accuracy and the fingerprint of its training data. Never replaces an existing file."""
    if Path(path).exists():
        raise SystemExit(f"{path} exists: FID-cls figures are tied to it; delete it first to rebuild it")
    train_images, train_labels = load_fashion_mnist("train", data_dir)
    test_images, test_labels = load_fashion_mnist("test", data_dir)
    t0 = time.time()
    model, acc = train_classifier(train_images, train_labels, test_images, test_labels, epochs)
    print(f"classifier: test accuracy {acc:.4f} after {epochs} epochs ({(time.time() - t0) / 60:.1f} min)")
    state = {"model": model.state_dict(), "in_channels": train_images.shape[-1], "image_size": train_images.shape[1],
             "num_classes": int(train_labels.max()) + 1, "data": fingerprint(train_images, train_labels),
             "test_accuracy": acc, "epochs": epochs, "fingerprint": weights_fingerprint(model.state_dict())}
    state["integrity"] = integrity(state)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_classifier(data_dir, path=CLASSIFIER):
    """The FID-cls classifier (the shipped one by default), refused if the data it was trained on differ."""
    if not Path(path).exists():
        raise SystemExit(f"no classifier at {path}: FID-cls is measured with the shipped one; restore it with "
                         f"`git checkout {path}` or rebuild it with `python classifier.py --out {path}`")
    train_images, train_labels = load_fashion_mnist("train", data_dir)
    data_fp = fingerprint(train_images, train_labels)
    ckpt = read_checkpoint(path, "classifier", f"restore it with `git checkout {path}`")
    if ckpt.get("data") != data_fp:
        raise SystemExit(f"{path} was trained on other data ({ckpt['data']}, now {data_fp}): delete it to retrain it")
    model = Classifier(ckpt["in_channels"], ckpt["num_classes"], ckpt["image_size"])
    model.load_state_dict(ckpt["model"])
    return model.eval().requires_grad_(False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where to save it, e.g. weights/classifier.pt (an existing file "
                   "is refused: FID-cls figures are tied to it)")
    p.add_argument("--epochs", type=positive_int, default=EPOCHS, help=f"epochs, one-cycle schedule, >= 1 (default: "
                   f"{EPOCHS}, the shipped one's)")
    p.add_argument("--data-dir", default="data", help="Fashion-MNIST folder (default: data, then the Debian package's)")
    args = p.parse_args(argv)
    check_output(args.out, "--out")  # before the training: writable, a file's place
    with output_lock(args.out):
        build(args.out, args.data_dir, args.epochs)


if __name__ == "__main__":
    main()
