"""Knowledge distillation of visual autoregressive models: THE training loop, and the main job.

    python distill.py --method varkd        # everything missing, then VarKD: out/varkd/ckpt.pt + a table
    python distill.py --method ce --size teacher            # just the teacher: out/teacher.pt
    python distill.py --method varkd --resume               # continue a killed run
    python distill.py --study --seeds 0,1,2                 # every method, three seeds (study.py)
    torchrun --standalone --nproc_per_node 8 distill.py --method varkd --batch-size 256

The main job builds what the method needs and is missing, in order, and reuses what exists: the
data, the tokenizer out/tokenizer.pt, the token cache out/tokens/, the teacher out/teacher.pt, the
no-KD student out/ce/, stage-1 KD out/kd/ (from out/ce/), then the method (stage 2 from out/kd/).
It ends with one table line per finished model in out/ (evaluate.py). Every method minimises E over
contexts x_<t of D(p_T(.|x_<t), p_S(.|x_<t)); they differ in where the contexts come from and in D
(Peruzzo et al. 2026, "Knowledge Distillation for Visual Autoregressive Models"):

    method    contexts                                   D
    ce        data                                       cross-entropy with the data code
    kd        data (teacher-forced)                      forward KL(p_T^tau || p_S^tau) tau^2
    seqkd     teacher samples (a pool, refreshed)        forward KL
    onpolicy  data, or w.p. lambda a mixed rollout       generalized JSD_beta (GKD)
    varkd     mixed rollouts: real prefix, the student   alpha_t-weighted reverse KL on the sampled
              samples the rest                           positions, truncated after the first
                                                         alpha_t < 0.1, over codebook groups

AdamW (betas 0.9/0.95, decay on matrices only, as LlamaGen), warm-up then cosine, clipping at 1.0,
held-out NLL and KL to the teacher every --eval-interval steps, atomic checkpoints every
--ckpt-interval steps recording the config, the flags and the fingerprints of the data, tokenizer,
teacher and starting checkpoint: anything built from other inputs is refused, never overwritten.
DDP under torchrun (gloo on CPU, nccl on GPUs), bf16 autocast on GPUs.
"""
import argparse
import contextlib
import functools
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import study
import tokenizer as tok
from data import atomic_write, fingerprint, folder_token_cache, load_fashion_mnist, token_cache
from model import GPT, PRESETS, GPTConfig, load_checkpoint
from evaluate import held_out, table
from sample import generate, mixed_rollout


# ------------------------------------------------------------------------------------------------
# The losses. Every method minimises E over contexts x_<t of D(p_T(.|x_<t), p_S(.|x_<t)) (Peruzzo et
# al., Eq. 1); the methods differ in where the contexts come from and in D. Logits are (B, T, V).


def jsd(s_logp, t_logp, beta):
    """Generalized Jensen-Shannon divergence per position (Agarwal et al. 2024, Eq. 2; TRL's GKD):
    beta KL(p_T || M) + (1 - beta) KL(p_S || M), M = beta p_T + (1 - beta) p_S. As TRL, beta 0 is the
    forward KL(p_T || p_S) and beta 1 the reverse KL(p_S || p_T). Log-probabilities in, (B, T) out."""
    if beta == 0:
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    if beta == 1:
        return (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    m_logp = torch.logsumexp(torch.stack([t_logp + math.log(beta), s_logp + math.log(1 - beta)]), 0)
    return (beta * (t_logp.exp() * (t_logp - m_logp)).sum(-1)
            + (1 - beta) * (s_logp.exp() * (s_logp - m_logp)).sum(-1))


def kd_loss(s_logits, t_logits, tau=1.0):
    """Hinton et al.: forward KL(p_T^tau || p_S^tau) * tau^2 at every position."""
    return jsd(F.log_softmax(s_logits / tau, -1), F.log_softmax(t_logits / tau, -1), 0).mean() * tau ** 2


def gkd_loss(s_logits, t_logits, beta=0.5):
    """GKD: generalized JSD_beta at every position."""
    return jsd(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), beta).mean()


def entropy_weights(t_logits, threshold=0.1, mask=None):
    """VarKD's trust in the teacher, alpha_t = 1 - H(p_T(.|x_<t)) / log|V| (B, T). With a threshold,
    truncation: every position after the first supervised one (inside `mask`) with alpha_t below
    it gets 0, since the teacher's later signals are conditioned on a context it does not trust."""
    logp = F.log_softmax(t_logits, -1)
    alpha = 1 - (-(logp.exp() * logp).sum(-1)) / math.log(t_logits.shape[-1])  # (B, T)
    if threshold is None:
        return alpha
    low = alpha < threshold
    if mask is not None:
        low &= mask
    after_first_low = (low.cumsum(-1) - low.long()) > 0  # strictly after the first low position
    return alpha.masked_fill(after_first_low, 0.0)


def group_logp(logits, groups, n_groups):
    """log of the probabilities summed within codebook groups: (B, T, V) -> (B, T, G)."""
    logp = F.log_softmax(logits, -1)
    shift = logp.amax(-1, keepdim=True)  # log-sum-exp per group, stable
    summed = torch.zeros(*logp.shape[:-1], n_groups, device=logp.device).index_add_(-1, groups, (logp - shift).exp())
    return summed.clamp_min(1e-30).log() + shift


def varkd_loss(s_logits, t_logits, weights, mask, groups=None, beta=1.0):
    """VarKD: mean over the mask positions of weights * D(p_S, p_T), both distributions first summed
    within the codebook groups (a LongTensor (V,) of group ids) when given. D is the reverse KL
    (beta 1) by default; the student still predicts the full vocabulary."""
    if groups is None:
        s_logp, t_logp = F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1)
    else:
        n = int(groups.max()) + 1
        s_logp, t_logp = group_logp(s_logits, groups, n), group_logp(t_logits, groups, n)
    mask = mask.float()
    return (weights * jsd(s_logp, t_logp, beta) * mask).sum() / mask.sum().clamp_min(1)


METHODS = ("ce", "kd", "seqkd", "onpolicy", "varkd")
# flags every run of one pipeline shares: the parents built for a run get them too
SHARED = ("out_dir", "data_dir", "image_size", "tokenizer", "teacher", "teacher_preset", "teacher_size",
          "teacher_iters", "size", "batch_size", "seed", "device", "compile", "eval_interval", "eval_seqs",
          "ckpt_interval")
# what a run's weights depend on besides its inputs: a checkpoint is reused or continued only with the same
RECIPE = ("method", "size", "max_iters", "batch_size", "lr", "min_lr_frac", "warmup", "schedule", "weight_decay",
          "grad_clip", "seed", "tau", "ce_weight", "lam", "beta", "prefix_frac", "threshold", "no_entropy_weights",
          "no_truncation", "no_groups", "groups", "no_parallel", "window", "pool_size", "pool_refresh", "pool_cfg")
ROLES = {"teacher": "teacher", "ce": "no-KD student", "kd": "stage-1 KD student"}
MINUTES = {"teacher": 8, "ce": 2, "kd": 4, "seqkd": 5, "onpolicy": 4, "varkd": 6}  # default sizes, 2 CPU cores


def get_args(argv=None, **stage):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="ce", choices=list(METHODS), help="ce: next-code cross-entropy "
                   "on data (teacher, no-KD student); kd: forward KL on data; seqkd: forward KL on teacher "
                   "samples; onpolicy: GKD on mixed rollouts; varkd (default: ce)")
    p.add_argument("--size", "--student-preset", default="student", help=f"model preset: one of "
                   f"{', '.join(PRESETS)}; 'teacher' and 'student' are the CPU defaults (default: student)")
    p.add_argument("--out", help="checkpoint path (default: out/teacher.pt for --size teacher, "
                   "else out/<method>/ckpt.pt)")
    p.add_argument("--out-dir", default="out", help="where the tokenizer, token cache and "
                   "checkpoints live (default: out)")
    p.add_argument("--data-dir", default="data", help="Fashion-MNIST folder (default: data, then the "
                   "Debian package's, then download); a folder with train/ (and val/) of one subfolder per "
                   "class, e.g. ImageNet, is encoded once to the token cache, over all ranks")
    p.add_argument("--image-size", type=int, help="side of the images the tokenizer encodes, e.g. 384 for "
                   "LlamaGen's 384-px models (default: the tokenizer's own, 256 for VQ-16)")
    p.add_argument("--tokenizer", help="tokenizer checkpoint (default: <out-dir>/tokenizer.pt, "
                   "trained if missing)")
    p.add_argument("--teacher", help="teacher checkpoint for the KD methods (default: <out-dir>/teacher.pt)")
    p.add_argument("--teacher-preset", help="preset of a --teacher without a config, e.g. L for LlamaGen's "
                   "c2i_L_256.pt (--size is the student's: B for c2i_B_256.pt)")
    p.add_argument("--init", "--student", help="student checkpoint to start from (default: <out-dir>/ce/ckpt.pt for kd, "
                   "<out-dir>/kd/ckpt.pt for seqkd/onpolicy/varkd: the paper's two stages; 'none' = scratch)")
    kd = p.add_argument_group("distillation (defaults: the paper's settings where it gives them)")
    kd.add_argument("--tau", type=float, default=1.0, help="kd/seqkd temperature (default: 1.0)")
    kd.add_argument("--ce-weight", type=float, default=0.0, help="adds this x next-code CE on the data "
                    "positions; the paper uses none (default: 0)")
    kd.add_argument("--lam", type=float, help="fraction of steps on student rollouts, else data (default: "
                    "0.1 for onpolicy as GKD; 1.0 for varkd, our choice: the paper is silent)")
    kd.add_argument("--beta", type=float, help="generalized JSD beta, 0 forward KL, 1 reverse KL (default: "
                    "0.5 for onpolicy as GKD; 1.0 for varkd, the reverse KL of the paper)")
    kd.add_argument("--prefix-frac", default="0.25,0.75", help="real prefix length range as fractions of T "
                    "(default: 0.25,0.75)")
    kd.add_argument("--threshold", type=float, default=0.1, help="varkd truncation threshold on alpha "
                    "(default: 0.1)")
    kd.add_argument("--no-entropy-weights", action="store_true", help="varkd ablation: alpha_t = 1")
    kd.add_argument("--no-truncation", action="store_true", help="varkd ablation: keep positions after a low alpha")
    kd.add_argument("--no-groups", action="store_true", help="varkd ablation: no codebook relaxation")
    kd.add_argument("--groups", type=int, help="codebook groups (default: |V|/4)")
    kd.add_argument("--no-parallel", action="store_true", help="varkd ablation: sequential rollouts, not ZipAR")
    kd.add_argument("--window", type=int, default=4, help="ZipAR window: a row starts when the row above is "
                    "this many codes in (default: 4)")
    kd.add_argument("--pool-size", type=int, default=8192, help="seqkd: teacher samples per pool (default: 8192)")
    kd.add_argument("--pool-refresh", type=int, default=250, help="seqkd: steps between new pools; at batch 128 each sample is seen about 4 times (default: 250)")
    kd.add_argument("--pool-cfg", type=float, default=1.0, help="seqkd: CFG scale of the teacher's samples "
                    "(default: 1.0, the teacher's own distribution)")
    p.add_argument("--max-iters", type=int, help="optimizer steps of this run and of the student runs "
                   "the pipeline builds first (default: --teacher-iters for the teacher, 400 otherwise)")
    p.add_argument("--teacher-size", default="teacher", help="preset of the teacher the pipeline trains when "
                   "--teacher is missing (default: teacher)")
    p.add_argument("--teacher-iters", type=int, default=600, help="its optimizer steps (default: 600)")
    p.add_argument("--batch-size", type=int, default=128, help="sequences per step (default: 128)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 3e-3 for ce, from scratch; 1e-3 "
                   "for the KD methods, which start from a trained student)")
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
    p.add_argument("--eval-samples", type=int, default=5000, help="samples per model for the final table's "
                   "FID-cls and friends, 0 = none (default: 5000)")
    p.add_argument("--eval-cfg", type=float, default=2.0, help="their classifier-free guidance (default: 2.0)")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run at --out (with "
                   "the flags it was started with); the parents the pipeline builds are always continued")
    p.add_argument("--seed", type=int, default=0, help="seed of init, data order and dropout (default: 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off for "
                   "runs of several minutes)")
    p.add_argument("--prepare", action="store_true", help="build the tokenizer and token caches, then stop "
                   "(ImageNet: the token extraction, over all ranks under torchrun)")
    p.add_argument("--study", action="store_true", help="run the reproduction study instead (study.py): "
                   "every method and the VarKD ablation for each of --seeds -> out/study/results.md")
    p.add_argument("--seeds", default="0,1,2", help="the study's seeds (default: 0,1,2)")
    p.add_argument("--study-iters", type=int, default=200, help="the study's stage-2 steps from the "
                   "stage-1 KD checkpoint, the same for every row (default: 200)")
    args = p.parse_args(argv)
    vars(args).update(stage)  # the pipeline's parent runs: their defaults plus the shared flags
    for size in (args.size, args.teacher_size):
        if size not in PRESETS:
            p.error(f"unknown size {size!r}: choose one of {', '.join(PRESETS)}")
    max_iters = args.max_iters  # shared only when given: each stage has its own default
    if args.out is None:
        args.out = (f"{args.out_dir}/teacher.pt" if args.size == "teacher" and args.method == "ce"
                    else f"{args.out_dir}/{args.method}/ckpt.pt")
    args.tokenizer = args.tokenizer or f"{args.out_dir}/tokenizer.pt"
    args.teacher = args.teacher or f"{args.out_dir}/teacher.pt"
    if args.init is None:
        args.init = {"ce": "none", "kd": f"{args.out_dir}/ce/ckpt.pt"}.get(args.method, f"{args.out_dir}/kd/ckpt.pt")
    args.lam = args.lam if args.lam is not None else {"onpolicy": 0.1, "varkd": 1.0}.get(args.method, 0.0)
    args.beta = args.beta if args.beta is not None else (1.0 if args.method == "varkd" else 0.5)
    if isinstance(args.prefix_frac, str):
        args.prefix_frac = tuple(float(x) for x in args.prefix_frac.split(","))
    args.max_iters = args.max_iters or (args.teacher_iters if args.out == args.teacher else 400)
    args.lr = args.lr or (3e-3 if args.method == "ce" else 1e-3)
    args.shared = {**{k: getattr(args, k) for k in SHARED}, "max_iters": max_iters}
    return args


def stage_args(args, stage):
    """The run of a parent ('teacher', 'ce' or 'kd') the pipeline builds for `args`: that method's
    defaults plus the flags every run shares. The teacher does not depend on --seed: one teacher
    serves every seed of a study."""
    if stage == "teacher":
        return get_args([], **{**args.shared, "method": "ce", "size": args.teacher_size,
                               "max_iters": args.teacher_iters, "seed": 0, "out": args.teacher})
    return get_args([], **args.shared, method=stage)


def pipeline(args):
    """The runs `args` needs, parents first (DESIGN.md, the main job): the teacher, the no-KD
    student (ce), stage-1 KD from it, then `args`. Parents are built only at their default paths: a
    --teacher or --init you pass must exist."""
    runs = []
    if args.method != "ce" and args.teacher == f"{args.out_dir}/teacher.pt":
        runs.append(stage_args(args, "teacher"))
    chain = {"ce": [], "kd": ["ce"]}.get(args.method, ["ce", "kd"])
    if chain and args.init == f"{args.out_dir}/{chain[-1]}/ckpt.pt":
        # a parent that exists is reused or continued from what it was started with: its parents are not needed
        start = max([i for i, m in enumerate(chain) if Path(f"{args.out_dir}/{m}/ckpt.pt").exists()], default=0)
        runs += [stage_args(args, m) for m in chain[start:]]
    return [r for r in runs if r.out != args.out] + [args]


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


def prepare_data(args):
    """The tokenizer and the train/test token caches, built on first use: Fashion-MNIST by rank 0,
    an image folder (ImageNet) by every rank, each encoding its share."""
    rank, world = rank_world()
    folder = Path(args.data_dir, "train").is_dir()
    if rank > 0 and not folder:
        dist.barrier()  # wait for rank 0 to build what is missing
    if not Path(args.tokenizer).exists() and folder:
        raise SystemExit(f"no tokenizer at {args.tokenizer}: an image folder needs a trained one, e.g. "
                         f"--tokenizer vq_ds16_c2i.pt (LlamaGen's VQ-16)")
    if not Path(args.tokenizer).exists():
        print(f"no tokenizer at {args.tokenizer}: training one (about 2 minutes on 2 CPU cores)")
        tok.build(args.tokenizer, args.data_dir)
    tokenizer = tok.load_tokenizer(args.tokenizer, image_size=args.image_size)
    if folder:
        tokenizer.to(args.device)
    encode = lambda x: tokenizer.encode(x).cpu().numpy()  # noqa: E731
    splits = {}
    for split in ("train", "test"):
        prefix = Path(args.out_dir) / "tokens" / split
        if not prefix.with_suffix(".json").exists() and rank == 0:
            print(f"no token cache at {prefix}.*: encoding the {split} split once")
        if folder:
            root = Path(args.data_dir, "train" if split == "train" or not Path(args.data_dir, "val").is_dir() else "val")
            if split == "test" and root.name == "train" and rank == 0:
                print(f"no {args.data_dir}/val/: the held-out figures are measured on 10,000 training sequences")
            codes, labels, data_fp = folder_token_cache(prefix.with_name(root.name), root, tokenizer.cfg.image_size,
                                                        encode, tokenizer.fingerprint, rank, world)
            if split == "test" and root.name == "train":
                codes, labels = codes[:10000], labels[:10000]
        else:
            images, labels = load_fashion_mnist(split, args.data_dir)
            codes, labels, data_fp = token_cache(prefix, images, labels, encode, tokenizer.fingerprint)
        # the training codes stay int16 in memory (ImageNet: 2.6M sequences x 256 codes), cast per batch
        codes = torch.from_numpy(np.array(codes).reshape(len(codes), -1))
        splits[split] = (codes if split == "train" else codes.long(), torch.from_numpy(np.asarray(labels)), data_fp)
    if rank == 0 and world > 1 and not folder:
        dist.barrier()
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


def load_parent(path, role, fingerprints, device, preset, tokenizer):
    """A teacher or starting student (ours, or LlamaGen's with its preset), refused unless built on
    the same tokenizer and data."""
    if not Path(path).exists():
        flag = "teacher" if role == "teacher" else "init"
        raise SystemExit(f"no {role} at {path}: pass an existing checkpoint as --{flag}, or drop --{flag} "
                         f"and the pipeline builds one")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    theirs = ckpt.get("fingerprints", {})
    for key in ("tokenizer", "data"):
        if key in theirs and theirs[key] != fingerprints[key]:
            raise SystemExit(f"the {role} {path} was built on {key} {theirs[key]}, not on this run's "
                             f"{fingerprints[key]}: retrain it, or pass the --tokenizer it was built with")
    # a preset builds a checkpoint without a config (LlamaGen's); ours record their config and fingerprint
    model = load_checkpoint(path, None if "config" in ckpt else preset, tokenizer.cfg.grid_size)
    if model.config.vocab_size != tokenizer.cfg.codebook_size:
        raise SystemExit(f"the {role} {path} predicts {model.config.vocab_size} codes, the tokenizer has "
                         f"{tokenizer.cfg.codebook_size}: pass the --tokenizer it was trained with")
    weights_fp = ckpt.get("fingerprint") or fingerprint(*(v.numpy() for v in model.state_dict().values()))
    # its test NLL and KL, measured at the end of its run against this run's teacher, if it was
    measured = ckpt.get("metrics", {}) if theirs.get("teacher", 0) == fingerprints.get("teacher") else {}
    return model.to(device), weights_fp, {k: measured[k] for k in ("test_nll", "test_kl") if k in measured}


@torch.no_grad()
def teacher_pool(teacher, n, num_classes, cfg_scale, seed, batch_size=256):
    """SeqKD's contexts: n class-balanced teacher samples (KV cache), codes (n, T) and labels (n,)."""
    g = torch.Generator(device=next(teacher.parameters()).device).manual_seed(seed)
    labels = torch.arange(n, device=g.device) % num_classes
    codes = torch.cat([generate(teacher, labels[i:i + batch_size], cfg_scale, generator=g)
                       for i in tqdm(range(0, n, batch_size), desc="teacher samples", leave=False)])
    return codes, labels


def save_checkpoint(path, model, optimizer, step, args, fingerprints, metrics):
    weights = model.state_dict()
    state = {"model": weights, "config": asdict(model.config), "optimizer": optimizer.state_dict(),
             "step": step, "args": vars(args), "rng": torch.get_rng_state(), "fingerprints": fingerprints,
             "fingerprint": fingerprint(*(v.cpu().numpy() for v in weights.values())), "metrics": metrics}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def method_loss(args, step_fn, model, teacher, codes, labels, groups, g):
    """One step of one method: where its contexts come from, then which divergence. codes (B, T) are
    data (or, for seqkd, teacher samples), labels after label dropout; g is the step's random generator."""
    mask = torch.ones_like(codes, dtype=torch.bool)  # (B, T): the supervised positions
    rollout = args.method in ("onpolicy", "varkd") and torch.rand(1, generator=g, device=g.device).item() < args.lam
    if rollout:
        window = 0 if args.method != "varkd" or args.no_parallel else args.window
        codes, mask = mixed_rollout(model, codes, labels, args.prefix_frac, g, window)
    logits = step_fn(codes, labels)  # (B, T, V)
    if args.method == "ce":
        return F.cross_entropy(logits.flatten(0, 1), codes.flatten())
    with torch.no_grad():
        t_logits = teacher(codes, labels)
    if args.method in ("kd", "seqkd"):
        loss = kd_loss(logits, t_logits, args.tau)
    elif args.method == "onpolicy":
        loss = gkd_loss(logits, t_logits, args.beta)
    else:
        weights = (torch.ones_like(mask, dtype=logits.dtype) if args.no_entropy_weights else
                   entropy_weights(t_logits, None if args.no_truncation else args.threshold, mask))
        loss = varkd_loss(logits, t_logits, weights, mask, groups, args.beta)
    if args.ce_weight > 0 and args.method != "seqkd":
        real = ~mask if rollout else mask  # CE on real codes only
        ce = F.cross_entropy(logits.flatten(0, 1), codes.flatten(), reduction="none")
        loss = loss + args.ce_weight * (ce * real.flatten()).sum() / real.sum()
    return loss


def existing_run(args, fingerprints, config, role):
    """The checkpoint at args.out to reuse or continue, or None to start. Refuses one built from
    other inputs, of another size or, for the run asked for, with other flags; a parent the
    pipeline needs is continued with the flags it was started with."""
    if not Path(args.out).exists():
        return None
    try:
        ckpt = torch.load(args.out, map_location="cpu", weights_only=True)
        theirs = ckpt["fingerprints"]
    except Exception:
        raise SystemExit(f"{args.out} exists and is not a checkpoint of distill.py: pass --out elsewhere "
                         f"(nothing is overwritten)") from None
    for key in sorted(set(theirs) | set(fingerprints)):
        if theirs.get(key) != fingerprints.get(key):
            raise SystemExit(f"{args.out} was built from another {key} ({theirs.get(key)}, now "
                             f"{fingerprints.get(key)}): delete it to rebuild it, or pass --out elsewhere")
    if ckpt["config"] != asdict(config):
        c = ckpt["config"]
        raise SystemExit(f"{args.out} holds a {c['n_layer']}-layer model of width {c['dim']}, not --size "
                         f"{args.size} ({config.n_layer} x {config.dim}): pass the --size it was trained with, "
                         f"or --out elsewhere")
    differs = [f"--{k.replace('_', '-')} {ckpt['args'].get(k)} (now {getattr(args, k)})"
               for k in RECIPE if ckpt["args"].get(k) != getattr(args, k)]
    if differs and role is None:
        raise SystemExit(f"{args.out} was trained with {', '.join(differs)}: pass the same flags to reuse "
                         f"or continue it, or --out elsewhere (nothing is overwritten)")
    if ckpt["step"] < ckpt["args"]["max_iters"] and role is None and not args.resume:
        raise SystemExit(f"{args.out} stopped at step {ckpt['step']} of {ckpt['args']['max_iters']}: pass "
                         f"--resume to continue it, or --out elsewhere (nothing is overwritten)")
    return ckpt


def train(args, tokenizer, splits, role=None):
    """One run: args.method into args.out, or reuse / continue what is there. role names a parent the
    pipeline builds ('teacher', 'no-KD student', ...); None is the run asked for."""
    rank, world = rank_world()
    device = torch.device(args.device)
    (train_codes, train_labels, data_fp), (test_codes, test_labels, _) = splits["train"], splits["test"]
    test_codes, test_labels = test_codes.to(device), test_labels.to(device)
    fingerprints = {"tokenizer": tokenizer.fingerprint, "data": data_fp}
    config = GPTConfig(**PRESETS[args.size], vocab_size=tokenizer.cfg.codebook_size,
                       num_classes=int(train_labels.max()) + 1, grid_size=tokenizer.cfg.grid_size)
    if role is not None and Path(args.out).exists():  # a parent keeps the inputs it was started with
        started = torch.load(args.out, map_location="cpu", weights_only=True).get("args", {})
        args = argparse.Namespace(**{**vars(args), **{k: started[k] for k in ("init", "teacher", "teacher_preset")
                                                      if k in started}})
    teacher = groups = None
    if args.method != "ce":
        teacher, fingerprints["teacher"], _ = load_parent(args.teacher, "teacher", fingerprints, device,
                                                       args.teacher_preset, tokenizer)
        teacher.requires_grad_(False)
    init, init_measured = None, {}
    if args.init != "none":
        init, fingerprints["init"], init_measured = load_parent(args.init, "student", fingerprints, device,
                                                                args.size, tokenizer)
        if asdict(init.config) != asdict(config):
            raise SystemExit(f"{args.init} is not a --size {args.size} model ({init.config.n_layer} layers of "
                             f"width {init.config.dim}, not {config.n_layer} x {config.dim}): pass the --size it "
                             f"was trained with")
    ckpt = existing_run(args, fingerprints, config, role)
    if ckpt is not None and role is not None:  # a parent runs with the flags it was started with
        args = argparse.Namespace(**{**vars(args), **{k: ckpt["args"][k] for k in RECIPE}})
    if ckpt is not None and ckpt["step"] >= args.max_iters:
        if rank == 0:
            print(f"{role or args.method} {args.out}: built ({args.method}, {ckpt['step']} steps), reusing it")
        return ckpt["metrics"]
    if args.method == "varkd" and not args.no_groups:
        groups = tokenizer.codebook_groups(args.groups or config.vocab_size // 4).to(device)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} does not split over {world} processes: pass a multiple of {world}")
    model = GPT(config).to(device)
    if init is not None:
        model.load_state_dict(init.state_dict())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    start, metrics = 0, {"wall_time": 0.0}
    n_params = sum(p.numel() for p in model.parameters())
    what = (f"{args.method}, {args.size} model ({n_params / 1e6:.2f}M parameters), {args.max_iters} steps of "
            f"{args.batch_size} sequences x {config.block_size} codes -> {args.out}")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        start, metrics = ckpt["step"], ckpt["metrics"]
    if rank == 0 and ckpt is not None:
        print(f"{args.out} stopped at step {start}: continuing it ({what})")
    elif rank == 0:
        stage = "teacher" if role == "teacher" else args.method
        default = args.size == ("teacher" if role == "teacher" else "student") and args.batch_size == 128
        minutes = MINUTES.get(stage, 0) * args.max_iters / (600 if stage == "teacher" else 400)
        about = f", about {minutes:.0f} minutes on 2 CPU cores" if default and minutes else ""
        print(f"no {role} at {args.out}: training one ({what}{about})" if role else f"{what}{about}")
    if teacher is not None and start == 0 and rank == 0:
        metrics["start"] = (init_measured if len(init_measured) == 2 else
                            held_out(model, test_codes, test_labels, teacher))
        print(f"before: test NLL {metrics['start']['test_nll']:.4f}, KL(teacher || student) "
              f"{metrics['start']['test_kl']:.4f} nats/code")
    ddp_model = DDP(model) if world > 1 else model
    step_fn = torch.compile(ddp_model) if args.compile else ddp_model
    # bf16 autocast on GPUs (weights, optimizer and evaluation stay fp32); fp32 on CPU, where bf16 buys nothing
    amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    model.train()
    t0, tokens, pool_id = time.time(), 0, None
    bar = tqdm(range(start, args.max_iters), initial=start, total=args.max_iters, desc=args.method, disable=rank > 0)
    for step in bar:
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # every random choice of a step is a pure function of (seed, step, rank): resumable, reproducible
        step_seed = args.seed * 1_000_003 + step
        g = torch.Generator(device).manual_seed(step_seed)
        # where the contexts come from: data, teacher samples (seqkd), or mixed rollouts
        if args.method == "seqkd":  # each rank draws its own pool
            if pool_id != step // args.pool_refresh:
                pool_id = step // args.pool_refresh
                pool = teacher_pool(teacher, args.pool_size // world, config.num_classes, args.pool_cfg,
                                    (args.seed * 1_000_003 + 10 ** 9 + pool_id) * 1024 + rank)
                metrics["teacher_seqs"] = metrics.get("teacher_seqs", 0) + args.pool_size * (1 + (args.pool_cfg != 1))
            idx = batch_indices(step, args.pool_size // world, args.batch_size // world, args.seed)
            codes, labels = pool[0][idx], model.drop_labels(pool[1][idx], g)
        else:
            # label dropout on the global batch, then this rank's slice: N ranks train as one process
            # would, and the teacher sees the student's (possibly null) labels
            idx = batch_indices(step, len(train_codes), args.batch_size, args.seed)
            labels = model.drop_labels(train_labels[idx].to(device), g)
            codes, labels = train_codes[idx].to(device).long()[rank::world], labels[rank::world]
        g.manual_seed(step_seed * 1024 + rank + 1)  # this rank's own rollouts
        with amp:
            loss = method_loss(args, step_fn, model, teacher, codes, labels, groups, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # the norm of the all-reduced gradients: every rank sees the same one, and stops together
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        if not (torch.isfinite(loss) and torch.isfinite(norm)):
            raise SystemExit(f"the loss is {loss.item()} (gradient norm {norm.item()}) at step {step}: training "
                             f"diverged; the last good checkpoint {args.out} is kept; lower --lr and --resume")
        optimizer.step()
        tokens += codes.numel() * world
        if teacher is not None:  # the cost the paper counts: sequences the teacher scores (or samples, above)
            metrics["teacher_seqs"] = metrics.get("teacher_seqs", 0) + codes.shape[0] * world
        done = step + 1
        if done % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens / (time.time() - t0):.0f}")
        if rank == 0 and done % args.eval_interval == 0 and done < args.max_iters:
            m = held_out(model, test_codes[:args.eval_seqs], test_labels[:args.eval_seqs], teacher)
            bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()) +
                      f" nats/code (first {args.eval_seqs} test sequences)")
        if done % args.ckpt_interval == 0 or done == args.max_iters:
            metrics["wall_time"] += time.time() - t0
            tokens, t0 = 0, time.time()
            if done == args.max_iters and world > 1:  # DDP keeps the ranks equal: check, once
                weights = [None] * world
                dist.all_gather_object(weights, fingerprint(*(v.cpu().numpy() for v in model.state_dict().values())))
                if len(set(weights)) > 1:
                    raise SystemExit(f"the {world} ranks ended with different weights: a bug, please report it")
                metrics["ranks_agree"] = world
            if rank == 0:
                if done == args.max_iters:
                    metrics.update(held_out(model, test_codes, test_labels, teacher))
                metrics["step"] = done
                save_checkpoint(args.out, model, optimizer, done, args, fingerprints, metrics)
    if world > 1:
        dist.barrier()  # the next run of the pipeline reads this checkpoint
    if rank == 0 and "test_nll" in metrics:
        kl = f", KL(teacher || student) {metrics['test_kl']:.4f}" if "test_kl" in metrics else ""
        print(f"done: test NLL {metrics['test_nll']:.4f}{kl} nats/code on {len(test_codes)} test images, "
              f"{metrics['wall_time'] / 60:.1f} min of training; saved {args.out}")
    return metrics


def main(argv=None):
    args = get_args(argv)
    rank, _ = setup_ddp(args)
    torch.manual_seed(args.seed + rank)
    tokenizer, splits = prepare_data(args)
    if args.prepare:
        if rank == 0:
            print(", ".join(f"{k}: {tuple(v[0].shape)} codes" for k, v in splits.items()) + f" in {args.out_dir}/tokens/")
        if dist.is_initialized():
            dist.destroy_process_group()
        return splits
    if Path(args.data_dir, "train").is_dir() and args.eval_samples:  # FID-cls's classifier knows Fashion-MNIST only
        args.eval_samples = 0
        if rank == 0:
            print("an image folder: the table has test NLL and KL; FID: torchrun ... evaluate.py CKPT --features inception")
    if args.study:
        results = study.run(args, tokenizer, splits)
        if dist.is_initialized():
            dist.destroy_process_group()
        return results
    for run in pipeline(args):
        metrics = train(run, tokenizer, splits, role=None if run is args else ROLES[
            "teacher" if run.out == args.teacher else run.method])
    if rank == 0:  # the main job's table: every finished model in --out-dir, each measured once
        paths = [args.teacher] + [f"{args.out_dir}/{m}/ckpt.pt" for m in METHODS] + [args.out]
        table(paths, tokenizer, *splits["test"][:2], args)
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
