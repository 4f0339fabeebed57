"""
Sampling from a GPT: classifier-free guidance, temperature, top-k, top-p, with or without KV cache;
mixed rollouts (a real prefix, the model's continuation; sequential or ZipAR's parallel rows), the
contexts of on-policy KD and VarKD; writes a PNG grid with one row per class.

    python sample.py --ckpt out/teacher.pt                    # -> out/teacher_samples.png
    python sample.py --ckpt c2i_B_256.pt --preset B --tokenizer vq_ds16_c2i.pt --classes 207,360,387
"""
import argparse
import time
from pathlib import Path

import torch

from data import save_grid
from model import PRESETS, load_checkpoint
from tokenizer import load_tokenizer


def filtered_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """logits (B, V) -> next-code probabilities (B, V) after temperature, then top-k, then top-p.

    temperature 0 is greedy: a one-hot on the argmax. top_k 0 and top_p 1 switch those filters off.
    """
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits.float() / temperature
    if top_k > 0:
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)  # (B, V)
        # drop a code once the codes ranked above it already hold more than top_p of the mass
        # (the nucleus of Holtzman et al.); the most likely code is always kept
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_logits(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """logits (B, V) -> sampled codes (B,) long."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filtered_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, labels, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, generator=None,
             kv_cache=True):
    """labels (B,) long -> codes (B, T) long, one code at a time in raster order.

    With cfg_scale != 1 (classifier-free guidance, as LlamaGen) the batch is doubled: conditional
    rows first, null-class rows second, and the logits are mixed as uncond + s * (cond - uncond)
    before temperature and filtering; the code sampled from the mix is fed to both halves.
    kv_cache=False recomputes the whole prefix at each step with forward(): slow, the reference.
    """
    config = model.config
    B, T = labels.shape[0], config.block_size
    guided = cfg_scale != 1.0
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, config.num_classes)])  # (2B,)
    both = (lambda x: torch.cat([x, x])) if guided else (lambda x: x)
    codes = torch.zeros(B, T, dtype=torch.long, device=labels.device)  # (B, T), filled left to right
    was_training = model.training
    model.eval()
    try:
        if kv_cache:
            model.setup_cache(labels.shape[0])
            logits = model.prefill(labels, labels.new_zeros(len(labels), 0))[:, -1]  # (B or 2B, V)
        for t in range(T):
            if not kv_cache:
                # forward() takes codes 0..t and predicts each; code t is a dummy (still 0) whose
                # own logits are the ones needed
                logits = model(both(codes[:, : t + 1]), labels)[:, t]
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + cfg_scale * (cond - uncond)
            codes[:, t] = sample_logits(logits, temperature, top_k, top_p, generator)
            if kv_cache and t + 1 < T:
                logits = model.decode(both(codes[:, t : t + 1]), t)[:, -1]
    finally:
        if kv_cache:
            model.clear_cache()
        model.train(was_training)
    return codes


# ------------------------------------------------------------------------------------------------
# Mixed rollouts, the contexts of on-policy KD and VarKD (distill.py): a real prefix, the student's
# continuation. Sequential, or ZipAR's parallel rows.


def zipar_schedule(grid, start, window):
    """ZipAR (He et al. 2024): code (r, c) waits only for its left neighbour and for (r-1, c+window),
    not for the end of row r-1, so several rows are decoded at once (spatial locality). Returns
    lists of code indices (>= start), one list per decoding step."""
    step = {}
    for p in range(start, grid * grid):
        r, c = divmod(p, grid)
        after_left = step.get(p - 1, -1) if c > 0 else -1
        above = (r - 1) * grid + min(c + window, grid - 1)
        after_above = step.get(above, -1) if r > 0 else -1
        step[p] = max(after_left, after_above) + 1
    order = [[] for _ in range(max(step.values(), default=-1) + 1)]
    for p, s in step.items():
        order[s].append(p)
    return order


@torch.no_grad()
def mixed_rollout(student, codes, labels, prefix_frac=(0.25, 0.75), generator=None, window=0):
    """Keep the first k codes of each real sequence, k ~ U[prefix_frac * T] per example; the student
    samples the rest (KV cache, temperature 1, no CFG). Returns the codes (B, T) and a mask (B, T),
    True at the student-sampled positions. window > 0: ZipAR-style parallel decoding of rows."""
    B, T = codes.shape
    lo, hi = int(prefix_frac[0] * T), int(prefix_frac[1] * T)
    k = torch.randint(lo, hi + 1, (B,), generator=generator, device=codes.device)  # (B,)
    mask = torch.arange(T, device=codes.device)[None, :] >= k[:, None]  # (B, T)
    out = codes.clone()
    was_training = student.training
    student.eval()
    student.setup_cache(B)
    grid = student.config.grid_size
    steps = zipar_schedule(grid, lo, window) if window else [[p] for p in range(lo, T)]
    # the prefix every example shares goes in at once; the rest of each example's prefix is
    # teacher-forced below. after[q]: logits (B, V) computed on code q, which predict code q + 1.
    after = {lo - 1: student.prefill(labels, codes[:, :lo])[:, -1]}
    for positions in steps:
        # a row started ahead of the end of the row above (ZipAR) lacks code p - 1: the newest
        # code of the row above, `window` codes in, stands in for it
        preds = [after.get(p - 1, after.get(p - grid + min(window, grid - 1))) for p in positions]
        probs = torch.stack(preds, 1).softmax(-1)  # (B, L, V)
        sampled = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(B, len(positions))
        pos = torch.tensor(positions, device=codes.device)
        out[:, pos] = torch.where(mask[:, pos], sampled.to(codes.device), codes[:, pos])
        feed = [p for p in positions if p + 1 < T]
        if feed:
            logits = student.decode(out[:, feed], torch.tensor(feed, device=codes.device))  # (B, L', V)
            after.update({p: logits[:, i] for i, p in enumerate(feed)})
    student.clear_cache()
    student.train(was_training)
    return out, mask


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/teacher.pt", help="GPT checkpoint (default: out/teacher.pt)")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="model shape, needed only for LlamaGen checkpoints (default: from the checkpoint)")
    p.add_argument("--tokenizer", default="out/tokenizer.pt",
                   help="tokenizer checkpoint that decodes the codes (default: out/tokenizer.pt)")
    p.add_argument("--image-size", type=int, help="the tokenizer's image side, e.g. 384 for LlamaGen's "
                   "c2i_*_384.pt (default: the tokenizer's own)")
    p.add_argument("--out", default=None,
                   help="PNG to write (default: <ckpt without .pt>_samples.png beside the checkpoint)")
    p.add_argument("--classes", default=None, type=lambda s: [int(c) for c in s.split(",")],
                   help="comma-separated class ids, one row each (default: every class)")
    p.add_argument("--per-class", type=int, default=8, help="images per class, one row (default: 8)")
    # LlamaGen samples GPT-B/L at 2.0; guidance trades diversity for class fidelity and a small
    # model with a weak class signal needs it at least as much
    p.add_argument("--cfg-scale", type=float, default=2.0,
                   help="classifier-free guidance scale, 1 = off (default: 2.0)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature, 0 = greedy (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely codes, 0 = all (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus: keep the most likely codes holding this probability mass, 1 = all "
                        "(default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="recompute the whole prefix at every step: slow, for checking (default: off)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    args = p.parse_args()

    tokenizer = load_tokenizer(args.tokenizer, image_size=args.image_size).to(args.device)
    model = load_checkpoint(args.ckpt, args.preset, tokenizer.cfg.grid_size).to(args.device)
    config = model.config
    classes = args.classes or list(range(config.num_classes))
    if not all(0 <= c < config.num_classes for c in classes):
        raise SystemExit(f"--classes {classes} out of range: pass ids within 0..{config.num_classes - 1}")
    labels = torch.tensor(classes, device=args.device).repeat_interleave(args.per_class)  # (rows * cols,)
    generator = torch.Generator(args.device).manual_seed(args.seed)

    start = time.perf_counter()
    codes = generate(model, labels, args.cfg_scale, args.temperature, args.top_k, args.top_p, generator,
                     kv_cache=not args.no_kv_cache)
    with torch.no_grad():
        images = tokenizer.decode(codes.view(-1, config.grid_size, config.grid_size))  # (N, H, W, C) uint8
    images = torch.as_tensor(images).cpu().numpy()
    seconds = time.perf_counter() - start

    out = Path(args.out) if args.out else Path(args.ckpt).with_name(Path(args.ckpt).stem + "_samples.png")
    save_grid(images.reshape(len(classes), args.per_class, *images.shape[1:]), out)
    print(f"wrote {out}: {len(images)} images at {len(images) / seconds:.1f} images/s")


if __name__ == "__main__":
    main()
