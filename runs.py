"""Run bookkeeping for distill.py: the flags, the parents a method needs, and what already exists.

Nothing here trains. `parser` holds every flag, and `get_args` fills in each method's defaults from
the table distill.py passes it (distill.METHODS, beside the losses); `pipeline` lists the
runs a method needs, parents first (the teacher, the no-KD student `ce`, stage-1 `kd`); `load_data`
builds the tokenizer and token caches on first use; `open_run` decides for one run whether the
checkpoint at --out is reused, continued or refused, and loads its teacher and starting student;
`save_checkpoint` writes atomically, recording the flags, the fingerprints of the data, tokenizer,
teacher, starting checkpoint and the weights themselves, and their integrity (checks.integrity). A
checkpoint built from other inputs is refused in one sentence with the fix, never overwritten.
"""
import argparse
import os
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

import tokenizer as tok
from checks import (check_output, count, existing_device, fraction, fraction_range, guidance_scale, integrity,
                    non_negative, positive, positive_int, read_checkpoint, scale_list, seed_int,
                    weights_fingerprint as state_fingerprint)
from data import atomic_write, parents, prepare_tokens
from model import PRESETS, GPTConfig, add_decode_flag, compile_decode, load_checkpoint

# flags every run of one pipeline shares: the parents built for a run get them too
STAGE_FLAGS = ("methods", "out_dir", "data_dir", "grid", "flip", "image_size", "tokenizer", "teacher", "teacher_preset", "teacher_size",
               "teacher_iters", "size", "batch_size", "seed", "device", "compile", "eval_interval", "eval_seqs",
               "ckpt_interval")
# what a run's weights depend on besides its inputs: a checkpoint is reused or continued only with the same
RECIPE = ("method", "size", "max_iters", "batch_size", "lr", "min_lr_frac", "warmup", "schedule", "weight_decay",
          "grad_clip", "seed", "tau", "ce_weight", "lam", "beta", "supervise", "prefix_frac", "threshold",
          "no_entropy_weights", "no_truncation", "no_groups", "groups", "no_parallel", "window", "pool_size", "pool_refresh", "pool_cfg",
          "teacher_cfg", "cca_beta", "cca_lambda", "taid_t_start", "taid_alpha", "taid_beta")
# flags added to RECIPE later, with the value a checkpoint written before them was trained with
RECIPE_SINCE = {"teacher_cfg": 1.0, "cca_beta": 0.02, "cca_lambda": 1000.0, "taid_t_start": 0.4, "taid_alpha": 5e-4,
                "taid_beta": 0.99}
ROLES = {"teacher": "teacher", "ce": "no-KD student", "kd": "stage-1 KD student"}
TEACHER_MINUTES = 13  # per 1000 steps at the default size on 2 CPU cores (RESULTS.md), for the messages


def parser(description=None, methods=None, eval_cfg="1,2"):
    """Every flag of a run; methods: distill.METHODS, the table the per-method defaults come from;
    eval_cfg: the guidance scales of the final table (the study's grid is wider)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(methods=methods)
    p.add_argument("--method", default="ce", choices=list(methods), help="; ".join(
        f"{name}: {m['divergence']} on {m['contexts']}" for name, m in methods.items()) + " (default: ce)")
    p.add_argument("--size", "--student-preset", default="student", help=f"model preset: one of "
                   f"{', '.join(PRESETS)}; 'teacher' and 'student' are the CPU defaults (default: student)")
    p.add_argument("--out", help="checkpoint path (default: out/teacher.pt for --size teacher, "
                   "else out/<method>/ckpt.pt)")
    p.add_argument("--out-dir", default="out", help="where the tokenizer, token cache and "
                   "checkpoints live (default: out)")
    p.add_argument("--data-dir", default="data", help="Fashion-MNIST folder (default: data, then the "
                   "Debian package's, then download); a folder with train/ (and val/) of one subfolder per "
                   "class, e.g. ImageNet, is encoded once to the token cache, over all ranks")
    p.add_argument("--grid", type=int, default=7, choices=sorted(tok.GRIDS), help="Fashion-MNIST: codes per image "
                   "side, 7 (49 codes: the parents in weights/) or 14 (196 codes, the long horizon: the parents in "
                   "weights/grid14/ where shipped; its runs, and any parent missing there, under <out-dir>/grid14/) (default: 7)")
    p.add_argument("--flip", action="store_true", help="Fashion-MNIST: train on the mirror images too, as "
                   "LlamaGen extracts ImageNet (default: off; measured worse here: footwear faces one way)")
    p.add_argument("--image-size", type=positive_int, help="side of the images the tokenizer encodes, e.g. 384 for "
                   "LlamaGen's 384-px models (default: the tokenizer's own, 256 for VQ-16)")
    p.add_argument("--tokenizer", help="tokenizer checkpoint, trained if missing (default: the shipped one, "
                   "weights/tokenizer.pt; an image folder needs its own)")
    p.add_argument("--teacher", help="teacher checkpoint for the KD methods (default: weights/teacher.pt with the "
                   "shipped tokenizer, else <out-dir>/teacher.pt, trained if missing)")
    p.add_argument("--teacher-preset", choices=list(PRESETS), help="preset of a --teacher without a config, e.g. L for LlamaGen's "
                   "c2i_L_256.pt (--size is the student's: B for c2i_B_256.pt)")
    p.add_argument("--init", "--student", help="student checkpoint to start from (default: the no-KD student for "
                   "kd: weights/student.pt with the shipped tokenizer, else <out-dir>/ce/ckpt.pt; <out-dir>/kd/ckpt.pt "
                   "for seqkd/onpolicy/varkd: the paper's two stages; 'none' = scratch)")
    kd = p.add_argument_group("distillation (defaults: the paper's settings where it gives them)")
    kd.add_argument("--tau", type=positive, default=1.0, help="kd/seqkd temperature, > 0 (default: 1.0)")
    kd.add_argument("--ce-weight", type=non_negative, default=0.0, help="adds this x next-code CE on the data "
                    "positions, >= 0; the paper uses none (default: 0)")
    kd.add_argument("--lam", type=fraction, help="fraction of steps on student rollouts, else data, in [0, 1] (default: "
                    "0.1 for onpolicy as GKD; 1.0 for varkd, our choice: the paper is silent)")
    kd.add_argument("--beta", type=fraction, help="generalized JSD beta in [0, 1], 0 forward KL, 1 reverse KL (default: "
                    "0.5 for onpolicy as GKD; 1.0 for varkd, the reverse KL of the paper)")
    kd.add_argument("--supervise", choices=["prefix-kd", "all", "sampled"], help="on a rollout's real prefix: "
                    "prefix-kd = teacher-forced KD (forward KL, as kd) there and the method's divergence on the "
                    "student-sampled codes; all = the method's divergence everywhere (GKD scores whole sequences); "
                    "sampled = the sampled codes only (default: prefix-kd for onpolicy and varkd: a class-"
                    "conditional sampler draws the prefix's codes too)")
    kd.add_argument("--prefix-frac", type=fraction_range, default="0.25,0.75", help="real prefix length range as "
                    "fractions lo,hi of T, 0 <= lo <= hi < 1 (default: 0.25,0.75)")
    kd.add_argument("--threshold", type=fraction, default=0.1, help="varkd truncation threshold on alpha, in "
                    "[0, 1] (default: 0.1)")
    kd.add_argument("--no-entropy-weights", action="store_true", help="varkd ablation: alpha_t = 1")
    kd.add_argument("--no-truncation", action="store_true", help="varkd ablation: keep positions after a low alpha")
    kd.add_argument("--no-groups", action="store_true", help="varkd ablation: no codebook relaxation")
    kd.add_argument("--groups", type=positive_int, help="codebook groups, 1 to |V| (default: |V|/4)")
    kd.add_argument("--no-parallel", action="store_true", help="varkd ablation: sequential rollouts, not ZipAR")
    kd.add_argument("--window", type=positive_int, default=5, help="ZipAR window: a row starts once this many codes "
                    "of the row above are decoded, >= 1; the grid side or more = raster order (default: 5 of 7)")
    kd.add_argument("--pool-size", type=positive_int, default=8192, help="seqkd: teacher samples per pool, >= 1 "
                    "(default: 8192)")
    kd.add_argument("--pool-refresh", type=positive_int, default=250, help="seqkd: steps between new pools, >= 1; at batch 128 "
                    "each sample is seen about 4 times (default: 250)")
    kd.add_argument("--pool-cfg", type=guidance_scale, help="seqkd: CFG scale of the teacher's samples, >= 0 "
                    "(default: --teacher-cfg: the distribution the student is taught)")
    kd.add_argument("--teacher-cfg", type=guidance_scale, default=1.0, help="the target of kd, seqkd, onpolicy, "
                    "varkd and taid: the teacher's logits with this classifier-free guidance, l_u + S (l_c - l_u), so that "
                    "the student learns to sample like the guided teacher without guidance (one pass per code); "
                    ">= 0 (default: 1, the teacher's own logits)")
    kd.add_argument("--taid-t-start", type=fraction, default=0.4, help="taid: t at step 0, in [0, 1]; t rises to 1 by "
                    "the last step (default: 0.4, the authors' for Phi-3 and Llama-2)")
    kd.add_argument("--taid-alpha", type=fraction, default=5e-4, help="taid: the adaptive part of t's rise per step, "
                    "in [0, 1] (default: 5e-4, the authors')")
    kd.add_argument("--taid-beta", type=fraction, default=0.99, help="taid: momentum of the loss's relative change, "
                    "in [0, 1] (default: 0.99, the authors')")
    kd.add_argument("--cca-beta", type=positive, default=0.02, help="cca: beta of the log-ratio per sequence, > 0 "
                    "(default: 0.02, the authors' for LlamaGen)")
    kd.add_argument("--cca-lambda", type=positive, default=1000.0, help="cca: weight of the mismatched pairs, > 0 "
                    "(default: 1000, the authors' for LlamaGen-B)")
    p.add_argument("--max-iters", type=positive_int, help="optimizer steps (>= 1) of this run and of the student runs "
                   "the pipeline builds first (default: --teacher-iters for the teacher, 12000 for ce as the "
                   "shipped student, 400 otherwise)")
    p.add_argument("--teacher-size", default="teacher", help="preset of the teacher the pipeline trains when "
                   "--teacher is missing (default: teacher)")
    p.add_argument("--teacher-iters", type=positive_int, default=3000, help="its optimizer steps, >= 1 (default: 3000, the "
                   "shipped teacher's)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="sequences per step, >= 1 (default: 128)")
    p.add_argument("--lr", type=positive, help="peak learning rate, > 0 (default: 3e-3 for ce, from scratch; 1e-3 "
                   "for the KD methods, which start from a trained student)")
    p.add_argument("--min-lr-frac", type=fraction, default=0.1, help="cosine floor as a fraction of "
                   "--lr, in [0, 1] (default: 0.1)")
    p.add_argument("--warmup", type=count, default=100, help="linear warm-up steps, >= 0 (default: 100)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"],
                   help="learning-rate schedule after warm-up (default: cosine)")
    p.add_argument("--weight-decay", type=non_negative, default=0.05, help="AdamW decay on matrices, >= 0 "
                   "(default: 0.05, LlamaGen's)")
    p.add_argument("--grad-clip", type=positive, default=1.0, help="max gradient norm, > 0 (default: 1.0)")
    p.add_argument("--eval-interval", type=positive_int, default=250, help="steps between held-out NLL "
                   "evaluations, >= 1 (default: 250)")
    p.add_argument("--eval-seqs", type=positive_int, default=2000, help="test sequences for the periodic "
                   "NLL, >= 1; the final one uses the whole split (default: 2000)")
    p.add_argument("--ckpt-interval", type=positive_int, default=250, help="steps between checkpoints, >= 1 "
                   "(default: 250)")
    p.add_argument("--eval-samples", type=count, default=5000, help="samples per model for the final table's "
                   "FID-cls and friends, >= 0, 0 = none (default: 5000)")
    p.add_argument("--eval-cfg", type=scale_list, default=eval_cfg, help="their classifier-free guidance scales, "
                   f"comma-separated, each >= 0: every model is scored at each (default: {eval_cfg}; 1 is no guidance)")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run at --out (with "
                   "the flags it was started with); the parents the pipeline builds are always continued")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of init, data order and dropout, >= 0 (default: 0)")
    p.add_argument("--device", type=existing_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda, one this machine has (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off for "
                   "runs of several minutes)")
    add_decode_flag(p)
    return p


def get_args(argv=None, p=None, **stage):
    """Parse argv (with parser p, default parser()), then fill in what depends on the method.
    stage: values that override the parsed ones (the pipeline's parent runs)."""
    p = p or parser(methods=stage["methods"])
    args = p.parse_args(argv)
    vars(args).update(stage)
    for size in (args.size, args.teacher_size):
        if size not in PRESETS:
            p.error(f"unknown size {size!r}: choose one of {', '.join(PRESETS)}")
    max_iters = args.max_iters  # passed on only when given: each stage has its own default
    if args.grid != 7 and Path(args.out_dir).name != f"grid{args.grid}":  # another grid: a tree of its own
        args.out_dir = f"{args.out_dir}/grid{args.grid}"
    if args.out is None:
        args.out = (f"{args.out_dir}/teacher.pt" if args.size == "teacher" and args.method == "ce"
                    else f"{args.out_dir}/{args.method}/ckpt.pt")
    # the shipped parents go with the shipped tokenizer (Fashion-MNIST's default); another tokenizer,
    # or an image folder, has its parents under the out-dir, built there if missing
    folder = Path(args.data_dir, "train").is_dir()
    home = parents(args.grid, args.out_dir)  # weights/ (or weights/grid14/) where shipped, else the out-dir's tree
    args.tokenizer = args.tokenizer or (None if folder else home["tokenizer"])
    shipped = args.tokenizer is not None and Path(args.tokenizer).resolve() == Path(home["tokenizer"]).resolve()
    args.teacher = args.teacher or (home["teacher"] if shipped else f"{args.out_dir}/teacher.pt")
    student = home["student"] if shipped else f"{args.out_dir}/ce/ckpt.pt"
    if args.max_iters is None and args.method == "ce" and (args.out == args.teacher or args.size == args.teacher_size):
        args.max_iters = args.teacher_iters
    for key in ("max_iters", "init", "lr", "lam", "beta", "supervise"):
        value = args.methods[args.method][key]
        if getattr(args, key) is None:
            setattr(args, key, value.format(out_dir=args.out_dir, student=student) if isinstance(value, str) else value)
    if args.pool_cfg is None:
        args.pool_cfg = args.teacher_cfg
    if args.teacher_cfg != 1 and args.method in ("ce", "cca"):
        p.error(f"--teacher-cfg {args.teacher_cfg:g}: {args.method} has no teacher to guide; pass it with kd, seqkd, "
                f"onpolicy or varkd")
    args.stage_flags = {**{k: getattr(args, k) for k in STAGE_FLAGS}, "max_iters": max_iters}
    return args


def stage_args(args, stage):
    """The run of a parent ('teacher', 'ce' or 'kd') the pipeline builds for `args`: that method's
    defaults plus the flags every run shares. The teacher does not depend on --seed: one teacher
    serves every seed of a study."""
    if stage == "teacher":
        return get_args([], **{**args.stage_flags, "method": "ce", "size": args.teacher_size,
                               "max_iters": args.teacher_iters, "seed": 0, "out": args.teacher})
    return get_args([], **args.stage_flags, method=stage)


def pipeline(args):
    """The runs `args` needs, parents first, then `args`. Parents are built only at the paths of the
    out-dir: <out-dir>/teacher.pt, <out-dir>/ce/ckpt.pt (the no-KD student), <out-dir>/kd/ckpt.pt
    (stage-1 KD). By default the teacher and the no-KD student are the shipped ones (weights/), so
    a stage-2 method builds stage-1 KD alone; any other --teacher or --init must exist."""
    runs, run = [], args
    if args.method not in ("ce", "cca") and args.teacher == f"{args.out_dir}/teacher.pt":
        runs.append(stage_args(args, "teacher"))
    parents = []
    while run.method != "ce" and run.init in (f"{args.out_dir}/ce/ckpt.pt", f"{args.out_dir}/kd/ckpt.pt"):
        run = stage_args(args, "kd" if run.init.endswith("/kd/ckpt.pt") else "ce")
        parents.insert(0, run)
        if Path(run.out).exists():  # reused or continued from what it was started with: its parents are not needed
            break
    return [r for r in runs + parents if r.out != args.out] + [args]


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def setup_ddp(args):
    """torchrun sets RANK: one process per GPU (nccl) or per CPU worker (gloo), nanoGPT's way."""
    if "RANK" in os.environ and not dist.is_initialized():
        cuda = args.device.startswith("cuda")
        if cuda:  # "cuda" then means this process's GPU, for every run of the pipeline
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank_world()


def teardown_ddp():
    if dist.is_initialized():
        dist.destroy_process_group()


def load_data(args):
    """The tokenizer (trained on first use, Fashion-MNIST only) and the train/test token caches:
    Fashion-MNIST encoded by rank 0, an image folder (ImageNet) by every rank, each its share."""
    rank, world = rank_world()
    folder = Path(args.data_dir, "train").is_dir()
    if rank > 0 and not folder:
        dist.barrier()  # wait for rank 0 to build what is missing
    if folder and (args.tokenizer is None or not Path(args.tokenizer).exists()):
        raise SystemExit(f"no tokenizer at {args.tokenizer}: an image folder needs a trained one, e.g. "
                         f"--tokenizer vq_ds16_c2i.pt (LlamaGen's VQ-16)")
    if not Path(args.tokenizer).exists():
        print(f"no tokenizer at {args.tokenizer}: training one (about 11 minutes on 2 CPU cores)")
        tok.build(args.tokenizer, args.data_dir, grid=args.grid)
    tokenizer = tok.load_tokenizer(args.tokenizer, image_size=args.image_size)
    if not folder and tokenizer.cfg.grid_size != args.grid:
        raise SystemExit(f"the tokenizer {args.tokenizer} encodes {tokenizer.cfg.grid_size}x{tokenizer.cfg.grid_size} "
                         f"codes, not the --grid {args.grid} asked: pass --grid {tokenizer.cfg.grid_size}, or a "
                         f"tokenizer built with `python tokenizer.py --grid {args.grid}`")
    if folder:
        tokenizer.to(args.device)
    splits = prepare_tokens(tokenizer, args.data_dir, Path(args.out_dir) / "tokens", rank, world, args.flip)
    if rank == 0 and world > 1 and not folder:
        dist.barrier()
    return tokenizer, splits


def load_parent(path, role, fingerprints, device, preset, tokenizer):
    """A teacher or starting student (ours, or LlamaGen's with its preset), refused unless built on
    the same tokenizer and data. Returns the model, its weights' fingerprint and its recorded test
    NLL and KL when they were measured against this run's teacher."""
    flag = "teacher" if role == "teacher" else "init"
    if not Path(path).exists():
        raise SystemExit(f"no {role} at {path}: pass an existing checkpoint as --{flag}, or drop --{flag} "
                         f"and the pipeline builds one")
    ckpt = read_checkpoint(path, f"{role} checkpoint (--{flag})", f"pass a checkpoint of distill.py as --{flag}")
    theirs = ckpt.get("fingerprints", {})
    for key in ("tokenizer", "data"):
        if key in theirs and theirs[key] != fingerprints[key]:
            raise SystemExit(f"the {role} {path} was built on {key} {theirs[key]}, not on this run's "
                             f"{fingerprints[key]}: retrain it, or pass the --tokenizer it was built with")
    # a preset builds a checkpoint without a config (LlamaGen's); ours record their config and fingerprint
    model = load_checkpoint(path, None if "config" in ckpt else preset, tokenizer.cfg.grid_size, tokenizer.fingerprint,
                            ckpt)
    if model.config.vocab_size != tokenizer.cfg.codebook_size:
        raise SystemExit(f"the {role} {path} predicts {model.config.vocab_size} codes, the tokenizer has "
                         f"{tokenizer.cfg.codebook_size}: pass the --tokenizer it was trained with")
    weights_fp = model.fingerprint
    measured = ckpt.get("metrics", {}) if theirs.get("teacher", 0) == fingerprints.get("teacher") else {}
    return model.to(device), weights_fp, {k: measured[k] for k in ("test_nll", "test_kl") if k in measured}


def existing_run(args, fingerprints, config, role):
    """The checkpoint at args.out to reuse or continue, or None to start. Refuses one built from
    other inputs, of another size or, for the run asked for, with other flags; a parent the
    pipeline needs is continued with the flags it was started with."""
    if not Path(args.out).exists():
        if args.resume and role is None and rank_world()[0] == 0:  # a mistyped --out would start over unnoticed
            print(f"--resume: no checkpoint at {args.out} to continue, so the run starts there from step 0")
        return None
    fix = "pass --out elsewhere (nothing is overwritten)"
    ckpt = read_checkpoint(args.out, "checkpoint of distill.py", fix)
    if not all(k in ckpt for k in ("fingerprints", "config", "args", "step", "model", "optimizer", "rng")):
        raise SystemExit(f"{args.out} exists and is not a checkpoint of distill.py (it cannot be continued): {fix}")
    moments = [v for s in ckpt["optimizer"].get("state", {}).values() for v in s.values() if torch.is_tensor(v)]
    if not all(torch.isfinite(v).all() for v in moments if v.is_floating_point()):
        raise SystemExit(f"{args.out} is damaged: its optimizer state holds values that are not finite (we never save "
                         f"those); delete it to start over, or restore it from a copy")
    theirs = ckpt["fingerprints"]
    for key in sorted(set(theirs) | set(fingerprints)):
        if theirs.get(key) != fingerprints.get(key):
            raise SystemExit(f"{args.out} was built from another {key} ({theirs.get(key)}, now "
                             f"{fingerprints.get(key)}): delete it to rebuild it, or pass --out elsewhere")
    if ckpt["config"] != asdict(config):
        c = ckpt["config"]
        raise SystemExit(f"{args.out} holds a {c['n_layer']}-layer model of width {c['dim']}, not --size "
                         f"{args.size} ({config.n_layer} x {config.dim}): pass the --size it was trained with, "
                         f"or --out elsewhere")
    recipe = {k: ckpt["args"].get(k, RECIPE_SINCE.get(k)) for k in RECIPE}
    differs = [f"--{k.replace('_', '-')} {recipe[k]} (now {getattr(args, k)})" for k in RECIPE if recipe[k] != getattr(args, k)]
    if differs and role is None:
        raise SystemExit(f"{args.out} was trained with {', '.join(differs)}: pass the same flags to reuse "
                         f"or continue it, or --out elsewhere (nothing is overwritten)")
    if ckpt["step"] < ckpt["args"]["max_iters"] and role is None and not args.resume:
        raise SystemExit(f"{args.out} stopped at step {ckpt['step']} of {ckpt['args']['max_iters']}: pass "
                         f"--resume to continue it, or --out elsewhere (nothing is overwritten)")
    return ckpt


def open_run(args, tokenizer, splits, role=None):
    """Everything one run starts from, checked: its flags (a parent's: those it was started with), the
    fingerprints of its inputs, the teacher (cca: the frozen reference), the student it starts from
    (init, or None: fresh), the checkpoint at --out it continues (ckpt, or None), the step and the
    metrics. done: the checkpoint at --out is finished and is reused as it is."""
    rank, world = rank_world()
    device = torch.device(args.device)
    (_, train_labels, data_fp) = splits["train"]
    fingerprints = {"tokenizer": tokenizer.fingerprint, "data": data_fp}
    config = GPTConfig(**PRESETS[args.size], vocab_size=tokenizer.cfg.codebook_size,
                       num_classes=int(train_labels.max()) + 1, grid_size=tokenizer.cfg.grid_size)
    if role is not None and Path(args.out).exists():  # a parent keeps the inputs it was started with
        started = read_checkpoint(args.out, "checkpoint of distill.py", "pass --out elsewhere").get("args", {})
        args = argparse.Namespace(**{**vars(args), **{k: started[k] for k in ("init", "teacher", "teacher_preset")
                                                      if k in started}})
    teacher = init = reference = None
    if args.method == "cca" and args.init == "none":
        raise SystemExit("cca fine-tunes a trained model against a frozen copy of it: pass a checkpoint as --init "
                         "(default: the no-KD student), not none")
    # cca trains without a teacher: one that exists is loaded for the held-out KL alone
    if args.method != "ce" and (args.method != "cca" or Path(args.teacher).exists()):
        teacher, fingerprints["teacher"], _ = load_parent(args.teacher, "teacher", fingerprints, device,
                                                          args.teacher_preset, tokenizer)
        compile_decode(teacher.requires_grad_(False), args.decode)  # SeqKD's pool samples it
        if teacher.config.num_classes != config.num_classes:  # the null class of one is a real class of the other
            raise SystemExit(f"the teacher {args.teacher} has {teacher.config.num_classes} classes, the data "
                             f"{config.num_classes}: pass a teacher trained on these classes as --teacher")
    init_measured = {}
    if args.init != "none":
        init, fingerprints["init"], init_measured = load_parent(args.init, "student", fingerprints, device,
                                                                args.size, tokenizer)
        if asdict(init.config) != asdict(config):
            raise SystemExit(f"{args.init} is not a --size {args.size} model ({init.config.n_layer} layers of "
                             f"width {init.config.dim}, not {config.n_layer} x {config.dim}): pass the --size it "
                             f"was trained with")
    if args.method == "cca":  # CCA's reference: the starting model, frozen
        reference = init.requires_grad_(False).eval()
    ckpt = existing_run(args, fingerprints, config, role)
    if ckpt is not None and role is not None:  # a parent runs with the flags it was started with
        args = argparse.Namespace(**{**vars(args), **{k: ckpt["args"].get(k, RECIPE_SINCE.get(k)) for k in RECIPE}})
    run = SimpleNamespace(args=args, config=config, fingerprints=fingerprints, teacher=teacher, reference=reference, done=False,
                          init=init, ckpt=ckpt, start=0, metrics={"wall_time": 0.0}, init_measured=init_measured,
                          role=role)
    if ckpt is not None and ckpt["step"] >= args.max_iters:
        if rank == 0:
            print(f"{role or args.method} {args.out}: built ({args.method}, {ckpt['step']} steps), reusing it")
        run.done, run.metrics = True, ckpt["metrics"]
        return run
    if args.groups and args.groups > config.vocab_size:
        raise SystemExit(f"--groups {args.groups} is more than the {config.vocab_size} codes: pass 1 to {config.vocab_size}")
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} does not split over {world} processes: pass a multiple of {world}")
    if ckpt is not None:
        run.start, run.metrics = ckpt["step"], ckpt["metrics"]
    return run


def announce(run, n_params):
    """What a run is about to do, in one line: continue, or train (with its time on 2 CPU cores)."""
    args, role, config = run.args, run.role, run.config
    if rank_world()[0] > 0:
        return
    what = (f"{args.method}, {args.size} model ({n_params / 1e6:.2f}M parameters), {args.max_iters} steps of "
            f"{args.batch_size} sequences x {config.block_size} codes -> {args.out}")
    if run.ckpt is not None:
        print(f"{args.out} stopped at step {run.start}: continuing it ({what})")
    else:
        stage = "teacher" if role == "teacher" else args.method
        # the figures are the 7x7 grid's; at 14x14 a step costs several times more: no estimate
        default = (args.size == ("teacher" if role == "teacher" else "student") and args.batch_size == 128
                   and args.grid == 7)
        minutes = (TEACHER_MINUTES if stage == "teacher" else args.methods[stage]["minutes"]) * args.max_iters / 1000
        about = f", about {minutes:.0f} minutes on 2 CPU cores" if default and minutes else ""
        print(f"no {role} at {args.out}: training one ({what}{about})" if role else f"{what}{about}")


def weights_fingerprint(model):
    return state_fingerprint(model.state_dict())


def check_ranks_agree(model, world):
    """DDP keeps the ranks' weights equal: checked once, at the end of a run."""
    weights = [None] * world
    dist.all_gather_object(weights, weights_fingerprint(model))
    if len(set(weights)) > 1:
        raise SystemExit(f"the {world} ranks ended with different weights: a bug, please report it")


def export(src, dst):
    """A finished checkpoint without its optimizer state and RNG (a third of the size): what weights/
    ships. It still records its config, flags, fingerprints and figures; it cannot be continued."""
    if Path(dst).exists():
        raise SystemExit(f"{dst} exists: delete it first to replace it, or pass another DST to --export")
    check_output(dst, "--export")
    ckpt = read_checkpoint(src, "checkpoint of distill.py", "pass a finished run's checkpoint to --export")
    if "metrics" not in ckpt or ckpt.get("step") != ckpt.get("args", {}).get("max_iters"):
        raise SystemExit(f"{src} is not a finished run of ours: only finished runs are exported")
    atomic_write(dst, lambda tmp: torch.save({k: v for k, v in ckpt.items() if k not in ("optimizer", "rng")}, tmp))
    print(f"{src} -> {dst}: {Path(dst).stat().st_size / 1e6:.2f} MB, test NLL {ckpt['metrics']['test_nll']:.4f}")


def save_checkpoint(path, model, optimizer, step, args, fingerprints, metrics):
    """Atomically: the weights and their fingerprint, config, optimizer, step, flags, RNG state, the
    fingerprints of the inputs and the metrics so far."""
    state = {"model": model.state_dict(), "config": asdict(model.config), "optimizer": optimizer.state_dict(),
             "step": step, "args": {k: v for k, v in vars(args).items() if k not in ("methods", "stage_flags")}, "rng": torch.get_rng_state(), "fingerprints": fingerprints,
             "fingerprint": weights_fingerprint(model), "metrics": metrics}
    state["integrity"] = integrity(state)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
