"""Speed figures, printed as tables: training tokens/s and sampling images/s per model size; one
training step of each distillation method as a ratio to kd; rollouts with and without ZipAR; the
Frechet distance against scipy's sqrtm formula and the feature extractors' images/s.

    python bench.py                      # default teacher and student sizes, batch 64, CPU
    python bench.py --device cuda --sizes B,L --batch-size 32
    python bench.py --imagenet --batch-size 8       # VQ-16 encoding, GPT-B and -L steps at 256 px: to extrapolate
    python bench.py --speculative                   # the main job's students drafting for its teacher
    python bench.py --decode                        # eager against compiled decoding, the shipped parents
    python bench.py --gpu-check                     # on a GPU: LlamaGen-B from -L, bf16 + compile, < 8 min

Models are randomly initialised (speed does not depend on the weights; --speculative's acceptance
does, so it loads the main job's checkpoints), with the default data's
shapes (7x7 codes from 256, 10 classes) unless --grid/--vocab/--classes say otherwise. Each figure
is the median of --repeats timed runs after a warm-up; compare figures as ratios within one run:
shared machines are noisy.
"""
import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import classifier
import distill
import evaluate
import runs
import tokenizer as tok
from checks import existing_device, fraction, positive_int, ranged
from data import WEIGHTS, parents
from model import GPT, PRESETS, GPTConfig, autocast, compile_decode, load_checkpoint
from sample import generate, jacobi_generate, speculative_figures, speculative_generate, timed


@torch.no_grad()
def speculative_speed(target, drafts, labels, gamma=4, batch_size=1, seed=0, groups=None, delta=0.0, **filters):
    """Wall clock on one device, the same labels and seeds: the target sampling alone, then with each
    draft (drafts: {name: model}) speculating for it, batch_size images per call. Returns
    {"target": {"seconds"}, name: {"acceptance", "codes_per_call", "seconds", "speed_up", "draft_cost"}},
    draft_cost: the draft's time per call over the target's (each sampling alone).
    Speed-up ~ codes_per_call / (1 + gamma * draft_cost): a draft pays only if it is cheap."""
    def one_pass(sampler):  # every chunk once, after a warm-up on the first: (outputs, seconds)
        sampler(labels[:batch_size], torch.Generator(labels.device).manual_seed(seed))  # warm-up
        if labels.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = [sampler(chunk, torch.Generator(labels.device).manual_seed(seed + i))
               for i, chunk in enumerate(labels.split(batch_size))]
        if labels.device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    _, alone = one_pass(lambda chunk, g: generate(target, chunk, generator=g, **filters))
    figures = {"target": {"seconds": alone}}
    for name, draft in drafts.items():
        counts, seconds = one_pass(lambda chunk, g: speculative_generate(target, draft, chunk, gamma, generator=g,
                                                                         groups=groups, delta=delta, **filters)[1])
        # the draft sampling alone: what one of its calls costs against one of the target's
        cost = one_pass(lambda chunk, g: generate(draft, chunk, generator=g, **filters))[1] / alone
        figures[name] = {**speculative_figures(*counts), "seconds": seconds, "speed_up": alone / seconds,
                         "draft_cost": cost}
    return figures


def listed(kind):
    """A type for argparse: comma-separated values, each parsed (and range-checked) by `kind`."""
    return lambda text: [kind(x) for x in text.split(",")]


def preset(text):
    if text not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown preset {text!r}: choose from {', '.join(PRESETS)}")
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=listed(preset), default="teacher,student", help="comma-separated presets "
                   f"of {', '.join(PRESETS)} (default: teacher,student)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="sequences per step / images per call, >= 1 (default: 64)")
    p.add_argument("--grid", type=ranged(int, 1, 64), default=7, help="codes per side, in [1, 64] (LlamaGen's 512 px is "
                   "32) (default: 7)")
    p.add_argument("--vocab", type=ranged(int, 4), default=256, help="codebook size, >= 4 (default: 256)")
    p.add_argument("--classes", type=positive_int, default=10, help="number of classes, >= 1 (default: 10)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per figure, median reported, >= 1 (default: 5)")
    p.add_argument("--device", type=existing_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda if available)")
    p.add_argument("--teacher", type=preset, default="teacher", help="teacher preset of the method rows (default: teacher)")
    p.add_argument("--student", type=preset, default="student", help="student preset of the method rows (default: student)")
    p.add_argument("--method-steps", type=positive_int, default=20, help="steps averaged per method, >= 1 (default: 20)")
    p.add_argument("--no-methods", action="store_true", help="skip the per-method table")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation figures")
    p.add_argument("--imagenet", action="store_true", help="only the ImageNet figures: VQ-16 encoding at 256 px, "
                   "a GPT-B ce step, a GPT-L forward and a kd / varkd step L -> B on 16x16 codes of 16384")
    p.add_argument("--speculative", action="store_true", help="only the speculative sampling figures: "
                   "the shipped teacher with each student of the main job as its draft")
    p.add_argument("--out-dir", default="out", help="--speculative: where the main job's checkpoints are (default: out)")
    p.add_argument("--gamma", type=listed(positive_int), default="4", help="--speculative: codes drafted per round, "
                   "comma-separated, each >= 1 (default: 4)")
    p.add_argument("--spec-images", type=positive_int, default=50, help="--speculative: images per figure, >= 1 (default: 50)")
    p.add_argument("--relax-delta", type=listed(fraction), default="0", help="--speculative: LANTERN's relaxed "
                   "acceptance budgets, comma-separated, each in [0, 1], 0 = exact (default: 0)")
    p.add_argument("--gsd", action="store_true", help="only sampling with no draft model (speculative Jacobi, GSD) "
                   "against the teacher alone and the student as its draft: speed eager and compiled, FID-cls")
    p.add_argument("--gsd-threshold", type=ranged(float, 0.0, 1.0), default=0.15, help="--gsd: GSD's probability "
                   "threshold, in [0, 1] (default: 0.15)")
    p.add_argument("--gsd-samples", type=ranged(int, 4), default=5000, help="--gsd: samples per FID-cls, >= 4 (default: 5000)")
    p.add_argument("--decode", action="store_true", help="only eager against compiled decoding: codes/s at batch 1 "
                   "and --batch-size, a rollout, speculative sampling at batch 1 (the shipped teacher and student)")
    p.add_argument("--gpu-check", action="store_true", help="only the GPU figures: LlamaGen-B steps from an -L "
                   "teacher at 256 codes in bf16 + compile, GPT-B sampling eager and compiled, 2-rank DDP over nccl")
    args = p.parse_args(argv)
    only = [f"--{m.replace('_', '-')}" for m in ("imagenet", "speculative", "decode", "gsd", "gpu_check") if getattr(args, m)]
    if len(only) > 1:
        p.error(f"{' and '.join(only)} each run alone: pass one of them")
    device = torch.device(args.device)
    if args.imagenet:
        return imagenet(args, device)
    if args.speculative:
        return speculative(args, device)
    if args.decode:
        return decode(args, device)
    if args.gsd:
        return gsd(args, device)
    if args.gpu_check:
        return gpu_check(device)
    B = args.batch_size
    print(f"device {device}, {torch.get_num_threads()} threads, batch {B}, {args.grid}x{args.grid} codes "
          f"of {args.vocab}, median of {args.repeats}")
    print(f"{'size':>8} {'params':>8} {'train tok/s':>12} {'sample img/s':>13} {'no cache':>9} {'cache speed-up':>15}")
    for size in args.sizes:
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
    if not args.no_methods:
        methods(args, device)
    if not args.no_eval:
        evaluation(args, device)


def methods(args, device):
    """One optimizer step of each method, teacher -> student at the default sizes, averaged over
    --method-steps steps (onpolicy draws a rollout on a fraction lambda of them)."""
    B = args.batch_size
    shape = dict(vocab_size=args.vocab, num_classes=args.classes, grid_size=args.grid)
    teacher = GPT(GPTConfig(**PRESETS[args.teacher], **shape)).to(device).eval().requires_grad_(False)
    student = GPT(GPTConfig(**PRESETS[args.student], **shape)).to(device)
    torch.nn.init.normal_(student.output.weight, std=0.02)  # a zero head would make rollouts uniform
    torch.nn.init.normal_(teacher.output.weight, std=0.02)
    groups = torch.arange(args.vocab, device=device) % (args.vocab // 4)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    T = args.grid ** 2
    codes = torch.randint(args.vocab, (B, T), device=device)
    labels = torch.randint(args.classes, (B,), device=device)
    print(f"\none training step, {args.teacher} -> {args.student}, batch {B}, mean of {args.method_steps} steps")
    print(f"{'method':>9} {'ms/step':>9} {'vs kd':>7}")
    times = {}
    for method in distill.METHODS:
        margs = runs.get_args(["--method", method, "--batch-size", str(B)], methods=distill.METHODS)
        counter = iter(range(10 ** 9))

        def step():
            g = torch.Generator(device).manual_seed(next(counter))
            loss = distill.method_loss(margs, student, student, teacher, codes, labels, groups, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        student.train()
        times[method] = timed(lambda: [step() for _ in range(args.method_steps)], device, 1) / args.method_steps
        if method == "seqkd":  # plus its pool of teacher samples, drawn every pool_refresh steps
            pool = timed(lambda: distill.teacher_pool(teacher, margs.pool_size, args.classes, 1.0, 0), device, 1)
            times[method] += pool / margs.pool_refresh
    for method, t in times.items():
        print(f"{method:>9} {t * 1e3:>9.1f} {t / times['kd']:>6.2f}x")
    def g():
        return torch.Generator(device).manual_seed(0)

    seq = timed(lambda: distill.mixed_rollout(student, codes, labels, generator=g()), device, args.repeats)
    par = timed(lambda: distill.mixed_rollout(student, codes, labels, generator=g(), window=5), device, args.repeats)
    print(f"\nmixed rollout of {B} (student, prefix 25-75%): sequential {seq * 1e3:.1f} ms, "
          f"ZipAR window 5 {par * 1e3:.1f} ms ({seq / par:.2f}x)")


def speculative(args, device):
    """Each student of the main job drafting for its teacher: acceptance rate, codes per teacher
    call and wall-clock speed-up over the teacher alone, one image per call (speculative sampling
    is a latency method) and --batch-size images per call (rows advance by the batch's shortest
    accepted run), classifier-free guidance 2 on both."""
    tokenizer = tok.load_tokenizer(WEIGHTS / "tokenizer.pt")  # every draft must share the teacher's codes
    teacher = load_checkpoint(WEIGHTS / "teacher.pt", tokenizer=tokenizer.fingerprint).to(device)
    paths = {"ce": WEIGHTS / "student.pt", **{m: Path(f"{args.out_dir}/{m}/ckpt.pt") for m in list(distill.METHODS)[1:]}}
    drafts = {m: load_checkpoint(path, tokenizer=tokenizer.fingerprint).to(device) for m, path in paths.items()
              if path.exists()}
    if not drafts:
        raise SystemExit(f"no students under {args.out_dir}/: run python distill.py (the main job) first")
    classes = teacher.config.num_classes
    labels = torch.arange(classes, device=device).repeat(-(-args.spec_images // classes))[: args.spec_images]
    print(f"device {device}, {torch.get_num_threads()} threads, {len(labels)} images, the shipped teacher "
          f"as target, CFG 2.0")
    deltas = args.relax_delta
    groups = None  # relaxed acceptance pools over VarKD's codebook groups, from the main job's tokenizer
    if any(deltas):
        groups = tokenizer.codebook_groups(teacher.config.vocab_size // 4)
        groups = groups.to(device)
    print(f"{'draft':>9} {'gamma':>6} {'delta':>6} {'batch':>6} {'accepted':>9} {'codes/call':>11} {'img/s':>7} "
          f"{'speed-up':>9} {'draft cost':>11}")
    for batch in (1, args.batch_size):
        for gamma, delta in [(g, d) for g in args.gamma for d in deltas]:
            figures = speculative_speed(teacher, drafts, labels, gamma, batch, groups=groups, delta=delta, cfg_scale=2.0)
            alone = len(labels) / figures.pop("target")["seconds"]
            print(f"{'teacher':>9} {'-':>6} {'-':>6} {batch:>6} {'-':>9} {1:>11.2f} {alone:>7.1f} {1:>8.2f}x")
            for name, f in figures.items():
                print(f"{name:>9} {gamma:>6} {delta:>6} {batch:>6} {f['acceptance']:>8.1%} {f['codes_per_call']:>11.2f} "
                      f"{len(labels) / f['seconds']:>7.1f} {f['speed_up']:>8.2f}x {f['draft_cost']:>10.2f}x")


def gsd(args, device):
    """Sampling with no draft model (sample.jacobi_generate: speculative Jacobi decoding, exact, and
    GSD's grouped acceptance) against the teacher alone and the shipped student drafting for it: the
    shipped teacher (--grid 14: the 14x14 tree under --out-dir), CFG 2, codes per teacher call,
    drafts accepted and images/s at one image per call and at --batch-size, eager and compiled, then
    FID-cls of --gsd-samples samples of each sampler (eager, --batch-size per call)."""
    home = parents(args.grid, args.out_dir)
    tokenizer = tok.load_tokenizer(home["tokenizer"])
    teacher, student = (load_checkpoint(home[name], tokenizer=tokenizer.fingerprint).to(device)
                        for name in ("teacher", "student"))
    groups = tokenizer.codebook_groups(teacher.config.vocab_size // 4).to(device)
    gamma = args.gamma[0]
    samplers = {  # each: (model, labels, cfg_scale, generator) -> (codes, counts or None)
        "teacher": lambda m, y, s, generator: (generate(m, y, s, generator=generator), None),
        "draft": lambda m, y, s, generator: speculative_generate(m, student, y, gamma, s, generator=generator),
        "jacobi": lambda m, y, s, generator: jacobi_generate(m, y, gamma, s, generator=generator),
        "gsd": lambda m, y, s, generator: jacobi_generate(m, y, gamma, s, generator=generator, groups=groups,
                                                           threshold=args.gsd_threshold),
    }
    classes = teacher.config.num_classes
    labels = torch.arange(args.spec_images, device=device) % classes
    print(f"device {device}, {torch.get_num_threads()} threads, {teacher.config.block_size} codes, {len(labels)} images "
          f"per figure, CFG 2.0, gamma {gamma}, GSD threshold {args.gsd_threshold}; draft: the shipped student")
    print(f"{'sampler':>8} {'decode':>9} {'batch':>6} {'accepted':>9} {'codes/call':>11} {'img/s':>8} {'vs teacher':>11}")
    for mode in ("eager", "compiled"):
        compile_decode(teacher, mode)
        compile_decode(student, mode)
        for batch in (1, args.batch_size):
            speed = {}
            for name, sampler in samplers.items():
                run = lambda: [sampler(teacher, chunk, 2.0, torch.Generator(device).manual_seed(i))[1]  # noqa: E731
                               for i, chunk in enumerate(labels.split(batch))]
                run()  # every shape compiled (and cached) before the figure
                t0 = time.perf_counter()
                counts = run()
                speed[name] = len(labels) / (time.perf_counter() - t0)
                f = speculative_figures(*counts) if counts[0] else dict(acceptance=float("nan"), codes_per_call=1.0)
                print(f"{name:>8} {mode:>9} {batch:>6} {f['acceptance']:>8.1%} {f['codes_per_call']:>11.2f} "
                      f"{speed[name]:>8.1f} {speed[name] / speed['teacher']:>10.2f}x")
    compile_decode(teacher, "eager")
    compile_decode(student, "eager")
    for name, sampler in samplers.items():
        images, drawn = evaluate.draw(teacher, tokenizer, args.gsd_samples, 2.0, args.batch_size,
                                      sampler=lambda *a, **k: sampler(*a, **k)[0])
        fid = evaluate.evaluate_images(images, drawn, "cls", args.out_dir, "data", device=device)["FID-cls"]
        print(f"{name:>8}: FID-cls {fid:.2f} on {args.gsd_samples} samples")


def decode(args, device):
    """Eager against compiled decoding (model.compile_decode, set on each model), on the shipped teacher and student:
    codes/s of generate() (no guidance) at batch 1 and --batch-size, a mixed rollout of --batch-size
    real sequences, and speculative sampling at batch 1 (CFG 2, the student drafting for the teacher).
    Each compiled figure is taken once every shape it needs is compiled (the compile column: the
    first call's extra seconds, paid once per run; inductor caches them on disk for the next one)."""
    tokenizer = tok.load_tokenizer(WEIGHTS / "tokenizer.pt")
    teacher, student = (load_checkpoint(WEIGHTS / f"{name}.pt", tokenizer=tokenizer.fingerprint).to(device)
                        for name in ("teacher", "student"))
    T, B = teacher.config.block_size, args.batch_size
    labels = torch.arange(B, device=device) % teacher.config.num_classes
    codes = torch.randint(teacher.config.vocab_size, (B, T), device=device)
    spec_labels = torch.arange(args.spec_images, device=device) % teacher.config.num_classes
    gammas = args.gamma
    cases = {f"{name} decode, batch {b}": (lambda m=m, b=b: generate(m, labels[:b]), b * T)
             for name, m in (("teacher", teacher), ("student", student)) for b in (1, B)}
    cases[f"student rollout of {B}"] = (lambda: distill.mixed_rollout(student, codes, labels,
                                                                     generator=torch.Generator(device).manual_seed(0)),
                                        None)
    print(f"device {device}, {torch.get_num_threads()} threads, {teacher.config.grid_size}x"
          f"{teacher.config.grid_size} codes, median of {args.repeats}; speculative: {len(spec_labels)} images "
          f"one at a time, CFG 2.0")
    print(f"{'':>28} {'eager':>14} {'compiled':>14} {'speed-up':>9} {'compile s':>10}")
    figures = {}
    for mode in ("eager", "compiled"):
        compile_decode(teacher, mode)
        compile_decode(student, mode)
        for name, (fn, n) in cases.items():
            t0 = time.perf_counter()
            fn()
            first = time.perf_counter() - t0
            figures[mode, name] = (timed(fn, device, args.repeats), first)
        # what a speculative round rests on: scoring L codes in one teacher call against scoring one
        teacher.setup_cache(2)
        teacher.prefill(spec_labels[:1].repeat(2), codes[:1, :10].repeat(2, 1))
        for n_codes in range(1, max(gammas) + 2):
            call = lambda: teacher.decode(codes[:2, 10:10 + n_codes], 10)  # noqa: E731
            call()
            figures[mode, f"teacher call, {n_codes} codes"] = (timed(call, device, 20 * args.repeats), 0.0)
        teacher.clear_cache()
        for gamma in gammas:
            spec = lambda: speculative_speed(teacher, {"student": student}, spec_labels, gamma, cfg_scale=2.0)  # noqa: E731
            spec()  # every target call length (1 to gamma + 1 codes) compiled before the figure is taken
            f = spec()
            figures[mode, f"speculative gamma {gamma}"] = f
    for name, (fn, n) in cases.items():
        (eager, _), (compiled, first) = figures["eager", name], figures["compiled", name]
        unit = (lambda t: f"{n / t:>8,.0f} cod/s") if n else (lambda t: f"{t * 1e3:>9.1f} ms  ")
        print(f"{name:>28} {unit(eager)} {unit(compiled)} {eager / compiled:>8.2f}x {first - compiled:>10.1f}")
    for n_codes in range(1, max(gammas) + 2):
        name = f"teacher call, {n_codes} codes"
        (eager, _), (compiled, _) = figures["eager", name], figures["compiled", name]
        one_e, one_c = figures["eager", "teacher call, 1 codes"][0], figures["compiled", "teacher call, 1 codes"][0]
        print(f"{name + ', CFG':>28} {eager * 1e3:>6.2f} ms {eager / one_e:>4.1f}x {compiled * 1e3:>6.2f} ms "
              f"{compiled / one_c:>4.1f}x {eager / compiled:>8.2f}x   (x: of a one-code call)")
    for gamma in gammas:
        e, c = figures["eager", f"speculative gamma {gamma}"], figures["compiled", f"speculative gamma {gamma}"]
        print(f"{'teacher alone, CFG 2':>28} {len(spec_labels) / e['target']['seconds']:>9.1f} img/s "
              f"{len(spec_labels) / c['target']['seconds']:>9.1f} img/s {e['target']['seconds'] / c['target']['seconds']:>8.2f}x")
        print(f"{f'speculative, gamma {gamma}':>28} {e['student']['speed_up']:>12.2f}x  {c['student']['speed_up']:>12.2f}x "
              f"  (over the teacher alone in the same mode; accepted {c['student']['acceptance']:.1%}, "
              f"{c['student']['codes_per_call']:.2f} codes per teacher call, draft call "
              f"{e['student']['draft_cost']:.2f} / {c['student']['draft_cost']:.2f} of a teacher call)")
    return figures


def imagenet(args, device):
    """The paper's setting at its real sizes, random weights: what one step costs, per --batch-size."""
    B = args.batch_size
    print(f"device {device}, {torch.get_num_threads()} threads, batch {B}, ImageNet sizes, median of {args.repeats}")
    vq = tok.VQModel(tok.VQConfig(**tok.PRESETS["VQ-16"])).to(device).eval()
    images = torch.randint(0, 256, (B, 256, 256, 3), dtype=torch.uint8).numpy()
    t = timed(lambda: vq.encode(images), device, args.repeats)
    print(f"VQ-16 encode, 256 px -> 16x16 codes: {B / t:.2f} images/s ({t / B * 1e3:.0f} ms per image)")
    paper_steps(device, batch=B, repeats=args.repeats)


def paper_steps(device, student="B", teacher="L", grid=16, vocab=16384, classes=1000, batch=8, repeats=3,
                bf16=None, compiled=False):
    """The teacher's forward pass, then one ce, kd and varkd step of `student` from `teacher` (random
    weights; LlamaGen's B from L at 256 codes by default), bf16 autocast on GPUs, the student optionally
    compiled. Prints and returns the figures (seconds, peak GiB on GPUs, loss, first-call extra seconds)
    and the student."""
    cuda = device.type == "cuda"
    shape = dict(vocab_size=vocab, num_classes=classes, grid_size=grid)
    # the rollouts of varkd decode as distill.py's do: compiled on GPUs
    model = compile_decode(GPT(GPTConfig(**PRESETS[student], **shape)).to(device), "auto")
    big = GPT(GPTConfig(**PRESETS[teacher], **shape)).to(device).eval().requires_grad_(False)
    for m in (model, big):  # a zero head would make every rollout uniform
        torch.nn.init.normal_(m.output.weight, std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_fn = torch.compile(model) if compiled else model
    codes = torch.randint(vocab, (batch, grid * grid), device=device)
    labels = torch.randint(classes, (batch,), device=device)
    groups = torch.arange(vocab, device=device) % (vocab // 4)
    with torch.no_grad(), autocast(device.type, bf16):
        t = timed(lambda: big(codes, labels), device, repeats)
    figures = {"teacher_forward": t}
    print(f"{teacher} forward (no grad), {batch} x {grid * grid} codes: {t:.3f} s")
    print(f"{student + ' step':>14} {'batch':>6} {'s/step':>8} {'tokens/s':>10} {'peak GiB':>9} {'1st call +s':>12}")
    for method in ("ce", "kd", "varkd"):
        margs = runs.get_args(["--method", method, "--batch-size", str(batch)], methods=distill.METHODS)

        def step():
            with autocast(device.type, bf16):
                loss = distill.method_loss(margs, step_fn, model, big, codes, labels, groups,
                                           torch.Generator(device).manual_seed(0))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        model.train()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        loss = step()  # warm-up; compiles the student's forward and backward if asked
        first = time.perf_counter() - t0
        t = timed(step, device, repeats)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else float("nan")
        figures[method] = dict(seconds=t, peak_gib=peak, loss=loss.item())
        print(f"{method:>14} {batch:>6} {t:>8.3f} {batch * grid * grid / t:>10,.0f} {peak:>9.1f} {first - t:>12.1f}")
    return figures, model


def gpu_check(device, student="B", teacher="L", grid=16, vocab=16384, classes=1000, batch=32, sample_batch=64,
              steps=10, bf16=None):
    """The paths only a GPU runs, in one go (under 8 minutes on one GPU at the defaults): a ce, kd and varkd
    step of LlamaGen-B from an -L teacher at 256 codes (random weights) in bf16 autocast with the student
    compiled, with peak memory; CFG sampling of GPT-B, eager and compiled decode (bf16); DDP over nccl
    on 2 ranks if the machine has 2 GPUs. Returns the figures; the tests run it on a CPU at tiny sizes."""
    cuda = device.type == "cuda"
    print(f"device {torch.cuda.get_device_name(device) if cuda else device}, torch {torch.__version__}, "
          f"{student} from {teacher} at {grid}x{grid} codes of {vocab}, bf16 {bf16 if bf16 is not None else cuda}")
    shape = dict(vocab_size=vocab, num_classes=classes, grid_size=grid)
    figures, model = paper_steps(device, student, teacher, grid, vocab, classes, batch, steps, bf16, compiled=True)
    model.eval()
    sample_labels = torch.arange(sample_batch, device=device) % classes
    print(f"{'sampling':>14} {'batch':>6} {'img/s':>8} {'compile s':>10}  (CFG 2.0, {student})")
    greedy = {}
    for mode in ("eager", "compiled"):
        compile_decode(model, mode)
        with autocast(device.type, bf16):
            t0 = time.perf_counter()
            greedy[mode] = generate(model, sample_labels, cfg_scale=2.0, temperature=0)
            first = time.perf_counter() - t0
            t = timed(lambda: generate(model, sample_labels, cfg_scale=2.0), device, 1)
        figures[f"sample_{mode}"] = dict(images_per_s=sample_batch / t)
        print(f"{mode:>14} {sample_batch:>6} {sample_batch / t:>8.1f} {max(first - t, 0):>10.1f}")
    figures["greedy_agreement"] = (greedy["eager"] == greedy["compiled"]).float().mean().item()
    print(f"greedy codes equal, eager vs compiled: {figures['greedy_agreement']:.1%} (bf16 rounding may flip near-ties)")
    if cuda and torch.cuda.device_count() >= 2:
        figures["ddp"] = ddp_check(student, shape, batch, steps)
        print(f"DDP, 2 ranks over nccl, {student} ce step in bf16, batch {batch} per rank: "
              f"{figures['ddp']:.3f} s/step")
    else:
        print("DDP over nccl: skipped, it needs 2 GPUs")
    return figures


def ddp_check(preset, shape, batch, steps):
    """Seconds per DDP training step of `preset` on 2 GPUs over nccl (spawned ranks, like torchrun's)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    out = torch.zeros(1).share_memory_()
    mp.spawn(ddp_rank, args=(preset, shape, batch, steps, out), nprocs=2)
    return out.item()


def ddp_rank(rank, preset, shape, batch, steps, out):
    dist.init_process_group("nccl", rank=rank, world_size=2)
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    model = DDP(GPT(GPTConfig(**PRESETS[preset], **shape)).to(device), device_ids=[rank])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    codes = torch.randint(shape["vocab_size"], (batch, shape["grid_size"] ** 2), device=device)
    labels = torch.randint(shape["num_classes"], (batch,), device=device)

    def step():
        with autocast("cuda"):
            loss = F.cross_entropy(model(codes, labels).flatten(0, 1), codes.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = timed(step, device, steps)
    if rank == 0:
        out[0] = t
    dist.destroy_process_group()


def evaluation(args, device):
    """The Frechet distance at 2048-d against scipy's sqrtm formula, and features/s of the two
    extractors (random weights: speed does not depend on them)."""
    from scipy import linalg
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4096, 2048)), rng.normal(size=(4096, 2048)) * 0.9 + 0.1
    (mu1, s1), (mu2, s2) = evaluate.gaussian(a), evaluate.gaussian(b)

    def sqrtm_formula():
        covmean = linalg.sqrtm(s1 @ s2).real
        return (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)

    t0 = time.perf_counter()
    reference = sqrtm_formula()
    t_sqrtm = time.perf_counter() - t0
    t_ours = timed(lambda: evaluate.frechet_distance(mu1, s1, mu2, s2), torch.device("cpu"), args.repeats)
    ours = evaluate.frechet_distance(mu1, s1, mu2, s2)
    print(f"\nFrechet distance at 2048-d: Cholesky + eigvalsh {t_ours:.2f} s, scipy sqrtm {t_sqrtm:.2f} s "
          f"({t_sqrtm / t_ours:.1f}x), relative difference {abs(ours - reference) / reference:.1e}")
    images = torch.randint(0, 256, (args.batch_size, 28, 28, 1), dtype=torch.uint8).numpy()
    for name, model in (("classifier (28 px)", classifier.Classifier()), ("FID Inception (299 px)", evaluate.InceptionV3())):
        model = model.to(device).eval()
        t = timed(lambda: evaluate.extract(model, images, device, args.batch_size), device, max(1, args.repeats // 2))
        print(f"{name:>24}: {args.batch_size / t:,.0f} images/s")


if __name__ == "__main__":
    main()
