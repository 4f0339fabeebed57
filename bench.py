"""Speed figures, printed as a table: training tokens/s and sampling images/s.

    python bench.py                      # default teacher and student sizes, batch 64, CPU
    python bench.py --device cuda --sizes B,L --batch-size 32

Models are randomly initialised (speed does not depend on the weights), with the default data's
shapes (7x7 codes from 256, 10 classes) unless --grid/--vocab/--classes say otherwise. Each figure
is the median of --repeats timed runs after a warm-up; compare figures as ratios within one run:
shared machines are noisy.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from model import GPT, PRESETS, GPTConfig
from sample import generate


def timed(fn, device, repeats):
    fn()  # warm-up: allocations, caches, compilation
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="teacher,student", help="comma-separated presets (default: teacher,student)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per step / images per call (default: 64)")
    p.add_argument("--grid", type=int, default=7, help="codes per side (default: 7)")
    p.add_argument("--vocab", type=int, default=256, help="codebook size (default: 256)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default: 10)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure, median reported (default: 5)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda if available)")
    args = p.parse_args()
    device = torch.device(args.device)
    B = args.batch_size
    print(f"device {device}, {torch.get_num_threads()} threads, batch {B}, {args.grid}x{args.grid} codes "
          f"of {args.vocab}, median of {args.repeats}")
    print(f"{'size':>8} {'params':>8} {'train tok/s':>12} {'sample img/s':>13} {'no cache':>9} {'cache speed-up':>15}")
    for size in args.sizes.split(","):
        config = GPTConfig(**PRESETS[size], vocab_size=args.vocab, num_classes=args.classes, grid_size=args.grid)
        model = GPT(config).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        codes = torch.randint(args.vocab, (B, config.block_size), device=device)
        labels = torch.randint(args.classes, (B,), device=device)

        def train_step():
            loss = F.cross_entropy(model(codes, labels).flatten(0, 1), codes.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        model.train()
        t_train = timed(train_step, device, args.repeats)
        # sampling with classifier-free guidance (scale 2, a batch of 2B), with and without the KV cache
        t_cache = timed(lambda: generate(model, labels, cfg_scale=2.0), device, args.repeats)
        t_plain = timed(lambda: generate(model, labels, cfg_scale=2.0, kv_cache=False), device, max(1, args.repeats // 2))
        n = sum(p.numel() for p in model.parameters())
        print(f"{size:>8} {n / 1e6:>7.2f}M {B * config.block_size / t_train:>12,.0f} {B / t_cache:>13.1f} "
              f"{B / t_plain:>9.1f} {t_plain / t_cache:>14.1f}x")


if __name__ == "__main__":
    main()
