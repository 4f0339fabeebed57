"""Evaluation of class-conditional AR image models: held-out NLL per code, KL(teacher || model) on
held-out data, and a sample grid per checkpoint, cached beside it (<ckpt>.json, <ckpt>.png). The
main job (distill.py) prints one table line per model from here.
"""
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from data import atomic_write, fingerprint, save_grid
from model import load_checkpoint
from sample import generate


@torch.no_grad()
def held_out(model, codes, labels, teacher=None, batch_size=500):
    """Test NLL per code (nats) and, with a teacher, KL(p_T || p_model) per code on the same data
    contexts: how far a student is from what it is taught."""
    was_training = model.training
    model.eval()
    nll = kl = 0.0
    for i in range(0, len(codes), batch_size):
        x, y = codes[i:i + batch_size], labels[i:i + batch_size]
        logp = F.log_softmax(model(x, y), -1)  # (B, T, V)
        nll -= logp.gather(-1, x[..., None]).sum().item()
        if teacher is not None:
            kl += F.kl_div(logp, F.log_softmax(teacher(x, y), -1), log_target=True, reduction="sum").item()
    model.train(was_training)
    out = {"test_nll": nll / codes.numel()}
    if teacher is not None:
        out["test_kl"] = kl / codes.numel()
    return out


@torch.no_grad()
def sample_grid(model, tokenizer, path, per_class=10, cfg_scale=2.0, seed=0):
    """One row per class, the same seed for every model so that grids compare at a glance."""
    device = next(model.parameters()).device
    classes = model.config.num_classes
    labels = torch.arange(classes, device=device).repeat_interleave(per_class)
    codes = generate(model, labels, cfg_scale, generator=torch.Generator(device).manual_seed(seed))
    grid = model.config.grid_size
    codes = codes.view(-1, grid, grid).to(next(tokenizer.parameters()).device)
    images = torch.as_tensor(tokenizer.decode(codes)).cpu().numpy()
    save_grid(images.reshape(classes, per_class, *images.shape[1:]), path)


def report(path, tokenizer, test_codes, test_labels, teacher=None, teacher_fp=""):
    """The table line of the checkpoint at `path`, computed once: <path>.json holds it with the
    fingerprints of the weights and of the teacher it was measured against, <path>.png the grid."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    weights_fp = ckpt.get("fingerprint") or fingerprint(*(v.numpy() for v in ckpt["model"].values()))
    key = fingerprint(weights_fp, teacher_fp)
    cache = path.with_suffix(".json")
    if cache.exists() and path.with_suffix(".png").exists():
        line = json.loads(cache.read_text())
        if line.get("key") == key:
            return line
    model = load_checkpoint(path).to(test_codes.device)
    line = {"key": key, "params": sum(p.numel() for p in model.parameters()), "steps": ckpt["step"],
            "wall_time": ckpt["metrics"].get("wall_time", 0.0),
            **held_out(model, test_codes, test_labels, teacher), "samples": str(path.with_suffix(".png"))}
    sample_grid(model, tokenizer, path.with_suffix(".png"))
    atomic_write(cache, lambda tmp: Path(tmp).write_text(json.dumps(line, indent=1)))
    return line


def table(paths, tokenizer, test_codes, test_labels, teacher_path, device="cpu"):
    """Print one line per finished checkpoint in `paths` (duplicates and unfinished runs skipped)."""
    test_codes, test_labels = test_codes.to(device), test_labels.to(device)
    teacher, teacher_fp = None, ""
    if Path(teacher_path).exists():
        teacher = load_checkpoint(teacher_path).to(device)
        teacher_fp = torch.load(teacher_path, map_location="cpu", weights_only=True).get("fingerprint", "")
    print(f"\n{'model':<28} {'params':>8} {'steps':>6} {'test NLL':>9} {'KL(T||m)':>9} {'train min':>9}  samples")
    for path in dict.fromkeys(str(p) for p in paths):
        if not Path(path).exists():
            continue
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("step") != ckpt.get("args", {}).get("max_iters"):
            continue
        line = report(path, tokenizer, test_codes, test_labels, teacher, teacher_fp)
        kl = f"{line['test_kl']:>9.4f}" if "test_kl" in line else f"{'-':>9}"
        print(f"{path:<28} {line['params'] / 1e6:>7.2f}M {line['steps']:>6} {line['test_nll']:>9.4f} {kl} "
              f"{line['wall_time'] / 60:>9.1f}  {line['samples']}")
