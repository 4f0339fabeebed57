"""Knowledge distillation of visual autoregressive models: the methods, the training loop, the main job.

    python distill.py --method varkd        # everything missing, then VarKD: out/varkd/ckpt.pt + a table
    python distill.py --method ce --size teacher            # just the teacher: out/teacher.pt
    python distill.py --method varkd --resume               # continue a killed run
    torchrun --standalone --nproc_per_node 8 distill.py --method varkd --batch-size 256

Every method minimises E over contexts x_<t of D(p_T(.|x_<t), p_S(.|x_<t)); they differ in where
the contexts come from and in D (Peruzzo et al. 2026, "Knowledge Distillation for Visual
Autoregressive Models", arXiv 2606.06078): the table METHODS, beside `method_loss`, names both for
each method (ce, kd, seqkd, onpolicy = GKD, varkd, taid, cca) and holds its flags' defaults.

This file reads top to bottom: the divergences and losses, where contexts come from, one step of
one method (`method_loss`), then the loop. The main job builds what the method needs and is
missing, parents first (runs.py: the tokenizer, token cache, teacher, no-KD student out/ce/,
stage-1 KD out/kd/), reuses what exists, and ends with one table line per model (evaluate.py).
AdamW (betas 0.9/0.95, decay on matrices only, as LlamaGen), warm-up then cosine, clipping at 1.0,
held-out NLL and KL to the teacher every --eval-interval steps, atomic checkpoints every
--ckpt-interval steps. DDP under torchrun (gloo on CPU, nccl on GPUs), bf16 autocast on GPUs.
"""
import contextlib
import functools
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import runs
from checks import check_output, output_lock
from data import batch_indices
from evaluate import held_figures, held_out, table
from model import GPT, autocast, compile_decode
from sample import generate

# ------------------------------------------------------------------------------------------------
# The divergences. Logits are (B, T, V); every loss is averaged over the supervised positions.


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


def kd_loss(s_logits, t_logits, tau=1.0, mask=None):
    """Hinton et al.: forward KL(p_T^tau || p_S^tau) * tau^2 at every position, or at those in a mask (B, T)."""
    d = jsd(F.log_softmax(s_logits / tau, -1), F.log_softmax(t_logits / tau, -1), 0) * tau ** 2
    return d.mean() if mask is None else (d * mask).sum() / mask.sum().clamp_min(1)


def taid_loss(s_logits, t_logits, t, mask=None):
    """TAID (Shing et al., ICLR 2025): forward KL from the interpolated target softmax((1 - t) sg(l_S) +
    t l_T) to p_S, a target that starts near the student and moves to the teacher as t rises to 1,
    so a small student is never asked to jump the whole capacity gap at once. t = 1: kd's loss (tau
    1); t = 0: the student's own distribution, zero loss."""
    return kd_loss(s_logits, (1 - t) * s_logits.detach() + t * t_logits, 1.0, mask)


def taid_step(state, loss, step, args):
    """TAID's schedule of t after a step with this loss (as the authors' code): the momentum of the
    loss's relative decrease, m = beta m + (1 - beta) (prev - loss) / prev, pushes t up by
    alpha sigmoid(m) (1 - t), never below the line from t_start at step 0 to 1 at the last step,
    never above 1. At 400 steps the line dominates (alpha 5e-4 adds at most ~0.1). state: {"t",
    "prev" (None before the first step), "momentum"}; returns the next state."""
    if state["prev"] is None:
        return {**state, "prev": loss}
    momentum = args.taid_beta * state["momentum"] + (1 - args.taid_beta) * (state["prev"] - loss) / (state["prev"] + 1e-15)
    line = args.taid_t_start + (1 - args.taid_t_start) * step / args.max_iters
    grown = state["t"] + args.taid_alpha / (1 + math.exp(-momentum)) * (1 - state["t"])
    return {"t": min(1.0, max(line, grown)), "prev": loss, "momentum": momentum}


def gkd_loss(s_logits, t_logits, beta=0.5, mask=None):
    """GKD: generalized JSD_beta at every position, or at those in a boolean mask (B, T)."""
    d = jsd(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), beta)
    return d.mean() if mask is None else (d * mask).sum() / mask.sum().clamp_min(1)


def entropy_weights(t_logits, threshold=0.1, mask=None):
    """VarKD's trust in the teacher, alpha_t = 1 - H(p_T(.|x_<t)) / log|V| (B, T). With a threshold,
    truncation: every position after the first one inside `mask` (the student-sampled positions:
    truncation is about the teacher losing trust in a context the student wrote) with alpha_t below
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
    """log of the probabilities summed within codebook groups: (B, T, V) -> (B, T, G), exact for a
    group of any mass (log-sum-exp shifted by each group's own maximum). Every id below n_groups
    must have a member."""
    logp = F.log_softmax(logits, -1)
    index = groups.expand_as(logp)
    peak = torch.full((*logp.shape[:-1], n_groups), -math.inf, device=logp.device, dtype=logp.dtype)
    peak = peak.scatter_reduce(-1, index, logp, "amax")  # (B, T, G)
    summed = torch.zeros_like(peak).scatter_add_(-1, index, (logp - peak.gather(-1, index)).exp())  # each >= 1
    return summed.log() + peak


def varkd_loss(s_logits, t_logits, weights, mask, groups=None, beta=1.0):
    """VarKD: mean over the mask positions of weights * D(p_S, p_T), both distributions first summed
    within the codebook groups (a LongTensor (V,) of group ids) when given. D is the reverse KL
    (beta 1) by default; the student still predicts the full vocabulary."""
    if groups is None:
        s_logp, t_logp = F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1)
    else:
        groups = torch.unique(groups, return_inverse=True)[1]  # ids 0..G-1, each with a member
        n = int(groups.max()) + 1
        s_logp, t_logp = group_logp(s_logits, groups, n), group_logp(t_logits, groups, n)
    mask = mask.float()
    return (weights * jsd(s_logp, t_logp, beta) * mask).sum() / mask.sum().clamp_min(1)


# ------------------------------------------------------------------------------------------------
# Where the contexts come from: data (the token cache), teacher samples (SeqKD), or mixed rollouts
# (GKD, VarKD): a real prefix, the student's continuation, sequential or ZipAR's parallel rows.


@torch.no_grad()
def teacher_pool(teacher, n, num_classes, cfg_scale, seed, batch_size=256):
    """SeqKD's contexts: n class-balanced teacher samples (KV cache), codes (n, T) and labels (n,)."""
    g = torch.Generator(device=next(teacher.parameters()).device).manual_seed(seed)
    labels = torch.arange(n, device=g.device) % num_classes
    codes = torch.cat([generate(teacher, labels[i:i + batch_size], cfg_scale, generator=g)
                       for i in tqdm(range(0, n, batch_size), desc="teacher samples", leave=False)])
    return codes, labels


@functools.lru_cache(maxsize=None)
def zipar_schedule(grid, start, window):
    """ZipAR (He et al. 2024): a row starts once `window` codes of the row above are decoded, and
    code (r, c) waits only for its left neighbour and for (r-1, c+window-1), not for the end of row
    r-1 (spatial locality), so several rows are decoded at once; window >= grid is raster order.
    Returns the codes (>= start) decoded at each step, a tuple of tuples of code indices."""
    step = {}
    for p in range(start, grid * grid):
        r, c = divmod(p, grid)
        after_left = step.get(p - 1, -1) if c > 0 else -1
        above = (r - 1) * grid + min(c + window - 1, grid - 1)
        after_above = step.get(above, -1) if r > 0 else -1
        step[p] = max(after_left, after_above) + 1
    order = [[] for _ in range(max(step.values(), default=-1) + 1)]
    for p, s in step.items():
        order[s].append(p)
    return tuple(map(tuple, order))


@functools.lru_cache(maxsize=None)
def plan_table(grid, window):
    """rollout_plan's rows for every prefix length k at once, computed once per (grid, window):
    codes (T, steps, W) and row starts (T, steps), padded with -1."""
    T = grid * grid
    schedules = [zipar_schedule(grid, k, window) if window else tuple((p,) for p in range(k, T)) for k in range(T)]
    n_steps, width = max(map(len, schedules)), max(len(step) for s in schedules for step in s)
    codes = torch.full((T, n_steps, width), -1, dtype=torch.long)
    starts = torch.full((T, n_steps), -1, dtype=torch.long)
    for k, schedule in enumerate(schedules):
        when = {p: s for s, step in enumerate(schedule) for p in step}
        for s, step in enumerate(schedule):
            codes[k, s, :len(step)] = torch.tensor(step)
            # a row start whose predecessor in raster order, the end of the row above, comes later
            starts[k, s] = next((p - 1 for p in step if p % grid == 0 and p > k and when[p - 1] >= s), -1)
    return codes, starts


def rollout_plan(prefix_lens, grid, window):
    """Each sequence decoded from the end of its own prefix: per step, the code indices (steps, B, W)
    of ZipAR's rows (one code at a time with window 0), -1 as padding, and the row starts p that need
    a query of their own, as p - 1, the code index whose position the query takes (steps, B); -1
    where none. prefix_lens: (B,) long."""
    codes, starts = plan_table(grid, window)
    codes, starts = codes[prefix_lens], starts[prefix_lens]  # (B, steps, W), (B, steps)
    used = codes >= 0
    n_steps = int(used.any(2).sum(1).max())  # the longest schedule of the batch, the widest step
    width = int(used.sum(2).max())
    return codes[:, :n_steps, :width].transpose(0, 1), starts[:, :n_steps].T


@torch.no_grad()
def mixed_rollout(student, codes, labels, prefix_frac=(0.25, 0.75), generator=None, window=0, logits_out=None):
    """Keep the first k codes of each real sequence, k ~ U[prefix_frac * T] per example; the student
    samples the rest (KV cache, temperature 1, no CFG), each sequence from the end of its own prefix.
    Returns the codes (B, T) and a mask (B, T), True at the student-sampled positions. window > 0:
    ZipAR's parallel rows (window as ZipAR's: the codes of the row above decoded before a row starts;
    >= the grid side is raster order, exact). A row started before the row above is finished lacks the
    code its first code is predicted from, the end of the row above: it gets a query of its own at that
    position, the code above it standing in as the input (measured closer to the exact conditional than
    the newest code of the row above: KL 0.32 against 0.73 nats at 7x7, window 5), forgotten after.
    logits_out: a (B, T, V) tensor that receives the logits each sampled code was drawn from."""
    B, T = codes.shape
    lo, hi = int(prefix_frac[0] * T), int(prefix_frac[1] * T)
    k = torch.randint(lo, hi + 1, (B,), generator=generator, device=codes.device)  # (B,)
    position = torch.arange(T + 1, device=codes.device)
    mask = position[None, :T] >= k[:, None]  # (B, T)
    grid = student.config.grid_size
    plan, starts = (x.to(codes.device) for x in rollout_plan(k.cpu(), grid, window))
    rows = torch.arange(B, device=codes.device)[:, None].expand_as(plan[0])  # (B, W)
    out = codes.clone()
    was_training = student.training
    student.eval()
    with autocast(codes.device.type):  # bf16 on GPUs (the cache too)
        student.setup_cache(B)
        # the longest prefix in one call, each sequence keeping its own. next_logits[:, p] predicts code
        # p from what its sequence has decoded; NaN until computed (a read of it would fail loudly)
        next_logits = student.prefill(labels, codes[:, :hi], lengths=k).float()  # (B, hi + 1, V)
        next_logits = torch.cat([next_logits, next_logits.new_zeros(B, T - hi - 1, next_logits.shape[-1])], 1)
        next_logits[position[None, :T] > k[:, None]] = float("nan")
        fed = torch.full_like(plan[0], -1)  # the codes sampled at the previous step, fed now
        for step, start in zip(plan, starts):  # (B, W), (B,)
            if (fed >= 0).any() or (start >= 0).any():
                # the previous step's codes and this step's row-start queries in one call: a query
                # sits after every code its sequence has decoded, so no other code sees its stand-in
                # (padding sits at the last code's position: it predicts nothing and nothing reads it)
                feed = torch.cat([fed, start[:, None]], 1)  # (B, W + 1) code indices
                above = (start[:, None] + 1 - grid).clamp_min(0)  # the stand-in: the code above the row start
                inputs = torch.cat([out.gather(1, fed.clamp_min(0)), out.gather(1, above)], 1)
                logits = student.decode(inputs, torch.where(feed >= 0, feed, T - 1)).float()  # (B, W + 1, V)
                real = (feed >= 0) & (feed < T - 1)  # the rest predicts nothing
                next_logits[torch.cat([rows, rows[:, :1]], 1)[real], feed[real] + 1] = logits[real]
                stand_in = (position[None, :] == start[:, None] + 1) & (start[:, None] >= 0)  # (B, T + 1)
                student.forget(stand_in)  # the stand-in served its query; the real code comes later
            drawn = next_logits[rows, step.clamp_min(0)]  # (B, W, V)
            valid = step >= 0
            sampled = torch.multinomial(drawn[valid].softmax(-1), 1, generator=generator)[:, 0]
            out[rows[valid], step[valid]] = sampled
            if logits_out is not None:
                logits_out[rows[valid], step[valid]] = drawn[valid].to(logits_out.dtype)
            fed = step
    student.clear_cache()
    student.train(was_training)
    return out, mask


# ------------------------------------------------------------------------------------------------
# What a student matches: the teacher's logits, or the teacher as it samples with guidance. And
# CCA, the teacher-free way to a guidance-free model.


def teacher_target(teacher, codes, labels, cfg_scale=1.0):
    """The teacher's target logits on a batch (B, T, V). cfg_scale 1: its own conditional logits.
    Otherwise the distribution its sampler draws from with classifier-free guidance (sample.generate),
    l_u + s (l_c - l_u), from one pass over the conditional and the null-class rows, so that a student
    trained on it samples like the guided teacher in one pass per code; rows whose label was dropped
    get the teacher's unconditional logits, so the student keeps a usable unconditional branch."""
    if cfg_scale == 1:
        return teacher(codes, labels)
    null = teacher.config.num_classes
    cond, uncond = teacher(torch.cat([codes, codes]), torch.cat([labels, torch.full_like(labels, null)])).chunk(2)
    return torch.where((labels == null)[:, None, None], uncond, uncond + cfg_scale * (cond - uncond))


def sequence_logp(logits, codes):
    """log p(x | c) of whole sequences: (B, T, V) logits and (B, T) codes -> (B,)."""
    return F.log_softmax(logits.float(), -1).gather(-1, codes[..., None])[..., 0].sum(-1)


def cca_loss(gap, negative_gap, unconditional, beta=0.02, lam=1000.0):
    """Condition Contrastive Alignment (Chen et al. 2024, arXiv 2410.09347; the null class handled as
    their code does): gap = log p_theta(x|c) - log p_ref(x|c) per sequence (B,) on matched (image,
    label) pairs, negative_gap the same with a mismatched label c'. Matched pairs are pushed up,
    -log sigmoid(beta gap), mismatched ones down with weight lam, -lam log sigmoid(-beta gap'): the
    model moves away from the other classes' images as guidance moves its sampler, and samples in one
    pass. Rows whose label was dropped (unconditional, (B,) bool) count as positives on both terms, so
    the unconditional model is kept; the sum is divided by max(lam, 1) as in their code."""
    sign = torch.where(unconditional, 1.0, -1.0)
    weight = torch.where(unconditional, 1.0, lam)
    loss = -F.logsigmoid(beta * gap).mean() - (weight * F.logsigmoid(sign * beta * negative_gap)).mean()
    return loss / max(lam, 1.0)


# ------------------------------------------------------------------------------------------------
# One step of one method, then the loop. The methods' defining settings, one row each: where a
# step's contexts come from, the divergence there, the rollouts (mixed: a real prefix, then the
# student's own codes, sequential or ZipAR's rows in parallel) and what a rollout's real prefix gets
# (supervise); then the flags' defaults, which come from this table (runs.get_args): lam (the share
# of steps on rollouts), beta (JSD's: 0 forward KL, 1 reverse), the start (init), steps, peak
# learning rate, and minutes per 1000 steps on 2 CPU cores (for the messages). Every method with a
# teacher matches teacher_target (--teacher-cfg: its logits, or its guided distribution); cca's
# "teacher" is a frozen copy of its start. A new method is a row here plus its branch below.
# VarKD's lam 1 and the supervision of the prefix are ours where the paper is silent: rollouts on
# every step, and teacher-forced KD on the real prefix, whose codes the sampler also draws.
COLUMNS = ("contexts", "divergence", "rollouts", "lam", "beta", "supervise", "init", "max_iters", "lr", "minutes")
S, KD = "{student}", "{out_dir}/kd/ckpt.pt"  # the no-KD student; stage-1 KD, where stage 2 starts (the paper's)
METHODS = {name: dict(zip(COLUMNS, row)) for name, row in {
    # name      contexts              divergence                      rollouts      lam  beta supervise    init    steps  lr    min
    "ce":       ("data",              "cross-entropy",                None,         0.0, 0.5, "all",       "none", 12000, 3e-3, 2.3),
    "kd":       ("data",              "forward KL, tau^2-scaled",     None,         0.0, 0.5, "all",       S,      400,   1e-3, 5.5),
    "seqkd":    ("teacher samples",   "forward KL",                   None,         0.0, 0.5, "all",       KD,     400,   1e-3, 8),
    "onpolicy": ("data or a rollout", "generalized JSD_beta (GKD)",   "sequential", 0.1, 0.5, "prefix-kd", KD,     400,   1e-3, 6),
    "varkd":    ("rollouts",          "alpha_t reverse KL in groups", "ZipAR",      1.0, 1.0, "prefix-kd", KD,     400,   1e-3, 8.5),
    "taid":     ("data",              "forward KL to a t-mix",        None,         0.0, 0.5, "all",       KD,     400,   1e-3, 5.5),
    "cca":      ("data, c and c'",    "contrast to its start",        None,         0.0, 0.5, "all",       S,      400,   1e-3, 5),
}.items()}


def method_loss(args, trained, student, teacher, codes, labels, groups, g, taid_t=None):
    """One step of one method: where its contexts come from, then which divergence. trained: the
    student as trained (DDP and torch.compile wrap it), its forward pass the one with gradients;
    student: the same model unwrapped, whose KV cache the rollouts decode with; teacher: the teacher
    (cca: the frozen reference); codes (B, T): data (seqkd: teacher samples); labels (B,): after label
    dropout; groups: the codebook groups (varkd), or None; g: the step's random generator; taid_t:
    TAID's t at this step (default: --taid-t-start)."""
    if args.method == "cca":  # teacher is the frozen reference, the starting model
        null = student.config.num_classes
        other = (labels + torch.randint(1, null, labels.shape, generator=g, device=g.device).to(labels.device)) % null
        negative = torch.where(labels == null, labels, other)  # any other class; a dropped label stays null
        both, twice = torch.cat([labels, negative]), torch.cat([codes, codes])
        with torch.no_grad():
            ref = sequence_logp(teacher(twice, both), twice)
        gap, negative_gap = (sequence_logp(trained(twice, both), twice) - ref).chunk(2)
        return cca_loss(gap, negative_gap, labels == null, args.cca_beta, args.cca_lambda)
    sampled = torch.zeros_like(codes, dtype=torch.bool)  # (B, T): the positions the student wrote
    rollouts = METHODS[args.method]["rollouts"]
    rollout = rollouts is not None and torch.rand(1, generator=g, device=g.device).item() < args.lam
    if rollout:
        window = args.window if rollouts == "ZipAR" and not args.no_parallel else 0
        codes, sampled = mixed_rollout(student, codes, labels, args.prefix_frac, g, window)
    logits = trained(codes, labels)  # (B, T, V)
    if args.method == "ce":
        return F.cross_entropy(logits.flatten(0, 1), codes.flatten())
    with torch.no_grad():
        t_logits = teacher_target(teacher, codes, labels, args.teacher_cfg)
    real = ~sampled  # data contexts: a rollout's real prefix, or the whole of a data step
    if args.method in ("kd", "seqkd"):
        loss = kd_loss(logits, t_logits, args.tau)
    elif args.method == "taid":
        loss = taid_loss(logits, t_logits, args.taid_t_start if taid_t is None else taid_t)
    else:
        # the method's own divergence on the student's positions (all of a data step's, GKD's mix);
        # on a rollout's real prefix, as --supervise says: the sampler draws those codes from the
        # class alone, so they need a signal too, and their contexts are data: teacher-forced KD
        # (prefix-kd, the default), the method's divergence (all, as GKD scores whole sequences),
        # or nothing (sampled, as TRL leaves out an LLM's prompt, which is given at inference)
        own = sampled if rollout else real
        if args.method == "onpolicy":
            divergence = lambda mask: gkd_loss(logits, t_logits, args.beta, mask)
        else:
            # entropy weights and truncation look at the student's positions only
            alpha = entropy_weights(t_logits, None if args.no_truncation else args.threshold, sampled)
            weights = torch.where(sampled & (not args.no_entropy_weights), alpha, 1.0)
            divergence = lambda mask: varkd_loss(logits, t_logits, weights, mask, groups, args.beta)
        loss = divergence(own)
        if rollout and args.supervise != "sampled":
            on_prefix = kd_loss(logits, t_logits, args.tau, real) if args.supervise == "prefix-kd" else divergence(real)
            n_own, n_real = own.sum(), real.sum()  # every supervised position weighs the same
            loss = (loss * n_own + on_prefix * n_real) / (n_own + n_real)
    if args.ce_weight > 0 and args.method != "seqkd":  # CE on real codes only
        ce = F.cross_entropy(logits.flatten(0, 1), codes.flatten(), reduction="none")
        loss = loss + args.ce_weight * (ce * real.flatten()).sum() / real.sum()
    return loss


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == "constant":
        return args.lr
    frac = (step - args.warmup) / max(1, args.max_iters - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def kept(args, saved, diverged=True):
    """What a stopped run leaves at args.out, truthfully, and a command that works from there: a
    diverged run would diverge again at the same step if resumed (its steps are reproducible)."""
    if saved is None:
        return f"no checkpoint was written to {args.out}; " + ("run again with a lower --lr" if diverged else
                                                               "run the same command again to start over")
    if diverged:
        return (f"{args.out} keeps step {saved} (finite weights); resumed with the same flags it would diverge "
                f"again: start again with a lower --lr and --out elsewhere")
    return f"{args.out} keeps step {saved}: the same command with --resume continues from it"


def step_seed(args, step, stream=None):
    """The seed of a step's random choices, a pure function of (--seed, step, stream), so a resumed
    run draws what an uninterrupted one would. stream None: the choices made on the global batch
    (label dropout), alike on every rank; rank + 1: that rank's rollouts; SeqKD's pools take stream
    rank at the pseudo-steps 10^9 + pool number, clear of every real step."""
    seed = args.seed * 1_000_003 + step
    return seed if stream is None else seed * 1024 + stream


def student_and_optimizer(run, device):
    """The student a run trains, from its --init (or fresh), and its AdamW (betas 0.9/0.95, decay on
    matrices only, as LlamaGen); a continued run's weights, optimizer state and RNG restored."""
    model = compile_decode(GPT(run.config).to(device), run.args.decode)  # its rollouts decode with it
    if run.init is not None:
        model.load_state_dict(run.init.state_dict())
    decay = [p for p in model.parameters() if p.dim() >= 2]  # LlamaGen: no decay on norms
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": run.args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=run.args.lr, betas=(0.9, 0.95))
    if run.ckpt is not None:
        model.load_state_dict(run.ckpt["model"])
        optimizer.load_state_dict(run.ckpt["optimizer"])
        torch.set_rng_state(run.ckpt["rng"])
    return model, optimizer


def step_batch(args, step, model, teacher, train, pools, g, metrics):
    """This rank's contexts of a step: its slice of the step's batch of data, label dropout drawn on
    the global batch so that N ranks train as one process; or, for seqkd, a batch of its own pool of
    teacher samples (pools: {pool number: pool}), redrawn every --pool-refresh steps."""
    rank, world = runs.rank_world()
    if args.method != "seqkd":
        codes, labels = train[0], train[1]
        idx = batch_indices(step, len(codes), args.batch_size, args.seed)
        labels = model.drop_labels(labels[idx].to(g.device), g)
        return codes[idx].to(g.device).long()[rank::world], labels[rank::world]
    pool_id = step // args.pool_refresh
    if pool_id not in pools:
        pools.clear()
        pools[pool_id] = teacher_pool(teacher, args.pool_size // world, model.config.num_classes, args.pool_cfg,
                                      step_seed(args, 10 ** 9 + pool_id, rank))
        metrics["teacher_seqs"] = metrics.get("teacher_seqs", 0) + args.pool_size * (1 + (args.pool_cfg != 1))
    codes, labels = pools[pool_id]
    idx = batch_indices(step, args.pool_size // world, args.batch_size // world, args.seed)
    return codes[idx], model.drop_labels(labels[idx], g)


def count_step(args, metrics, loss, codes, step, teacher):
    """What a step adds to the run's state: TAID's next t (from the loss over every rank, so all ranks
    agree), and the cost the paper counts, the sequences the teacher scored (a guided target: twice)."""
    world = runs.rank_world()[1]
    if args.method == "taid":
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
        metrics["taid"] = taid_step(metrics["taid"], value.item() / world, step, args)
    if teacher is not None and args.method != "cca":
        metrics["teacher_seqs"] = metrics.get("teacher_seqs", 0) + codes.shape[0] * world * (1 + (args.teacher_cfg != 1))


def curve_point(args, model, test, teacher, done, metrics, bar):
    """The held-out curve: test NLL and KL to the teacher on the first --eval-seqs test sequences;
    at the last step the rest of the split too, so the run records the whole split's figures (per
    grid row as well)."""
    (codes, labels), n, last = test, args.eval_seqs, done == args.max_iters
    m = held_out(model, codes[:n], labels[:n], teacher, by_row=last)
    if last:
        rest = held_out(model, codes[n:], labels[n:], teacher, by_row=True) if len(codes) > n else m
        w = min(n, len(codes)) / len(codes)  # every test sequence counts once
        metrics.update({k: (np.asarray(m[k]) * w + np.asarray(rest[k]) * (1 - w)).tolist() for k in m})
        m = {k: v for k, v in m.items() if not k.endswith("_rows")}
    metrics.setdefault("curve", []).append([done, *m.values()])
    bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()) +
              f" nats/code (first {args.eval_seqs} test sequences)")


def train(args, tokenizer, splits, role=None):
    """One run: args.method into args.out, or reuse / continue what is there (runs.open_run). role
    names a parent the pipeline builds ('teacher', 'no-KD student', ...); None is the run asked for."""
    run = runs.open_run(args, tokenizer, splits, role)
    if run.done:
        return run.metrics
    args, teacher, metrics = run.args, run.teacher, run.metrics
    rank, world = runs.rank_world()
    device = torch.device(args.device)
    model, optimizer = student_and_optimizer(run, device)
    runs.announce(run, sum(p.numel() for p in model.parameters()))
    test = splits["test"][0].to(device), splits["test"][1].to(device)
    groups = (tokenizer.codebook_groups(args.groups or model.config.vocab_size // 4).to(device)
              if args.method == "varkd" and not args.no_groups else None)
    if teacher is not None and run.start == 0 and rank == 0:
        # the starting student's figures, measured once (the table reads them again from its metrics.json)
        metrics["start"] = (held_out(model, *test, teacher) if args.init == "none" else
                            held_figures(args.init, run.fingerprints["init"], run.init_measured, model, *test,
                                         teacher, run.fingerprints["teacher"], args.out_dir))
        print(f"before: test NLL {metrics['start']['test_nll']:.4f}, KL(teacher || student) "
              f"{metrics['start']['test_kl']:.4f} nats/code")
    if args.method == "taid":  # TAID's t and its momentum: state of the run, kept in its checkpoint
        metrics.setdefault("taid", {"t": args.taid_t_start, "prev": None, "momentum": 0.0})
    trained = DDP(model) if world > 1 else model
    trained = torch.compile(trained) if args.compile else trained
    amp = autocast(device.type)  # bf16 on GPUs (weights, optimizer and evaluation stay fp32)
    model.train()
    t0, tokens, pools = time.time(), 0, {}
    bar = tqdm(range(run.start, args.max_iters), initial=run.start, total=args.max_iters, desc=args.method,
               disable=rank > 0)
    saved = run.start or None  # the step of the checkpoint at args.out (None: none yet)
    step = run.start
    try:
        for step in bar:
            lr = lr_at(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            g = torch.Generator(device).manual_seed(step_seed(args, step))  # the global batch's label dropout
            codes, labels = step_batch(args, step, model, teacher, splits["train"], pools, g, metrics)
            g.manual_seed(step_seed(args, step, rank + 1))  # this rank's own rollouts
            with amp:
                loss = method_loss(args, trained, model, run.reference or teacher, codes, labels, groups, g,
                                   metrics.get("taid", {}).get("t"))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # the norm of the all-reduced gradients: every rank sees the same one, and stops together
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            if not (torch.isfinite(loss) and torch.isfinite(norm)):
                raise SystemExit(f"the loss is {loss.item()} (gradient norm {norm.item()}) at step {step}: training "
                                 f"diverged; {kept(args, saved)}")
            optimizer.step()
            count_step(args, metrics, loss, codes, step, teacher)
            tokens, done = tokens + codes.numel() * world, step + 1
            if done % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens / (time.time() - t0):.0f}",
                                **({"t": f"{metrics['taid']['t']:.3f}"} if "taid" in metrics else {}))
            if rank == 0 and (done % args.eval_interval == 0 or done == args.max_iters):
                curve_point(args, model, test, teacher, done, metrics, bar)
            if done % args.ckpt_interval == 0 or done == args.max_iters:
                metrics["wall_time"] += time.time() - t0
                tokens, t0 = 0, time.time()
                if done == args.max_iters and world > 1:
                    runs.check_ranks_agree(model, world)
                    metrics["ranks_agree"] = world
                if not all(torch.isfinite(p).all() for p in model.parameters()):
                    raise SystemExit(f"the weights are no longer finite at step {done}: training diverged; "
                                     f"{kept(args, saved)}")
                if rank == 0:
                    metrics["step"] = done
                    try:
                        runs.save_checkpoint(args.out, model, optimizer, done, args, run.fingerprints, metrics)
                    except SystemExit as e:  # the disk refused it: the last checkpoint is intact
                        raise SystemExit(f"{e}; {kept(args, saved, False)}") from None
                saved = done
    except KeyboardInterrupt:
        bar.close()
        raise SystemExit(f"interrupted at step {step} of {args.max_iters}: {kept(args, saved, False)}") from None
    if world > 1:
        dist.barrier()  # the next run of the pipeline reads this checkpoint
    if rank == 0 and "test_nll" in metrics:
        kl = f", KL(teacher || student) {metrics['test_kl']:.4f}" if "test_kl" in metrics else ""
        print(f"done: test NLL {metrics['test_nll']:.4f}{kl} nats/code on {len(test[0])} test images, "
              f"{metrics['wall_time'] / 60:.1f} min of training; saved {args.out}")
    return metrics


def run_all(args, chain, rank):
    """The main job: the data, each run of the pipeline (parents first), then the table."""
    torch.manual_seed(args.seed + rank)
    tokenizer, splits = runs.load_data(args)
    if args.prepare:
        if rank == 0:
            print(", ".join(f"{k}: {tuple(v[0].shape)} codes" for k, v in splits.items()) + f" in {args.out_dir}/tokens/")
        runs.teardown_ddp()
        return splits
    if Path(args.data_dir, "train").is_dir() and args.eval_samples:  # FID-cls's classifier knows Fashion-MNIST only
        args.eval_samples = 0
        if rank == 0:
            print("an image folder: the table has test NLL and KL; FID: torchrun ... evaluate.py CKPT --features inception")
    for run in chain:
        role = None if run is args else runs.ROLES["teacher" if run.out == args.teacher else run.method]
        metrics = train(run, tokenizer, splits, role)
    if rank == 0:  # the main job's table: every finished model in --out-dir, each measured once
        student = runs.stage_args(args, "kd").init  # the no-KD student: the shipped one by default
        paths = [args.teacher, student] + [f"{args.out_dir}/{m}/ckpt.pt" for m in METHODS] + [args.out]
        table(paths, tokenizer, *splits["test"][:2], args)
    runs.teardown_ddp()
    return metrics


def main(argv=None):
    p = runs.parser(__doc__, METHODS)
    p.add_argument("--prepare", action="store_true", help="build the tokenizer and token caches, then stop "
                   "(ImageNet: the token extraction, over all ranks under torchrun)")
    p.add_argument("--export", nargs=2, metavar=("CKPT", "DST"), help="instead, write a finished checkpoint "
                   "without its optimizer state to DST, as the files in weights/ were made")
    args = runs.get_args(argv, p)
    if args.export:
        return runs.export(*args.export)
    rank, _ = runs.setup_ddp(args)
    chain = [] if args.prepare else runs.pipeline(args)
    # every output checked before any work; one process at a time per checkpoint
    flags = {run.out: "--out" if run is args else "--out-dir" for run in chain}
    outputs = {f"{args.out_dir}/tokens/train.json": "--out-dir", **flags}
    if args.tokenizer and not Path(args.tokenizer).exists():
        outputs[args.tokenizer] = "--tokenizer"
    for path, flag in outputs.items():
        check_output(path, flag)
    try:
        with contextlib.ExitStack() as locks:
            for path, flag in flags.items() if rank == 0 else ():
                locks.enter_context(output_lock(path, flag))
            return run_all(args, chain, rank)
    except KeyboardInterrupt:  # outside a training loop: nothing half-written, every file is written atomically
        raise SystemExit("interrupted before or after training, with nothing half-written: run the same command "
                         "again to carry on") from None


if __name__ == "__main__":
    main()
