"""Knowledge distillation of visual autoregressive models: THE training loop.

    python distill.py --method ce --size teacher    # the teacher: out/teacher.pt
    python distill.py --method ce                   # the no-KD student: out/ce/ckpt.pt
    python distill.py --method kd                   # stage 1 from out/ce: out/kd/ckpt.pt
    python distill.py --method varkd                # stage 2 from out/kd: out/varkd/ckpt.pt
    python distill.py --method varkd --resume       # continue from the last checkpoint

Every method minimises E over contexts x_<t of D(p_T(.|x_<t), p_S(.|x_<t)); they differ in where
the contexts come from and in D (Peruzzo et al. 2026, "Knowledge Distillation for Visual
Autoregressive Models"):

    method    contexts                                   D
    ce        data                                       cross-entropy with the data code
    kd        data (teacher-forced)                      forward KL(p_T^tau || p_S^tau) tau^2
    seqkd     teacher samples (a pool, refreshed)        forward KL
    onpolicy  data, or w.p. lambda a mixed rollout       generalized JSD_beta (GKD)
    varkd     mixed rollouts: real prefix, the student   alpha_t-weighted reverse KL on the sampled
              samples the rest                           positions, truncated after the first
                                                         alpha_t < 0.1, over codebook groups

Builds what is missing first (Fashion-MNIST, the tokenizer out/tokenizer.pt, the token cache
out/tokens/). AdamW (betas 0.9/0.95, weight decay on matrices only, as LlamaGen), linear warm-up then
cosine (or constant) learning rate, gradient clipping at 1.0, held-out NLL and KL to the teacher
every --eval-interval steps, atomic checkpoints every --ckpt-interval steps. Every checkpoint records
its config and the fingerprints of the data, tokenizer, teacher and starting checkpoint it was built
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
from data import atomic_write, fingerprint, load_fashion_mnist, token_cache
from model import GPT, PRESETS, GPTConfig, load_checkpoint
from sample import generate


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


# ------------------------------------------------------------------------------------------------
# Where the contexts come from: data (teacher-forced), teacher samples (seqkd), or mixed rollouts.


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


METHODS = ("ce", "kd", "seqkd", "onpolicy", "varkd")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="ce", choices=list(METHODS), help="ce: next-code cross-entropy "
                   "on data (teacher, no-KD student); kd: forward KL on data; seqkd: forward KL on teacher "
                   "samples; onpolicy: GKD on mixed rollouts; varkd (default: ce)")
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
    p.add_argument("--teacher", help="teacher checkpoint for the KD methods (default: <out-dir>/teacher.pt)")
    p.add_argument("--init", help="student checkpoint to start from (default: <out-dir>/ce/ckpt.pt for kd, "
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
    args.teacher = args.teacher or f"{args.out_dir}/teacher.pt"
    if args.init is None:
        args.init = {"ce": "none", "kd": f"{args.out_dir}/ce/ckpt.pt"}.get(args.method, f"{args.out_dir}/kd/ckpt.pt")
    args.lam = args.lam if args.lam is not None else {"onpolicy": 0.1, "varkd": 1.0}.get(args.method, 0.0)
    args.beta = args.beta if args.beta is not None else (1.0 if args.method == "varkd" else 0.5)
    args.prefix_frac = tuple(float(x) for x in args.prefix_frac.split(","))
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
def held_out(model, codes, labels, teacher=None, batch_size=500):
    """Test NLL per code (nats) and, with a teacher, KL(p_T || p_model) per code on the same data
    contexts: how far the student is from what it is taught."""
    was_training = model.training
    model.eval()
    nll = kl = 0.0
    for i in range(0, len(codes), batch_size):
        x, y = codes[i:i + batch_size], labels[i:i + batch_size]
        logits = model(x, y)  # (B, T, V)
        nll += F.cross_entropy(logits.flatten(0, 1), x.flatten(), reduction="sum").item()
        if teacher is not None:
            kl += kd_loss(logits, teacher(x, y)).item() * x.numel()
    model.train(was_training)
    out = {"test_nll": nll / codes.numel()}
    if teacher is not None:
        out["test_kl"] = kl / codes.numel()
    return out


def load_parent(path, role, fingerprints, device):
    """A teacher or starting student, refused unless built on the same tokenizer and data."""
    if not Path(path).exists():
        raise SystemExit(f"no {role} at {path}: train it first (python distill.py --method "
                         f"{'ce --size teacher' if role == 'teacher' else Path(path).parent.name}) or pass "
                         f"--{'teacher' if role == 'teacher' else 'init'} PATH")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    theirs = ckpt.get("fingerprints", {})
    for key in ("tokenizer", "data"):
        if key in theirs and theirs[key] != fingerprints[key]:
            raise SystemExit(f"the {role} {path} was built on {key} {theirs[key]}, not on this run's "
                             f"{fingerprints[key]}: retrain it, or pass the --tokenizer it was built with")
    model = load_checkpoint(path)
    return model.to(device), fingerprint(*(v.numpy() for v in model.state_dict().values()))


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
    data (or, for seqkd, teacher samples); g is the step's random generator."""
    labels = model.drop_labels(labels)  # teacher and student see the same (possibly null) labels
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


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    tokenizer, splits = prepare_data(args)
    (train_codes, train_labels, data_fp), (test_codes, test_labels, _) = splits["train"], splits["test"]
    test_codes, test_labels = test_codes.to(device), test_labels.to(device)
    fingerprints = {"tokenizer": tokenizer.fingerprint, "data": data_fp}
    config = GPTConfig(**PRESETS[args.size], vocab_size=tokenizer.cfg.codebook_size,
                       num_classes=int(train_labels.max()) + 1, grid_size=tokenizer.cfg.grid_size)
    teacher = groups = None
    if args.method != "ce":
        teacher, fingerprints["teacher"] = load_parent(args.teacher, "teacher", fingerprints, device)
        teacher.requires_grad_(False)
    if args.method == "varkd" and not args.no_groups:
        groups = tokenizer.codebook_groups(args.groups or config.vocab_size // 4).to(device)
    model = GPT(config).to(device)
    if args.init != "none":
        init, fingerprints["init"] = load_parent(args.init, "student", fingerprints, device)
        if asdict(init.config) != asdict(config):
            raise SystemExit(f"{args.init} is not a --size {args.size} model ({init.config}): pass the "
                             f"--size it was trained with")
        model.load_state_dict(init.state_dict())
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
                             f"{fingerprints}: drop --resume to start over, or pass the --tokenizer, --teacher "
                             f"and --init it used")
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
    if teacher is not None and start == 0:
        metrics["start"] = held_out(model, test_codes, test_labels, teacher)
        print(f"before: test NLL {metrics['start']['test_nll']:.4f}, KL(teacher || student) "
              f"{metrics['start']['test_kl']:.4f} nats/code")
    step_fn = torch.compile(model) if args.compile else model
    model.train()
    t0, tokens, pool_id = time.time(), 0, None
    bar = tqdm(range(start, args.max_iters), initial=start, total=args.max_iters, desc=args.method)
    for step in bar:
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # every random choice of a step is a pure function of (seed, step): resumable, reproducible
        g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + step)
        # where the contexts come from: data, teacher samples (seqkd), or mixed rollouts
        if args.method == "seqkd":
            if pool_id != step // args.pool_refresh:
                pool_id = step // args.pool_refresh
                pool = teacher_pool(teacher, args.pool_size, config.num_classes, args.pool_cfg,
                                    args.seed * 1_000_003 + pool_id)
            idx = batch_indices(step, args.pool_size, args.batch_size, args.seed)
            codes, labels = pool[0][idx], pool[1][idx]
        else:
            idx = batch_indices(step, len(train_codes), args.batch_size, args.seed)
            codes, labels = train_codes[idx].to(device), train_labels[idx].to(device)
        loss = method_loss(args, step_fn, model, teacher, codes, labels, groups, g)
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
            m = held_out(model, test_codes[:args.eval_seqs], test_labels[:args.eval_seqs], teacher)
            bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()) +
                      f" nats/code (first {args.eval_seqs} test sequences)")
        if done % args.ckpt_interval == 0 or done == args.max_iters:
            metrics["wall_time"] += time.time() - t0
            tokens, t0 = 0, time.time()
            if done == args.max_iters:
                metrics.update(held_out(model, test_codes, test_labels, teacher))
            metrics["step"] = done
            save_checkpoint(args.out, model, optimizer, done, args, fingerprints, metrics)
    if "test_nll" in metrics:
        kl = f", KL(teacher || student) {metrics['test_kl']:.4f}" if "test_kl" in metrics else ""
        print(f"done: test NLL {metrics['test_nll']:.4f}{kl} nats/code on {len(test_codes)} test images, "
              f"{metrics['wall_time'] / 60:.1f} min of training; saved {args.out}")
    return metrics


if __name__ == "__main__":
    main()
