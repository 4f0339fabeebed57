"""Knowledge distillation of visual autoregressive models: THE training loop.

    python distill.py --method ce --size teacher    # trains the teacher: out/teacher.pt
    python distill.py --method ce                   # the no-KD student: out/ce/ckpt.pt
    python distill.py --method ce --resume          # continue from the last checkpoint

Builds what is missing first (Fashion-MNIST, the tokenizer out/tokenizer.pt, the token cache
out/tokens/), then trains on code sequences: AdamW (betas 0.9/0.95, weight decay on matrices only,
as LlamaGen), linear warm-up then cosine (or constant) learning rate, gradient clipping at 1.0,
held-out NLL every --eval-interval steps and atomic checkpoints every --ckpt-interval steps.
Every checkpoint records its config and the fingerprints of the data and tokenizer it was built
from; --resume refuses a checkpoint built from anything else.
"""
import argparse
import functools
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import tokenizer as tok
from data import atomic_write, load_fashion_mnist, token_cache
from model import GPT, PRESETS, GPTConfig


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="ce", choices=["ce"], help="training objective (default: ce, "
                   "next-code cross-entropy on data)")
    p.add_argument("--size", default="student", help=f"model preset: one of {', '.join(PRESETS)}; "
                   "'teacher' and 'student' are the CPU defaults (default: student)")
    p.add_argument("--out", help="checkpoint path (default: out/teacher.pt for --size teacher, "
                   "else out/<method>/ckpt.pt)")
    p.add_argument("--out-dir", default="out", help="where the tokenizer, token cache and "
                   "checkpoints live (default: out)")
    p.add_argument("--data-dir", default="data", help="Fashion-MNIST folder (default: data, then the "
                   "Debian package's, then download)")
    p.add_argument("--tokenizer", help="tokenizer checkpoint (default: <out-dir>/tokenizer.pt, "
                   "trained if missing)")
    p.add_argument("--max-iters", type=int, help="optimizer steps (default: 2000 for the teacher, "
                   "1000 otherwise)")
    p.add_argument("--batch-size", type=int, default=128, help="sequences per step (default: 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    p.add_argument("--min-lr-frac", type=float, default=0.1, help="cosine floor as a fraction of "
                   "--lr (default: 0.1)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default: 100)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"],
                   help="learning-rate schedule after warm-up (default: cosine)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW decay on matrices "
                   "(default: 0.05, LlamaGen's)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (default: 1.0)")
    p.add_argument("--eval-interval", type=int, default=250, help="steps between held-out NLL "
                   "evaluations (default: 250)")
    p.add_argument("--eval-seqs", type=int, default=2000, help="test sequences for the periodic "
                   "NLL; the final one uses the whole split (default: 2000)")
    p.add_argument("--ckpt-interval", type=int, default=250, help="steps between checkpoints "
                   "(default: 250)")
    p.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    p.add_argument("--seed", type=int, default=0, help="seed of init, data order and dropout (default: 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off for "
                   "runs of several minutes)")
    args = p.parse_args(argv)
    if args.size not in PRESETS:
        p.error(f"unknown --size {args.size!r}: choose one of {', '.join(PRESETS)}")
    if args.out is None:
        args.out = (f"{args.out_dir}/teacher.pt" if args.size == "teacher" and args.method == "ce"
                    else f"{args.out_dir}/{args.method}/ckpt.pt")
    args.tokenizer = args.tokenizer or f"{args.out_dir}/tokenizer.pt"
    args.max_iters = args.max_iters or (2000 if args.size == "teacher" else 1000)
    return args


def prepare_data(args):
    """The tokenizer and the train/test token caches, built on first use."""
    if not Path(args.tokenizer).exists():
        print(f"no tokenizer at {args.tokenizer}: training one (about 3 minutes on 2 CPU cores)")
        tok.build(args.tokenizer, args.data_dir)
    tokenizer = tok.load_tokenizer(args.tokenizer)
    splits = {}
    for split in ("train", "test"):
        prefix = Path(args.out_dir) / "tokens" / split
        if not prefix.with_suffix(".json").exists():
            print(f"no token cache at {prefix}.*: encoding the {split} split once")
        images, labels = load_fashion_mnist(split, args.data_dir)
        codes, labels, data_fp = token_cache(prefix, images, labels,
                                             lambda x: tokenizer.encode(x).cpu().numpy(), tokenizer.fingerprint)
        splits[split] = (torch.from_numpy(np.asarray(codes, np.int64).reshape(len(codes), -1)),
                         torch.from_numpy(np.asarray(labels)), data_fp)
    return tokenizer, splits


@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(step, n, batch_size, seed):
    """Batch number `step` of an endless stream of shuffled epochs: a pure function of the step,
    so a resumed run reads exactly the data an uninterrupted one would."""
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    return torch.cat([epoch_order(n, seed, int(e))[pos[pos // n == e] % n] for e in (pos // n).unique()])


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == "constant":
        return args.lr
    frac = (step - args.warmup) / max(1, args.max_iters - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def test_nll(model, codes, labels, batch_size=500):
    """Mean negative log-likelihood per code (nats) of held-out sequences, no label dropout."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(codes), batch_size):
        x, y = codes[i:i + batch_size], labels[i:i + batch_size]
        logits = model(x, y)  # (B, T, V)
        total += F.cross_entropy(logits.flatten(0, 1), x.flatten(), reduction="sum").item()
    model.train(was_training)
    return total / codes.numel()


def save_checkpoint(path, model, optimizer, step, args, fingerprints, metrics):
    state = {"model": model.state_dict(), "config": asdict(model.config), "optimizer": optimizer.state_dict(),
             "step": step, "args": vars(args), "rng": torch.get_rng_state(), "fingerprints": fingerprints,
             "metrics": metrics}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    tokenizer, splits = prepare_data(args)
    (train_codes, train_labels, data_fp), (test_codes, test_labels, _) = splits["train"], splits["test"]
    config = GPTConfig(**PRESETS[args.size], vocab_size=tokenizer.cfg.codebook_size,
                       num_classes=int(train_labels.max()) + 1, grid_size=tokenizer.cfg.grid_size)
    fingerprints = {"tokenizer": tokenizer.fingerprint, "data": data_fp}
    model = GPT(config).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    start, metrics = 0, {"wall_time": 0.0}
    if Path(args.out).exists() and not args.resume:
        raise SystemExit(f"{args.out} exists: pass --resume to continue it, or --out elsewhere "
                         f"(nothing is overwritten)")
    if args.resume and Path(args.out).exists():
        ckpt = torch.load(args.out, map_location="cpu", weights_only=True)
        if ckpt["fingerprints"] != fingerprints:
            raise SystemExit(f"{args.out} was built from {ckpt['fingerprints']}, not from the current "
                             f"{fingerprints}: drop --resume to start over, or pass the --tokenizer it used")
        if ckpt["config"] != asdict(config):
            raise SystemExit(f"{args.out} holds a {ckpt['config']} model, not --size {args.size}: "
                             f"pass the --size it was trained with")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        start, metrics = ckpt["step"], ckpt["metrics"]
        print(f"resuming {args.out} at step {start}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.method}: {args.size} model, {n_params / 1e6:.2f}M parameters, {args.max_iters} steps "
          f"of {args.batch_size} sequences x {config.block_size} codes -> {args.out}")
    step_fn = torch.compile(model) if args.compile else model
    model.train()
    t0, tokens = time.time(), 0
    bar = tqdm(range(start, args.max_iters), initial=start, total=args.max_iters, desc=args.method)
    for step in bar:
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = batch_indices(step, len(train_codes), args.batch_size, args.seed)
        codes, labels = train_codes[idx].to(device), train_labels[idx].to(device)
        logits = step_fn(codes, labels)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
        if not torch.isfinite(loss):
            raise SystemExit(f"the loss is {loss.item()} at step {step}: training diverged; the last "
                             f"good checkpoint {args.out} is kept; lower --lr and --resume")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        tokens += codes.numel()
        done = step + 1
        if done % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens / (time.time() - t0):.0f}")
        if done % args.eval_interval == 0 and done < args.max_iters:
            nll = test_nll(model, test_codes[:args.eval_seqs].to(device), test_labels[:args.eval_seqs].to(device))
            bar.write(f"step {done}: test NLL {nll:.4f} nats/code (first {args.eval_seqs} test sequences)")
        if done % args.ckpt_interval == 0 or done == args.max_iters:
            metrics["wall_time"] += time.time() - t0
            tokens, t0 = 0, time.time()
            if done == args.max_iters:
                metrics["test_nll"] = test_nll(model, test_codes.to(device), test_labels.to(device))
            metrics["step"] = done
            save_checkpoint(args.out, model, optimizer, done, args, fingerprints, metrics)
    if "test_nll" in metrics:
        print(f"done: test NLL {metrics['test_nll']:.4f} nats/code on {len(test_codes)} test images, "
              f"{metrics['wall_time'] / 60:.1f} min of training; saved {args.out}")
    return metrics


if __name__ == "__main__":
    main()
