"""
Sampling from a GPT: classifier-free guidance, temperature, top-k, top-p, with or without KV cache;
speculative sampling with a distilled student as the draft (exact, or LANTERN's relaxed acceptance), or
with none (speculative Jacobi decoding, exact, or GSD's grouped acceptance);
writes a PNG grid with one row per class. (The mixed rollouts of on-policy KD and VarKD live in
distill.py, beside the losses they feed.)

    python sample.py                                          # the shipped teacher -> out/weights/teacher_samples.png
    python sample.py --ckpt out/varkd/ckpt.pt                 # -> out/varkd/ckpt_samples.png
    python sample.py --draft out/varkd/ckpt.pt --gamma 4      # speculative, for the shipped teacher
    python sample.py --gsd                                    # the teacher drafting for itself (GSD)
    python sample.py --ckpt c2i_B_256.pt --preset B --tokenizer vq_ds16_c2i.pt --classes 207,360,387
"""
import argparse
import contextlib
import copy
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from checks import (check_memory, check_output, count, existing_device, fraction, guidance_scale, int_list, non_negative, output_lock,
                    positive_int, ranged, seed_int)
from data import atomic_write, beside, parents, save_grid
from model import GPT, PRESETS, add_decode_flag, autocast, compile_decode, load_checkpoint
from tokenizer import load_tokenizer


FLOAT32_TINY = torch.finfo(torch.float32).tiny  # a temperature below it is 0 in float32: greedy


def filtered_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """logits (B, V) -> next-code probabilities (B, V) after temperature, then top-k, then top-p.

    temperature 0 is greedy: a one-hot on the argmax (so is one too small for float32, which would
    divide by zero). top_k 0 and top_p 1 switch those filters off.
    """
    if temperature < FLOAT32_TINY:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits.float()
    if temperature != 1:  # from the max down, so that a tiny temperature sends the rest to -inf, never to nan
        logits = (logits - logits.amax(-1, keepdim=True)) / temperature
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
    if temperature < FLOAT32_TINY:
        return logits.argmax(-1)
    probs = filtered_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def guided_rows(labels, cfg_scale, num_classes):
    """The rows a guided call decodes: the labels, then as many null-class rows (unguided: the labels
    alone), and the function that doubles a batch of codes to match them."""
    if cfg_scale == 1.0:
        return labels, lambda x: x
    return torch.cat([labels, torch.full_like(labels, num_classes)]), lambda x: torch.cat([x, x])


def guide(logits, cfg_scale):
    """Raw logits of guided_rows' rows -> uncond + s * (cond - uncond), LlamaGen's mix (unguided: as they are)."""
    if cfg_scale == 1.0:
        return logits
    cond, uncond = logits.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def guided_probs(raw, cfg_scale, temperature=1.0, top_k=0, top_p=1.0):
    """Raw logits of guided_rows' rows at L positions (B or 2B, L, V) -> the guided, filtered
    probabilities (B, L, V) a speculative sampler tests drafts against."""
    logits = guide(raw, cfg_scale)
    return filtered_probs(logits.flatten(0, 1), temperature, top_k, top_p).view(logits.shape)


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
    labels, both = guided_rows(labels, cfg_scale, config.num_classes)  # (2B,) when guided
    codes = torch.zeros(B, T, dtype=torch.long, device=labels.device)  # (B, T), filled left to right
    was_training = model.training
    model.eval()
    try:
        with autocast(labels.device.type):  # bf16 on GPUs, as LlamaGen samples
            if kv_cache:
                model.setup_cache(labels.shape[0])
                logits = model.prefill(labels, labels.new_zeros(len(labels), 0))[:, -1]  # (B or 2B, V)
            for t in range(T):
                if not kv_cache:
                    # forward() takes codes 0..t and predicts each; code t is a dummy (still 0) whose
                    # own logits are the ones needed
                    logits = model(both(codes[:, : t + 1]), labels)[:, t]
                codes[:, t] = sample_logits(guide(logits, cfg_scale), temperature, top_k, top_p, generator)
                if kv_cache and t + 1 < T:
                    logits = model.decode(both(codes[:, t : t + 1]), t)[:, -1]
    finally:
        if kv_cache:
            model.clear_cache()
        model.train(was_training)
    return codes


def timed(fn, device, repeats=5, warm_up=True):
    """Median wall seconds of fn() over `repeats` calls, after a warm-up call (allocations, caches,
    compilation); CUDA work is waited for. The one clock of bench.py and of every images/s figure."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def sampling_speed(configs, cfg_scales, batch_sizes=(64, 1), device="cpu", decode="eager", rounds=5, min_seconds=0.2):
    """generate()'s images per second on this machine, {(config name, scale, batch size): img/s} for
    configs {name: GPTConfig}. The speed is the architecture's: weights do not change the work of a
    fixed-length decode, and guidance doubles every call's rows at any scale other than 1, so one
    random-weight model per architecture is timed, unguided and guided, and the figure shared by
    every model and scale it stands for, in the decode mode `decode`. The timings are interleaved (rounds of one timing of each,
    the median kept), so a machine that slows down during the table slows every figure alike;
    compare them as ratios within one table."""
    device = torch.device(device)
    archs = {}  # one model per architecture: the names it stands for
    for name, config in configs.items():
        archs.setdefault(repr(config), (config, []))[1].append(name)
    torch.manual_seed(0)
    jobs = {}
    for key, (config, _) in archs.items():
        model = compile_decode(GPT(config).to(device).eval(), decode)
        for guided in sorted({s != 1 for s in cfg_scales}):
            for b in batch_sizes:
                labels = torch.arange(b, device=device) % config.num_classes
                g = torch.Generator(device).manual_seed(0)
                call = lambda m=model, y=labels, s=2.0 if guided else 1.0, g=g: generate(m, y, s, generator=g)  # noqa: E731
                once = timed(call, device, 1)  # calls per timing: enough to outlast the clock's noise
                jobs[key, guided, b] = (call, max(1, round(min_seconds / max(once, 1e-6))), [])
    for _ in range(rounds):
        for call, calls, times in jobs.values():
            times.append(timed(lambda: [call() for _ in range(calls)], device, 1, warm_up=False) / calls)
    speed = {}
    for (key, guided, b), (_, _, times) in jobs.items():
        for name in archs[key][1]:
            for s in cfg_scales:
                if (s != 1) == guided:
                    speed[name, s, b] = b / sorted(times)[len(times) // 2]
    return speed


# ------------------------------------------------------------------------------------------------
# Speculative sampling (Leviathan et al. 2023): a small draft proposes gamma codes one at a time,
# the target scores all of them in one call and keeps a prefix; the output is distributed exactly
# as the target's own samples. With a distilled student as the draft, the acceptance rate measures
# how well it learned its teacher (DistillSpec, Zhou et al. 2023).


def relax(probs, drafted, groups, delta):
    """LANTERN-style relaxed target (Jang et al. 2024): probs (N, V), drafted (N,) codes, groups (V,)
    codebook group ids -> probs with up to delta of probability moved onto each drafted code from
    the other codes of its group (in proportion to their probabilities), so that the total variation
    to the exact target is at most delta. Near-duplicate codes then stop rejecting each other."""
    same = groups[None, :] == groups[drafted][:, None]  # (N, V)
    same[torch.arange(len(drafted)), drafted] = False
    pool = (probs * same).sum(-1, keepdim=True)  # (N, 1): the neighbours' mass
    moved = pool.clamp(max=delta)
    keep = torch.where(pool > 0, 1 - moved / pool.clamp(min=1e-30), torch.ones_like(pool))
    out = torch.where(same, probs * keep, probs)
    return out.scatter_add(1, drafted[:, None], moved)


def accepted_drafts(p, q, drafted, generator=None, clusters=None):
    """p, q (B, g, V): the target's and the draft's probabilities at g drafted positions, drafted
    (B, g) codes -> (B,) the drafts each row keeps before its first rejection, draft d kept with
    probability min(1, p(d) / q(d)); with clusters (B, g, V) boolean, the codes accepted in d's place
    (GSD), min(1, p(G) / q(G)) over its cluster G instead."""
    if clusters is None:
        p_d, q_d = p.gather(-1, drafted[..., None])[..., 0], q.gather(-1, drafted[..., None])[..., 0]
    else:
        p_d, q_d = (p * clusters).sum(-1), (q * clusters).sum(-1)
    u = torch.rand(drafted.shape, generator=generator, device=drafted.device)
    return (u * q_d < p_d).long().cumprod(1).sum(1)


def next_after_drafts(p, q, n, m, drafted, generator=None):
    """The code every row commits at offset m = min(n) of a round: a row that kept draft m keeps it;
    one that rejected it draws from the residual max(p - q, 0); with every draft kept (m = g, q holds
    g), all draw from the target's p. p (B, g + 1, V), q (B, g, V), n (B,), drafted (B, g) -> (B,)."""
    if m == q.shape[1]:
        return torch.multinomial(p[:, m], 1, generator=generator)[:, 0]
    residual = (p[:, m] - q[:, m]).clamp(min=0)
    # p == q up to rounding: a rejection had probability ~0, fall back to p
    residual = torch.where(residual.sum(-1, keepdim=True) > 1e-12, residual, p[:, m])
    fresh = torch.multinomial(residual, 1, generator=generator)[:, 0]
    return torch.where(n == m, fresh, drafted[:, m])


def catch_up(model, codes, fed, last, upto, both):
    """A model's raw logits predicting codes fed..upto: `last` (predicting code fed, kept from its
    previous call) and, when it has not seen codes fed..upto-1, one decode of them. -> (logits, calls)."""
    if fed == upto:
        return last, 0
    return torch.cat([last, model.decode(both(codes[:, fed:upto]), fed)], 1), 1


@contextlib.contextmanager
def kv_caches(models, batch_size):
    """Each model in eval mode with an empty KV cache for the block; afterwards as it was."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
            m.setup_cache(batch_size)
        yield
    finally:
        for m, mode in zip(models, modes):
            m.clear_cache()
            m.train(mode)


@torch.no_grad()
def speculative_generate(target, draft, labels, gamma=4, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0,
                         generator=None, groups=None, delta=0.0):
    """labels (B,) -> codes (B, T) distributed as generate(target, ...) with the same guidance and
    filters, and counts {"drafted", "accepted", "target_calls", "draft_calls", "length"}.

    Each round the draft samples g = min(gamma, codes left - 1) codes; the target scores the codes
    committed since its last call plus the g drafts in one decode; row i keeps its first n_i drafts
    (accepted_drafts). The batch advances by m + 1 codes, m = min_i n_i, code t+m from
    next_after_drafts. Cutting a row at m+1 <= n_i+1 codes keeps it exact: each committed code is the
    accept-or-residual outcome at its position, and where the cut falls depends only on earlier codes
    and on the other rows. groups, delta > 0: relaxed acceptance (relax() above), no longer exact.
    """
    T, B = target.config.block_size, len(labels)
    shape = lambda c: f"{c.grid_size}x{c.grid_size} codes of {c.vocab_size}, {c.num_classes} classes"  # noqa: E731
    if shape(draft.config) != shape(target.config):
        raise ValueError(f"the draft predicts {shape(draft.config)}, the target {shape(target.config)}: "
                         f"pass a draft trained on the target's tokenizer and classes")
    if delta > 0 and groups is None:
        raise ValueError("relaxed acceptance (delta > 0) needs the codebook groups")
    if draft is target:  # each needs its own KV cache
        draft = copy.deepcopy(target)
    rows, both = guided_rows(labels, cfg_scale, target.config.num_classes)
    probs = lambda raw: guided_probs(raw, cfg_scale, temperature, top_k, top_p)  # noqa: E731
    codes = torch.zeros(B, T, dtype=torch.long, device=labels.device)
    counts = dict(drafted=0, accepted=0, target_calls=1, draft_calls=1, length=T)
    with autocast(labels.device.type), kv_caches((target, draft), len(rows)):  # bf16 on GPUs
        # each model: the codes fed to it so far, and its raw logits predicting the next one
        (t_fed, t_next), (d_fed, d_next) = ((0, m.prefill(rows, rows.new_zeros(len(rows), 0))[:, -1:])
                                            for m in (target, draft))
        t = 0
        while t < T:
            g = min(gamma, T - t - 1)
            q, d_raw = [], []  # per drafted code: the draft's probabilities (B, V), its raw logits
            for i in range(g):
                logits, calls = catch_up(draft, codes, d_fed, d_next, t + i, both)
                d_fed, d_next = t + i, logits[:, -1:]
                counts["draft_calls"] += calls
                q.append(probs(d_next)[:, 0])
                d_raw.append(d_next)
                codes[:, t + i] = torch.multinomial(q[-1], 1, generator=generator)[:, 0]
            # one target call scores every drafted code and the code after them
            logits, calls = catch_up(target, codes, t_fed, t_next, t + g, both)
            counts["target_calls"] += calls
            raw = logits[:, t - t_fed:]  # (B or 2B, g + 1, V): raw logits predicting codes t..t+g
            p, drafted = probs(raw), codes[:, t:t + g]
            n = torch.zeros(B, dtype=torch.long, device=codes.device)
            if g:
                q = torch.stack(q, 1)  # (B, g, V)
                if delta > 0:
                    p[:, :g] = relax(p[:, :g].flatten(0, 1), drafted.flatten(), groups, delta).view(B, g, -1)
                n = accepted_drafts(p[:, :g], q, drafted, generator)
                counts["drafted"] += int((n + 1).clamp(max=g).sum())  # drafts tested: up to the first rejection
                counts["accepted"] += int(n.sum())
            else:
                q = p[:, :0]
            m = int(n.min())
            codes[:, t + m] = next_after_drafts(p, q, n, m, drafted, generator)
            # rollback: each model keeps what it was fed up to code t+m; what it was fed after that stays
            # in its cache, invisible (a query attends only to positions before its own) until overwritten
            t_fed, t_next = t + m, raw[:, m:m + 1]
            if g:
                keep = min(m, g - 1)  # the draft was fed codes up to t+g-2
                d_fed, d_next = t + keep, d_raw[keep]
            t += m + 1
    return codes, counts


def gsd_clusters(p, drafted, groups, threshold):
    """GSD's dynamic cluster of each drafted code d (So et al. 2025): d and the codes of its codebook
    group (near-duplicates) whose target probability is within `threshold` of d's, the codes the
    target finds as valid as d here. p (B, g, V), drafted (B, g) -> (B, g, V) boolean."""
    p_d = p.gather(-1, drafted[..., None])  # (B, g, 1)
    same = groups[None, None, :] == groups[drafted][..., None]  # (B, g, V)
    cluster = same & ((p - p_d).abs() < threshold)
    return cluster.scatter(-1, drafted[..., None], True)


@torch.no_grad()
def jacobi_generate(model, labels, window=8, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, generator=None,
                    groups=None, threshold=0.0):
    """Speculative Jacobi decoding (Teng et al. 2024): the model drafts for itself, no draft model.
    labels (B,) -> codes (B, T) distributed as generate(model, ...), and counts {"drafted", "accepted",
    "target_calls", "length"}.

    Every position holds a draft and the distribution q it was drawn from: uniform at first. Each call
    decodes the last committed code and the next g = min(window, codes left - 1) drafts in one pass,
    which gives the model's p at each of them; drafts are tested left to right as in speculative
    sampling (accepted_drafts), the batch advances by m + 1 codes (next_after_drafts), and every draft
    after the cut is redrawn from this call's p, its q for the next call (the Jacobi step: a draft's
    context improves with each call). Exact: each draft is drawn from its q independently of the tests
    before it. GSD (So et al. 2025): with groups and threshold > 0 a draft is accepted for its cluster
    (gsd_clusters), min(1, p(G)/q(G)): more codes per call, no longer exact."""
    T, B, V = model.config.block_size, len(labels), model.config.vocab_size
    rows, both = guided_rows(labels, cfg_scale, model.config.num_classes)
    probs = lambda raw: guided_probs(raw, cfg_scale, temperature, top_k, top_p)  # noqa: E731
    q = torch.full((B, T, V), 1.0 / V, device=labels.device)  # (B, T, V): each position's draft law
    codes = torch.multinomial(q.flatten(0, 1), 1, generator=generator).view(B, T)  # drafts, then committed codes
    counts = dict(drafted=0, accepted=0, target_calls=1, length=T)
    with autocast(labels.device.type), kv_caches((model,), len(rows)):
        first = model.prefill(rows, rows.new_zeros(len(rows), 0))[:, -1:]  # predicting code 0
        t = 0
        while t < T:
            g = min(window, T - t - 1)
            if t == 0:  # the prefill predicted code 0; the drafts predict the codes after them
                raw = torch.cat([first, model.decode(both(codes[:, :g]), 0)], 1) if g else first
            else:  # the last committed code, then the drafts
                raw = model.decode(both(codes[:, t - 1:t + g]), t - 1)
            counts["target_calls"] += int(t > 0 or g > 0)
            p, drafted = probs(raw), codes[:, t:t + g]  # (B, g + 1, V): predicting codes t..t+g
            n = torch.zeros(B, dtype=torch.long, device=codes.device)
            if g:
                clusters = gsd_clusters(p[:, :g], drafted, groups, threshold) if threshold > 0 else None
                n = accepted_drafts(p[:, :g], q[:, t:t + g], drafted, generator, clusters)
                counts["drafted"] += int((n + 1).clamp(max=g).sum())
                counts["accepted"] += int(n.sum())
            m = int(n.min())
            codes[:, t + m] = next_after_drafts(p, q[:, t:t + g], n, m, drafted, generator)
            later = p[:, m + 1:]  # the drafts after the cut, redrawn from this call's predictions
            if later.shape[1]:
                q[:, t + m + 1:t + g + 1] = later
                codes[:, t + m + 1:t + g + 1] = torch.multinomial(later.flatten(0, 1), 1, generator=generator).view(B, -1)
            t += m + 1
    return codes, counts


def speculative_figures(*counts):
    """Acceptance rate (drafts accepted / drafts tested) and codes per target call and sequence
    (plain sampling: 1.0, one call per code), over the counts of one or more speculative_generate calls."""
    total = {k: sum(c[k] for c in counts) for k in counts[0]}
    return dict(acceptance=total["accepted"] / max(total["drafted"], 1),
                codes_per_call=total["length"] / total["target_calls"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", "--teacher", help="GPT checkpoint to sample from (default: the shipped teacher, "
                   "weights/teacher.pt; with --grid 14, weights/grid14/teacher.pt, or out/grid14/teacher.pt where not shipped)")
    p.add_argument("--grid", type=int, default=7, choices=[7, 14], help="the default --ckpt and --tokenizer: the "
                   "shipped 7x7 ones, or the 14x14 ones (weights/grid14/, else what distill.py --grid 14 built in out/grid14/) (default: 7)")
    p.add_argument("--draft", help="a smaller GPT on the same codes, e.g. out/varkd/ckpt.pt: speculative sampling, "
                   "the same images' distribution in fewer calls of --ckpt (default: none)")
    p.add_argument("--draft-preset", choices=list(PRESETS), help="model shape of a LlamaGen --draft")
    p.add_argument("--gsd", action="store_true", help="speculative Jacobi decoding, no draft model: --ckpt drafts for "
                   "itself, --gamma codes ahead, with GSD's grouped acceptance (--gsd-threshold) (default: off)")
    p.add_argument("--gsd-threshold", type=fraction, default=0.15, help="--gsd: a drafted code is accepted for the "
                   "codes of its codebook group whose probability is within this of its own, in [0, 1]; 0 = exact "
                   "speculative Jacobi decoding (default: 0.15, the authors')")
    p.add_argument("--gamma", type=positive_int, default=4, help="codes drafted per round, >= 1 (default: 4)")
    p.add_argument("--relax-delta", type=fraction, default=0.0,
                   help="LANTERN's relaxed acceptance: up to this much probability moved onto a drafted code "
                        "from its codebook group, in [0, 1]; 0 = exact (default: 0)")
    p.add_argument("--batch-size", type=positive_int, help="images per call, >= 1 (default: all at once; with --draft: 1)")
    p.add_argument("--groups", type=positive_int, help="codebook groups of --relax-delta and --gsd, 1 to |V| (default: "
                   "|V|/4, as VarKD)")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="model shape, needed only for LlamaGen checkpoints (default: from the checkpoint)")
    p.add_argument("--tokenizer", help="tokenizer checkpoint that decodes the codes (default: the shipped one, "
                   "weights/tokenizer.pt; with --grid 14, weights/grid14/tokenizer.pt, or out/grid14/tokenizer.pt where not shipped)")
    p.add_argument("--image-size", type=positive_int, help="the tokenizer's image side, e.g. 384 for LlamaGen's "
                   "c2i_*_384.pt (default: the tokenizer's own)")
    p.add_argument("--out", default=None,
                   help="PNG to write (default: <ckpt without .pt>_samples.png beside the checkpoint; "
                   "out/weights/<name>_samples.png for a shipped one); an existing file needs --force")
    p.add_argument("--force", action="store_true", help="replace an existing --out or --npz (never a checkpoint)")
    p.add_argument("--classes", default=None, type=int_list,
                   help="comma-separated class ids, one row each (default: every class)")
    p.add_argument("--per-class", type=positive_int, default=8, help="images per class, one row, >= 1 (default: 8)")
    # LlamaGen samples GPT-B/L at 2.0; guidance trades diversity for class fidelity and a small
    # model with a weak class signal needs it at least as much
    p.add_argument("--cfg-scale", type=guidance_scale, default=2.0,
                   help="classifier-free guidance scale, >= 0, 1 = off (default: 2.0)")
    p.add_argument("--temperature", type=non_negative, default=1.0,
                   help="softmax temperature, >= 0, 0 = greedy (default: 1.0)")
    p.add_argument("--top-k", type=count, default=0, help="keep the k most likely codes, >= 0, 0 = all (default: 0)")
    p.add_argument("--top-p", type=ranged(float, 0, 1, low_open=True), default=1.0,
                   help="nucleus: keep the most likely codes holding this probability mass, in (0, 1], 1 = all "
                        "(default: 1.0)")
    p.add_argument("--npz", help="also write every sample and its label to this .npz (arr_0, arr_1), e.g. "
                   "--per-class 500 for evaluate.py (the grid shows 16 per class at most)")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed, >= 0 (default: 0)")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="recompute the whole prefix at every step: slow, for checking (default: off)")
    p.add_argument("--device", type=existing_device, default="cpu", help="torch device this machine has, e.g. cuda (default: cpu)")
    add_decode_flag(p)
    args = p.parse_args(argv)
    home = parents(args.grid)
    args.ckpt, args.tokenizer = args.ckpt or home["teacher"], args.tokenizer or home["tokenizer"]
    idle = [flag for flag, given in (("--relax-delta", args.relax_delta), ("--groups", args.groups and not args.gsd),
                                     ("--draft-preset", args.draft_preset)) if given]
    if idle and not args.draft:
        p.error(f"{', '.join(idle)} only apply to speculative sampling: pass --draft CKPT, or drop them")
    if args.gsd and args.draft:
        p.error("--gsd decodes without a draft model: pass --gsd or --draft CKPT, not both")
    if args.npz and not args.npz.endswith(".npz"):
        p.error(f"--npz {args.npz}: name it .npz (numpy would add the suffix and write elsewhere)")
    out = Path(args.out) if args.out else beside(args.ckpt).with_name(Path(args.ckpt).stem + "_samples.png")
    if args.npz and Path(args.npz).resolve() == out.resolve():
        p.error(f"--npz {args.npz} is also --out: pass two paths, the grid's and the samples'")
    check_output(out, "--out", args.force, kind="image")
    if args.npz:
        check_output(args.npz, "--npz", args.force, kind="array")
    with output_lock(out), (output_lock(args.npz, "--npz") if args.npz else contextlib.nullcontext()):
        # again, holding the locks: a writer that finished meanwhile left its files
        check_output(out, "--out", args.force, kind="image")
        if args.npz:
            check_output(args.npz, "--npz", args.force, kind="array")
        try:
            return draw_and_save(args, out)
        except KeyboardInterrupt:
            raise SystemExit(f"interrupted: nothing written to {out}") from None


def draw_and_save(args, out):
    """sample.py's work once its flags and outputs are checked: load, draw, write the grid (and .npz)."""
    tokenizer = load_tokenizer(args.tokenizer, image_size=args.image_size).to(args.device)
    model = load_checkpoint(args.ckpt, args.preset, tokenizer.cfg.grid_size, tokenizer.fingerprint).to(args.device)
    model, config = compile_decode(model, args.decode), model.config
    classes = args.classes or list(range(config.num_classes))
    if not all(0 <= c < config.num_classes for c in classes):
        raise SystemExit(f"--classes {classes} out of range: pass ids within 0..{config.num_classes - 1}")
    check_memory(len(classes) * args.per_class, (tokenizer.cfg.image_size,) * 2 + (tokenizer.cfg.in_channels,),
                 "--per-class x classes")
    labels = torch.tensor(classes, device=args.device).repeat_interleave(args.per_class)  # (rows * cols,)
    generator = torch.Generator(args.device).manual_seed(args.seed)

    start = time.perf_counter()
    filters = dict(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   generator=generator)
    if args.draft or args.gsd:
        if args.groups and args.groups > config.vocab_size:
            raise SystemExit(f"--groups {args.groups} is more than the {config.vocab_size} codes: pass 1 to "
                             f"{config.vocab_size}")
        grouped = args.relax_delta > 0 or (args.gsd and args.gsd_threshold > 0)
        groups = tokenizer.codebook_groups(args.groups or config.vocab_size // 4).to(args.device) if grouped else None
        if args.gsd:
            sampler = lambda chunk: jacobi_generate(model, chunk, args.gamma, **filters, groups=groups,  # noqa: E731
                                                    threshold=args.gsd_threshold)
            how = f"speculative Jacobi, {args.gamma} codes ahead" + (f", GSD threshold {args.gsd_threshold}" if grouped else "")
        else:
            draft = load_checkpoint(args.draft, args.draft_preset, tokenizer.cfg.grid_size, tokenizer.fingerprint)
            draft = compile_decode(draft.to(args.device), args.decode)
            sampler = lambda chunk: speculative_generate(model, draft, chunk, args.gamma, **filters,  # noqa: E731
                                                         groups=groups, delta=args.relax_delta)
            how = f"speculative, gamma {args.gamma}" + (f", relaxed delta {args.relax_delta}" if args.relax_delta else "")
        # the rows of a batch advance together, by the shortest run of accepted drafts: speculative
        # sampling is a latency method, one image at a time unless --batch-size says otherwise
        codes, counts = [], []
        for chunk in tqdm(labels.split(args.batch_size or 1), desc="speculative", leave=False):
            try:
                c, n = sampler(chunk)
            except ValueError as e:
                raise SystemExit(f"{args.draft}: {e}") from None
            codes.append(c)
            counts.append(n)
        codes, figures = torch.cat(codes), speculative_figures(*counts)
        drafts = f" and {sum(c['draft_calls'] for c in counts)} of the draft" if args.draft else ""
        print(f"{how}: {figures['acceptance']:.1%} of drafted codes accepted, {figures['codes_per_call']:.2f} codes "
              f"per call of the target ({sum(c['target_calls'] for c in counts)} calls{drafts} "
              f"for {len(labels)} x {config.block_size} codes)")
    else:
        codes = torch.cat([generate(model, chunk, **filters, kv_cache=not args.no_kv_cache)
                           for chunk in labels.split(args.batch_size or len(labels))])
    with torch.no_grad():
        images = tokenizer.decode(codes.view(-1, config.grid_size, config.grid_size))  # (N, H, W, C) uint8
    images = torch.as_tensor(images).cpu().numpy()
    seconds = time.perf_counter() - start

    save_grid(images.reshape(len(classes), args.per_class, *images.shape[1:])[:, :16], out)  # 16 per class at most
    if args.npz:  # every sample, for evaluate.py (ADM's and LlamaGen's layout)
        atomic_write(args.npz, lambda tmp: np.savez(tmp, images, labels.cpu().numpy()))
        print(f"wrote {args.npz}: {len(images)} samples; score them with python evaluate.py {args.npz}")
    print(f"wrote {out}: {len(images)} images at {len(images) / seconds:.1f} images/s")
    return figures if args.draft or args.gsd else None


if __name__ == "__main__":
    main()
