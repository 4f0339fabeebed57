"""The reproduction study: every method, the paper's VarKD ablation and two controls, over seeds,
each method tuned the same way first, every model judged across a guidance grid.

    python study.py --seeds 0,1,2              # the README's study, on the shipped parents
    python study.py --seeds 0 --study-iters 200 --no-tune
    python study.py --grid 14 --seeds 0 --rows kd_cont,varkd   # the long horizon: a few rows, one seed

The shipped tokenizer, teacher and no-KD student (weights/) serve every seed (with --tokenizer of
your own, they are built once under the out-dir). First the tuning, on a validation seed that is
never reported (--tune-seed, training and sampling): each tuned method (kd continued, ce continued,
seqkd, onpolicy, varkd, taid) tries the same grid, TUNE_LRS, and for the two with rollouts also the two
readings of their real prefix (READINGS); the rule, fixed before the runs: the lowest FID-cls at the
best scale of the guidance grid. Then per seed, under out/study/seed<s>/: stage-1 KD from the no-KD
student (--kd-iters steps), then from the KD checkpoint --study-iters more steps of each row below
(the paper's setting: stage 2 starts from stage-1 KD), each with its method's winning setting. A
killed study is run again with the same command: finished runs are reused, the unfinished one
continues from its last checkpoint, measured models are not measured again.

Writes out/study/tuning.md/.json, results.md and results.json (mean +- std over seeds of every figure
at each model's best scale, FID-cls at every scale, gap closure, whether a row beats kd continued by
more than the spread, the drift from its starting point per grid row, and each student as the draft of
speculative sampling for the teacher), out/study/fid_vs_cfg.png and out/study/compare.png (one row
per model, one column per class, the same sampling seed for every row).
"""
import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import runs
from checks import int_list, output_lock, positive_int, seed_int
from data import CLASSES, WEIGHTS, atomic_write
from bench import speculative_speed
from distill import METHODS, train
from evaluate import SPEED_BATCHES, cfg_plot, draw, table
from model import compile_decode, load_checkpoint
from sample import sampling_speed

# name, method, flags (after its method's tuned setting), what it is
ROWS = [
    ("kd_cont", "kd", [], "kd continued (control)"),
    ("ce_cont", "ce", [], "ce continued, no teacher (control)"),
    ("seqkd", "seqkd", [], "SeqKD: teacher samples"),
    ("onpolicy", "onpolicy", [], "GKD: mixed prefixes, lambda 0.1, JSD 0.5"),
    ("onpolicy_all", "onpolicy", ["--supervise", "all", "--prefix-frac", "0.25,0.75"],
     "GKD with JSD on the real prefix too"),
    ("varkd_rkl", "varkd", ["--no-entropy-weights", "--no-truncation", "--no-groups", "--no-parallel"],
     "mixed rollouts, reverse KL only"),
    ("varkd_rkl_all", "varkd", ["--no-entropy-weights", "--no-truncation", "--no-groups", "--no-parallel",
                                "--supervise", "all", "--prefix-frac", "0.25,0.75"], "the same, reverse KL on the prefix too"),
    ("varkd_entropy", "varkd", ["--no-groups", "--no-parallel"], "+ entropy weights, truncation"),
    ("varkd_groups", "varkd", ["--no-parallel"], "+ codebook relaxation"),
    ("varkd", "varkd", [], "+ parallel rollouts = VarKD"),
    ("varkd_sampled", "varkd", ["--supervise", "sampled", "--prefix-frac", "0.25,0.75"],
     "VarKD, the sampled codes only"),
    ("varkd_all", "varkd", ["--supervise", "all", "--prefix-frac", "0.25,0.75"], "VarKD, reverse KL on the prefix too"),
    ("varkd_lam0.5", "varkd", ["--lam", "0.5"], "VarKD, rollouts on half the steps"),
    ("varkd_lam0.1", "varkd", ["--lam", "0.1"], "VarKD, rollouts on a tenth of the steps (GKD's)"),
    ("taid", "taid", [], "TAID: a target from the student to the teacher, t 0.4 -> 1"),
]
STAGE1 = [("ce", "no-KD student"), ("kd", "stage-1 KD")]
# the tuning, the same for every method: its row of ROWS is tried with each learning rate, and the
# methods with rollouts with each reading of a rollout's real prefix: teacher-forced KD on it, or
# nothing on it but rollouts that sometimes start from the class alone (a prefix from 0)
TUNED = {"kd": "kd_cont", "ce": "ce_cont", "seqkd": "seqkd", "onpolicy": "onpolicy", "varkd": "varkd", "taid": "taid"}
TUNE_LRS = ("3e-4", "1e-3")
UNTUNED = {"ce": ["--lr", "1e-3"]}  # --no-tune: ce's own default learning rate is for training from scratch
READINGS = {"prefix-kd": ["--supervise", "prefix-kd", "--prefix-frac", "0.25,0.75"],
            "prefix0": ["--supervise", "sampled", "--prefix-frac", "0,0.75"]}
FIGURES = [("FID-cls", "FID-cls", 2), ("KID-cls", "KID-cls", 2), ("precision-cls", "prec", 3),
           ("recall-cls", "recall", 3), ("IS-cls", "IS-cls", 2), ("class_acc-cls", "acc", 3),
           ("test_nll", "NLL", 3), ("test_kl", "KL to teacher", 3), ("wall_time", "train min", 1),
           ("teacher_seqs", "teacher seqs (k)", 1), ("img_s_64", "img/s 64", 0), ("img_s_1", "img/s 1", 1)]
HELD_OUT = ("test_nll", "test_kl", "wall_time", "teacher_seqs")  # the others: at a guidance scale
# the guidance-free study (--guidance-free): every method taught the guided teacher (--teacher-cfg S,
# tuned), CCA beside them, all from the no-KD student, judged at CFG 1: a student that samples in one
# pass per code, against the no-KD student at CFG 2 (two passes)
GF_ROWS = [
    ("ce_cont", "ce", [], "ce continued, no teacher (control)"),
    ("kd_gf", "kd", [], "kd, the guided teacher's target"),
    ("seqkd_gf", "seqkd", [], "SeqKD, the guided teacher's samples and target"),
    ("onpolicy_gf", "onpolicy", [], "GKD, the guided teacher's target"),
    ("varkd_gf", "varkd", [], "VarKD, the guided teacher's target"),
    ("taid_gf", "taid", [], "TAID, the guided teacher's target"),
    ("cca", "cca", [], "CCA (Chen et al. 2024), no teacher"),
]
GF_TUNED = {"ce": "ce_cont", "kd": "kd_gf", "seqkd": "seqkd_gf", "onpolicy": "onpolicy_gf", "varkd": "varkd_gf",
            "taid": "taid_gf", "cca": "cca"}
# each method's guidance knob, tried beside TUNE_LRS: the teacher's scale S, or CCA's lambda (its
# guidance strength: the authors' 1000 for LlamaGen-B and a tenth of it). The readings of a rollout's
# prefix are not tried again here: prefix-kd, the default
TEACHER_CFGS = {f"S{s}": ["--teacher-cfg", s] for s in ("2", "3")}
GF_KNOBS = {"kd": TEACHER_CFGS, "seqkd": TEACHER_CFGS, "onpolicy": TEACHER_CFGS, "varkd": TEACHER_CFGS, "taid": TEACHER_CFGS,
            "cca": {f"lam{v}": ["--cca-lambda", v] for v in ("100", "1000")}}
PLANS = {  # rows, tuned methods and their grid, the start of stage 2, the tuning's scale (None: each one's best)
    "paper": dict(rows=ROWS, tuned=TUNED, readings=READINGS, knobs={}, start="kd", rule_cfg=None, dir="study",
                  control="kd_cont", compare_cfg=2.0),
    # its comparison image: the rows sampled guidance-free, beside the teacher and the no-KD student
    # at CFG 2 (and the no-KD student at 1: what guidance-free sampling gives without distillation)
    "guidance-free": dict(rows=GF_ROWS, tuned=GF_TUNED, readings={}, knobs=GF_KNOBS, start="ce", rule_cfg=1.0,
                          dir="study_gf", control="ce_cont", compare_cfg=1.0),
}
PLOTTED = ("teacher", "ce", "kd", "kd_cont", "ce_cont", "seqkd", "onpolicy", "varkd", "varkd_sampled", "varkd_all", "taid",
           "kd_gf", "seqkd_gf", "onpolicy_gf", "varkd_gf", "taid_gf", "cca")
SPEC_CFG = 2.0  # the drafts and the comparison image: the scale the teacher is best at
# the students that draft for the teacher (bench.speculative_speed): one image per call, gamma 4
DRAFTS = ("ce", "kd", "kd_cont", "seqkd", "onpolicy", "varkd", "taid", "kd_gf", "varkd_gf", "cca")
SPECULATIVE = [("spec_acceptance", "drafts accepted", 3), ("spec_codes_per_call", "codes per teacher call", 2),
               ("spec_speed_up", "speed-up", 2), ("spec_draft_cost", "draft cost per call", 2)]


def row_list(text, rows):
    """--rows: comma-separated names from the plan's rows, kept in their order; None: the problem."""
    names, known = {n.strip() for n in text.split(",") if n.strip()}, [name for name, *_ in rows]
    if not names or names - set(known):
        return None, (f"--rows: unknown row(s) {', '.join(sorted(names - set(known))) or '(none given)'}: give "
                      f"comma-separated names from {', '.join(known)}")
    return [n for n in known if n in names], None


def study_dir(args):
    return Path(args.out_dir) / args.plan["dir"]


def train_locked(run, tokenizer, splits, role=None):
    """distill.train, one writer per run: a second study on the same out-dir is refused at the run
    the first is training, and reuses the runs it finished (under torchrun rank 0 holds the lock)."""
    with output_lock(run.out, "--out-dir") if runs.rank_world()[0] == 0 else contextlib.nullcontext():
        return train(run, tokenizer, splits, role)


def stage1(args, seed, base):
    """Stage-1 KD of a seed: from the one no-KD student, with the seed's data order."""
    shared = {**args.stage_flags, "seed": seed, "resume": True}
    return runs.get_args([], **{**shared, "max_iters": args.kd_iters}, method="kd", out=f"{base}/kd/ckpt.pt")


def stage2(args, seed, kd, method, flags, out):
    """A row's run from `kd` (the guidance-free study: from the no-KD student itself)."""
    init = kd.out if args.plan["start"] == "kd" else kd.init
    shared = {**args.stage_flags, "seed": seed, "resume": True, "max_iters": args.study_iters, "init": init}
    return runs.get_args(["--method", method, *flags], **shared, out=out)


def study_runs(args, seed, winners):
    """The runs of one seed, parents first: [(name, run args)]. Every row starts from that seed's
    stage-1 KD (the guidance-free study: from the no-KD student), with its method's tuned flags
    (winners: method -> flags), then its own."""
    base = f"{study_dir(args)}/seed{seed}"
    kd = stage1(args, seed, base)
    return [("kd", kd)] * (args.plan["start"] == "kd") + [
        (name, stage2(args, seed, kd, method, [*winners.get(method, []), *flags], f"{base}/{name}/ckpt.pt"))
        for name, method, flags, _ in args.plan["rows"] if name in args.rows]


def candidates(method, plan):
    """The tuning grid of a method: {candidate name: flags}, every learning rate with every reading of
    a rollout's prefix (the paper's study) or every setting of its guidance knob (the guidance-free one)."""
    readings = plan["readings"] if method in ("onpolicy", "varkd") and plan["readings"] else {"": []}
    knobs = plan["knobs"].get(method, {"": []})
    return {"_".join(filter(None, (f"lr{lr}", r, k))): ["--lr", lr, *r_flags, *k_flags]
            for lr in TUNE_LRS for r, r_flags in readings.items() for k, k_flags in knobs.items()}


def tune(args, tokenizer, splits):
    """Every tuned method's grid on the validation seed, measured at every guidance scale; returns
    {method: the winner's flags} and writes out/study/tuning.md/.json. Each candidate is measured as
    soon as it is trained and its figures kept in tune<seed>/lines.json, which stands for its
    checkpoint once that is gone: a tuning stopped anywhere, or run in pieces on other machines,
    continues where it stopped."""
    seed, base, plan = args.tune_seed, f"{study_dir(args)}/tune{args.tune_seed}", args.plan
    rule_cfg = plan["rule_cfg"]
    kd = stage1(args, seed, base)
    rows = {name: (method, flags) for name, method, flags, _ in plan["rows"]}
    methods = {rows[name][0] for name in args.rows}  # the methods of the rows asked for are tuned
    tuned = {method: row for method, row in plan["tuned"].items() if method in methods}
    path = Path(base) / "lines.json"
    settings = json.loads(json.dumps(seed_settings(args, seed)))
    saved = read_lines(path, settings)
    measure = argparse.Namespace(**{**vars(args), "seed": seed, "by_row": True})
    lines, started = {}, False  # the candidates' table lines; whether stage 1 is trained
    for method, row in tuned.items():
        for cand, flags in candidates(method, plan).items():
            name, flags = f"{row}_{cand}", [*flags, *rows[row][1]]
            run = stage2(args, seed, kd, method, flags, f"{base}/{name}/ckpt.pt")
            if saved["flags"].get(name) == flags and name in saved["lines"] and not Path(run.out).exists():
                lines[method, cand] = saved["lines"][name]  # measured before, its checkpoint elsewhere
                continue
            if plan["start"] == "kd" and not started:
                print(f"\n== tuning, validation seed {seed}: stage-1 KD ==")
                train_locked(kd, tokenizer, splits)
                started = True
            print(f"\n== tuning, validation seed {seed}: {name} ==")
            train_locked(run, tokenizer, splits)
            if runs.rank_world()[0] > 0:
                continue
            lines[method, cand] = table([run.out], tokenizer, *splits["test"][:2], measure)[run.out]
            saved["lines"][name], saved["flags"][name] = lines[method, cand], flags
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(saved, indent=1)))
    if runs.rank_world()[0] > 0:
        return None
    rule = (f"lowest FID-cls at CFG {rule_cfg:g}" if rule_cfg else "lowest FID-cls at the best scale of the guidance grid")
    out = study_dir(args)
    # the methods tuned before, by another call with other rows, stay beside these
    result = json.loads((out / "tuning.json").read_text()) if (out / "tuning.json").exists() else {}
    if (result.get("seed"), result.get("rule")) != (seed, rule):
        result = {"seed": seed, "rule": rule, "methods": {}}
    for method, row in tuned.items():
        scores = {cand: {"best_cfg": m["best_cfg"], "FID-cls": m["FID-cls"],
                         "by_cfg": {str(float(s)): f["FID-cls"] for s, f in m["cfg"].items()}}
                  for cand in candidates(method, plan) for m in [lines[method, cand]]}
        winner = min(scores, key=lambda c: scores[c]["by_cfg"][str(rule_cfg)] if rule_cfg else scores[c]["FID-cls"])
        result["methods"][method] = {"row": row, "winner": winner, "flags": candidates(method, plan)[winner],
                                     "candidates": scores}
    md = [f"| {r['row']} | {cand} | " + " | ".join(f"{m['by_cfg'][str(s)]:.2f}" for s in args.eval_cfg) +
          f" | {m['FID-cls']:.2f} at {m['best_cfg']:g} | {'**winner**' if cand == r['winner'] else ''} |"
          for r in result["methods"].values() for cand, m in r["candidates"].items()]
    head = ("| row | setting | " + " | ".join(f"FID-cls at CFG {s:g}" for s in args.eval_cfg) +
            " | best | |\n|---|---|" + "---:|" * len(args.eval_cfg) + "---|---|")
    start = f"the same stage-1 KD (seed {seed})" if plan["start"] == "kd" else "the no-KD student"
    text = (f"# Tuning on the validation seed {seed} (never reported)\n\n{head}\n" + "\n".join(md) +
            f"\n\nEach row's method from {start}, {args.study_iters} steps; the rule, fixed "
            f"before the runs: {result['rule']} ({args.eval_samples} samples per scale, sampling seed {seed}). " +
            ("Readings: prefix-kd = teacher-forced KD on a rollout's real prefix U[0.25, 0.75]; prefix0 = nothing on "
             "the prefix, which is U[0, 0.75].\n" if plan["readings"] else
             "S: the teacher's guidance in the target (--teacher-cfg); lam: CCA's lambda.\n"))
    atomic_write(out / "tuning.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    atomic_write(out / "tuning.md", lambda tmp: Path(tmp).write_text(text))
    print("\n" + text)
    return {m: r["flags"] for m, r in result["methods"].items() if m in tuned}


def run(args, tokenizer, splits, seeds):
    """Tune, train what is missing, measure what is unmeasured, then write the results."""
    t0, (rank, world) = time.time(), runs.rank_world()
    # the parents: the shipped ones, or built once under the out-dir (another tokenizer)
    student = stage1(args, seeds[0], "").init
    for parent in runs.pipeline(runs.get_args([], **args.stage_flags, method="kd", init=student))[:-1]:
        train_locked(parent, tokenizer, splits, role=runs.ROLES["teacher" if parent.out == args.teacher else parent.method])
    winners = dict(UNTUNED) if args.no_tune else args.winners or tune(args, tokenizer, splits)
    if world > 1:  # rank 0 measured the tuning: every rank trains the winners
        shared = [winners]
        torch.distributed.broadcast_object_list(shared, 0)
        winners = shared[0]
    lines = {}  # (name, seed) -> the table line of that model
    for seed in seeds:
        seed_runs = study_runs(args, seed, winners)
        path = study_dir(args) / f"seed{seed}" / "lines.json"
        saved, kept = kept_lines(args, seed, path, winners, seed_runs)
        lines.update({(name, seed): line for name, line in kept.items()})
        todo = [(name, r) for name, r in seed_runs if name not in kept]
        if not todo and {"teacher", "ce"} <= set(kept):
            print(f"\n== study, seed {seed}: the figures of {path}, measured with these settings ==")
            continue
        for name, r in seed_runs:
            if name not in kept or (name == "kd" and todo):  # stage-1 KD: the start of what is trained
                print(f"\n== study, seed {seed}: {name} ==")
                train_locked(r, tokenizer, splits)
        if rank > 0:  # rank 0 measures and writes
            continue
        # sampled with the seed of the runs (the teacher and the no-KD student too: their rows show
        # the sampling noise alone)
        todo = [(name, argparse.Namespace(out=out)) for name, out in (("teacher", args.teacher), ("ce", student))
                if name not in kept] + todo
        measured = table([r.out for _, r in todo], tokenizer, *splits["test"][:2],
                         argparse.Namespace(**{**vars(args), "seed": seed, "by_row": True}))
        spec = speculative(args, tokenizer, [(n, r) for n, r in todo if n != "teacher"], seed)
        for name, r in todo:
            lines[(name, seed)] = saved["lines"][name] = {**measured[r.out], **spec.get(name, {})}
            saved["flags"][name] = row_flags(args, winners).get(name, [])
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(saved, indent=1)))
    if rank > 0:
        return None
    retime(args, lines, student, tokenizer)
    results = summarise(lines, seeds, args, winners)
    results["wall_time_this_call"] = time.time() - t0
    out = study_dir(args)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    markdown = results_markdown(results)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(markdown))
    rows = {r["name"]: r for r in results["rows"] if r["name"] in PLOTTED}
    cfg_plot({n: {float(s): m["mean"] for s, m in r["fid_by_cfg"].items()} for n, r in rows.items()},
             out / "fid_vs_cfg.png", {n: {float(s): m["std"] for s, m in r["fid_by_cfg"].items()} for n, r in rows.items()},
             title=f"FID-cls against CFG, mean and std over seeds {','.join(map(str, seeds))}")
    first = study_runs(args, seeds[0], winners)  # the comparison image: the first seed's models
    if all(Path(r.out).exists() for _, r in first):
        at = args.plan["compare_cfg"]
        shown = [(args.teacher, "teacher", SPEC_CFG), (student, "ce", SPEC_CFG)] + [(student, "ce", at)] * (at != SPEC_CFG)
        compare_image(shown + [(r.out, n, at) for n, r in first], tokenizer, out / "compare.png", args.device, args.decode)
    print("\n" + markdown + f"\nwrote {out}/results.md, results.json, fid_vs_cfg.png, compare.png")
    return results


def retime(args, lines, student, tokenizer):
    """Every line's img/s from one timing for the whole report. The speed is the architecture's and
    the scale's (one pass per code, two when guided), never the weights'; the lines' own timings were
    taken in other calls under other loads (a study continued across sessions, tests beside it), so a
    spread between the seeds of one architecture would be the machine's, not the model's."""
    grid, fp = tokenizer.cfg.grid_size, tokenizer.fingerprint
    configs = {"teacher": load_checkpoint(args.teacher, args.teacher_preset, grid, fp).config,
               "student": load_checkpoint(student, None, grid, fp).config}  # every other row is the student's shape
    speed = sampling_speed(configs, args.eval_cfg, SPEED_BATCHES, args.device, args.decode)
    for (name, _), line in lines.items():
        arch = "teacher" if name == "teacher" else "student"
        for scale, figures in line["cfg"].items():
            figures.update({f"img_s_{b}": speed[arch, float(scale), b] for b in SPEED_BATCHES})


def seed_settings(args, seed):
    """What every figure of a seed depends on besides the code and its row's flags."""
    return {"seed": seed, "plan": args.plan["dir"], "grid": args.grid, "kd_iters": args.kd_iters,
            "study_iters": args.study_iters, "eval_samples": args.eval_samples, "eval_cfg": args.eval_cfg,
            "teacher": shipped_name(args.teacher)}


def shipped_name(path):
    """A path as lines.json records it: a shipped file by its place in the repository, so that a clone
    anywhere reads the same settings; any other as given."""
    path = Path(path).resolve()
    return str(path.relative_to(WEIGHTS.parent)) if path.is_relative_to(WEIGHTS.resolve()) else str(path)


def row_flags(args, winners):
    """{row name: the flags it trains with} for every row of the plan: its method's tuned setting, then its own."""
    return {name: [*winners.get(method, []), *flags] for name, method, flags, _ in args.plan["rows"]}


def read_lines(path, settings):
    """A lines.json: {"settings", "lines": {name: table line}, "flags": {name: flags}}, or an empty one
    when there is none; one written with other settings is refused."""
    if not path.exists():
        return {"settings": settings, "lines": {}, "flags": {}}
    saved = json.loads(path.read_text())
    old = saved.get("settings")
    if old != settings:
        raise SystemExit(f"{path} was measured with other settings ({old}) than these ({settings}): delete it to "
                         f"measure again, or pass the settings it names")
    return {"settings": settings, "lines": saved["lines"], "flags": saved.get("flags", {})}


def kept_lines(args, seed, path, winners, seed_runs):
    """A seed measured on another machine or in an earlier checkout: out/study/seed<s>/lines.json (its
    table lines, written each time models of the seed are measured) stands for the checkpoints that
    are absent, row by row, where the row was trained with the same flags; a row whose checkpoint is
    here is measured from it. Returns (the file's content to add to, {name: kept line})."""
    saved = read_lines(path, json.loads(json.dumps(seed_settings(args, seed))))
    flags = {"teacher": [], "ce": [], "kd": [], **json.loads(json.dumps(row_flags(args, winners)))}
    here = {name for name, r in seed_runs if Path(r.out).exists()}
    kept = {name: line for name, line in saved["lines"].items()
            if name not in here and saved["flags"].get(name, []) == flags.get(name)
            and name in {"teacher", "ce"} | {n for n, _ in seed_runs}}
    for line in kept.values():
        line["cfg"] = {float(s): f for s, f in line.get("cfg", {}).items()}
    return saved, kept


def winner_list(text, plan):
    """--winners: method=candidate pairs from an earlier tuning (tuning.md names them), e.g.
    kd=lr1e-3,onpolicy=lr3e-4_prefix-kd: ({method: flags}, None), or (None, the problem)."""
    winners = {}
    for pair in text.split(","):
        method, _, cand = pair.partition("=")
        if method not in plan["tuned"] or cand not in candidates(method, plan):
            grids = "; ".join(f"{m}: {', '.join(candidates(m, plan))}" for m in plan["tuned"])
            return None, f"--winners {pair!r}: give method=setting pairs from the tuning's grid ({grids})"
        winners[method] = candidates(method, plan)[cand]
    return winners, None


def speculative(args, tokenizer, seed_runs, seed, gamma=4):
    """The DRAFTS of a seed drafting for the teacher: acceptance, codes per teacher call, speed-up and
    draft cost at one image per call, on eval_samples / 100 images (at least one per class). Kept in
    seed<s>/speculative.json and measured again only for a checkpoint (or teacher) that changed."""
    path = study_dir(args) / f"seed{seed}" / "speculative.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    drafts = [(name, r) for name, r in seed_runs if name in DRAFTS]
    stamp = {name: [os.stat(r.out).st_mtime_ns, os.stat(args.teacher).st_mtime_ns] for name, r in drafts}
    todo = {name: r.out for name, r in drafts if saved.get(name, {}).get("stamp") != stamp[name]}
    if todo:
        load = lambda p: compile_decode(load_checkpoint(p, tokenizer=tokenizer.fingerprint).to(args.device), args.decode)  # noqa: E731
        teacher = load(args.teacher)
        classes = teacher.config.num_classes
        labels = torch.arange(max(args.eval_samples // 100, classes), device=args.device) % classes
        print(f"speculative sampling, {len(labels)} images one at a time: {', '.join(todo)} drafting for the teacher")
        figures = speculative_speed(teacher, {n: load(p) for n, p in todo.items()}, labels, gamma, seed=seed, cfg_scale=SPEC_CFG)
        saved |= {n: {"stamp": stamp[n], **{f"spec_{k}": v for k, v in figures[n].items() if k != "seconds"}}
                  for n in todo}
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(saved, indent=2)))
    return {name: {k: v for k, v in saved[name].items() if k != "stamp"} for name, _ in drafts}


def mean_std(values):
    values = np.asarray(values, float)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "values": values.tolist()}


def summarise(lines, seeds, args, winners):
    """Per row: FID-cls at every scale of the grid (mean +- std over seeds), its best scale (lowest
    mean), every figure at that scale; gap closure per seed against that seed's no-KD student and
    teacher, each at its own best scale; whether the row's FID-cls beats the plan's control (kd
    continued, or ce continued: the same number of steps) by more than the larger of the two spreads;
    the KL to the teacher and the NLL per grid row beside its starting point's."""
    plan = args.plan
    parents = [(n, what) for n, what in STAGE1 if n == "ce" or plan["start"] == "kd"]
    info = {"teacher": ("teacher", "ce", [])} | {n: (what, n, []) for n, what in parents}
    info |= {n: (what, method, [*winners.get(method, []), *flags]) for n, method, flags, what in plan["rows"]
             if n in args.rows}
    rows = []
    for name, (what, method, flags) in info.items():
        at = lambda s: [lines[(name, seed)]["cfg"][s] for seed in seeds]
        row = {"name": name, "what": what, "method": method, "flags": flags, "seeds": seeds,
               "steps": lines[(name, seeds[0])]["steps"], "fid_by_cfg": {}}
        if args.eval_samples > 0:
            row["fid_by_cfg"] = {str(s): mean_std([f["FID-cls"] for f in at(s)]) for s in args.eval_cfg}
            row["best_cfg"] = min(args.eval_cfg, key=lambda s: row["fid_by_cfg"][str(s)]["mean"])
        for key, _, _ in FIGURES + SPECULATIVE:
            source = ([lines[(name, s)] for s in seeds] if key in HELD_OUT or key.startswith("spec_") or "best_cfg" not in row
                      else at(row["best_cfg"]))
            values = [line.get(key, 0.0 if key == "teacher_seqs" else None) for line in source]
            if None not in values:
                row[key] = mean_std(values)
        if args.eval_samples > 0 and 1.0 in args.eval_cfg:  # the guidance-free sampler's cost
            row["cost_cfg1"] = {k: mean_std([f[k] for f in at(1.0)]) for k in ("img_s_64", "img_s_1")
                                if all(k in f for f in at(1.0))}
        for key in ("test_kl_rows", "test_nll_rows"):
            if all(key in lines[(name, s)] for s in seeds):
                row[key] = np.mean([lines[(name, s)][key] for s in seeds], 0).tolist()
        rows.append(row)
    by_name = {r["name"]: r for r in rows}
    if "best_cfg" in by_name["ce"]:
        best = lambda n, s: lines[(n, s)]["cfg"][by_name[n]["best_cfg"]]["FID-cls"]
        for r in rows[2:]:  # after the teacher and the no-KD student
            r["gap_closure"] = mean_std([(best("ce", s) - best(r["name"], s)) / (best("ce", s) - best("teacher", s))
                                         for s in seeds])
    if "FID-cls" in by_name.get(plan["control"], {}):
        base = by_name[plan["control"]]["FID-cls"]
        for r in rows[1 + len(parents):]:
            if r["name"] != plan["control"]:
                m = r["FID-cls"]
                r["beats_control"] = base["mean"] - m["mean"] > max(base["std"], m["std"])
    rows_flag = "" if len(args.rows) == len(plan["rows"]) else f" --rows {','.join(args.rows)}"
    rows_flag = (" --guidance-free" if plan["dir"] == "study_gf" else "") + rows_flag
    grid_flag = "" if args.grid == 7 else f" --grid {args.grid}"
    return {"command": f"python study.py{grid_flag} --seeds {','.join(map(str, args.seeds))} --kd-iters {args.kd_iters} "
                       f"--study-iters {args.study_iters}{' --no-tune' if args.no_tune else ''}{rows_flag}",
            "ce_iters": lines[("ce", seeds[0])]["steps"], "kd_iters": args.kd_iters, "study_iters": args.study_iters,
            "eval_samples": args.eval_samples, "eval_cfg": args.eval_cfg, "winners": winners, "rows": rows,
            "start": plan["start"], "control": plan["control"],
            "wall_time_training": sum(line.get("wall_time", 0.0) for line in lines.values()),
            "wall_time_evaluation": sum(f.get("eval_time", 0.0) for line in lines.values()
                                        for f in line.get("cfg", {}).values())}


def results_markdown(results):
    def cell(m, digits, scale=1):
        text = f"{m['mean'] * scale:.{digits}f}"
        return text + (f" ± {m['std'] * scale:.{digits}f}" if len(set(m["values"])) > 1 else "")
    rows, scales = results["rows"], results["eval_cfg"]
    label = lambda r: r["name"] if r["what"] == r["name"] else f"{r['name']} ({r['what']})"
    control = results["control"]
    head = ["model", "steps", "best CFG"] + [label for _, label, _ in FIGURES] + ["gap closed", f"beats {control}"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        beats = {True: "yes", False: "no"}.get(r.get("beats_control"), "")
        cells = [label(r), str(r["steps"]), f"{r['best_cfg']:g}" if "best_cfg" in r else "-"]
        cells += [cell(r[key], d, {"wall_time": 1 / 60, "teacher_seqs": 1e-3}.get(key, 1)) if key in r else "-"
                  for key, _, d in FIGURES]
        out.append("| " + " | ".join(cells + [cell(r["gap_closure"], 2) if "gap_closure" in r else "-", beats]) + " |")
    n = len(rows[0]["seeds"])
    tuned = "; ".join(f"{m}: {' '.join(f)}" for m, f in results["winners"].items()) or "none (--no-tune: the defaults)"
    start = (f"stage 1: {results['kd_iters']} steps of kd from it; every other student starts from kd"
             if results["start"] == "kd" else "every other student starts from it")
    out.append(f"\nMean ± std over {n} seed{'s' * (n > 1)} ({', '.join(map(str, rows[0]['seeds']))}), each model at its "
               f"best guidance scale of {', '.join(f'{s:g}' for s in scales)} (the lowest mean FID-cls). The no-KD student "
               f"(ce, one for every seed): {results['ce_iters']} steps; {start} and trains {results['study_iters']} "
               f"more steps, with its method's tuned setting ({tuned}). The -cls figures: {results['eval_samples']} samples per scale "
               f"against the test split (the teacher is sampled once per seed); NLL and KL(teacher || model) in nats "
               f"per code on the test split; teacher seqs: sequences the teacher scored or sampled, in thousands (a "
               f"CFG sample counts twice); gap closed = (FID_ce - FID_m) / (FID_ce - FID_teacher) per seed, each at its "
               f"best scale; beats {control}: mean FID-cls lower than {control} by more than the larger std; img/s: "
               f"images sampled per second at 64 and at 1 per call (guidance doubles each call), timed once for the "
               f"whole table when it is written (a figure without a spread: the same for every seed).")
    if scales and "fid_by_cfg" in rows[0] and rows[0]["fid_by_cfg"]:
        out += ["", "| model | " + " | ".join(f"FID-cls at CFG {s:g}" for s in scales) + " |", "|---|" + "---:|" * len(scales)]
        for r in rows:
            out.append(f"| {r['name']} | " + " | ".join(cell(r["fid_by_cfg"][str(s)], 2) for s in scales) + " |")
    if "1.0" in rows[0]["fid_by_cfg"] and any("img_s_64" in r for r in rows):  # the sampling cost beside the quality
        out += ["", "| model | FID-cls at CFG 1 | img/s 64 | img/s 1 | best CFG | FID-cls at best | img/s 64 | img/s 1 |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            one, best = r.get("cost_cfg1", {}), r
            out.append(f"| {r['name']} | {cell(r['fid_by_cfg']['1.0'], 2)} | " + " | ".join(
                cell(one[k], d) if k in one else "-" for k, d in (("img_s_64", 0), ("img_s_1", 1))) +
                f" | {r['best_cfg']:g} | {cell(best['FID-cls'], 2)} | " + " | ".join(
                cell(best[k], d) if k in best else "-" for k, d in (("img_s_64", 0), ("img_s_1", 1))) + " |")
        out.append("\nThe sampling cost: each model without guidance (one pass per code) and at its best scale "
                   "(two passes when guided); img/s timed once for the whole table, one process, one decode mode, "
                   "one model per architecture (the weights do not change the work of a decode).")
    start = {"kd": "ce", "ce": None, "teacher": None}  # the rest start from results["start"]
    by_name = {r["name"]: r for r in rows}
    if "test_kl_rows" in rows[0]:
        grid = len(rows[0]["test_kl_rows"])
        out += ["", "| model (from) | " + " | ".join(f"row {i}" for i in range(grid)) + " |", "|---|" + "---:|" * grid]
        for r in rows:
            origin = by_name.get(start.get(r["name"], results["start"]))
            if origin is None or "test_kl_rows" not in r:
                out.append(f"| {r['name']} | " + " | ".join(f"{v:.3f}" for v in r.get("test_kl_rows", [])) + " |")
                continue
            out.append(f"| {r['name']} ({origin['name']}) | " + " | ".join(
                f"{v:.3f} ({v - o:+.3f})" for v, o in zip(r["test_kl_rows"], origin["test_kl_rows"])) + " |")
        out.append("\nThe drift: KL(teacher || model) on the test split's data contexts per row of the code grid, top to "
                   "bottom, nats per code (mean over seeds), and in brackets its change from the model it started from.")
    head = ["draft for the teacher"] + [label for _, label, _ in SPECULATIVE]
    out += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "spec_acceptance" in r:
            out.append("| " + " | ".join([r["name"]] + [cell(r[key], d) for key, _, d in SPECULATIVE]) + " |")
    out.append(f"\nSpeculative sampling (sample.py), the teacher as target, each model as its draft, gamma 4, CFG "
               f"{SPEC_CFG:g}, one image per call: drafts accepted / drafts tested; codes per teacher call "
               f"(1.00 without a draft); speed-up: teacher alone / speculative, wall clock, same images and seeds; "
               f"draft cost per call: the draft's sampling time over the teacher's.")
    return "\n".join(out) + "\n"


@torch.no_grad()
def compare_image(shown, tokenizer, path, device, decode="eager", per_class=2, seed=1234, scale=2):
    """One row per (checkpoint, name, guidance scale) of `shown`, `per_class` samples per class in class
    order, the same sampling seed for every row: the differences between methods at a glance."""
    rows, names = [], []
    for ckpt, name, cfg_scale in shown:
        model = compile_decode(load_checkpoint(ckpt, tokenizer=tokenizer.fingerprint).to(device).eval(), decode)
        classes = model.config.num_classes
        images, _ = draw(model, tokenizer, per_class * classes, cfg_scale, seed=seed)  # labels cycle the classes
        rows.append(images)  # (per_class * classes, H, W, C), image i of class i % classes
        names.append(f"{name} @{cfg_scale:g}")
    (h, w, channels), gap, label_w, head_h = rows[0].shape[1:], 4, 100, 14
    cell = per_class * w * scale + gap  # one class: its samples side by side, then a gap
    canvas = Image.new("L" if channels == 1 else "RGB", (label_w + classes * cell, head_h + len(rows) * (h * scale + gap)), 255)
    pen = ImageDraw.Draw(canvas)
    for c in range(classes):
        pen.text((label_w + c * cell, 1), (CLASSES[c] if classes == len(CLASSES) else str(c))[:11], fill=0)
    for r, (images, name) in enumerate(zip(rows, names)):
        y = head_h + r * (h * scale + gap)
        pen.text((4, y + h * scale // 2 - 6), name, fill=0)
        for i, image in enumerate(images):
            tile = Image.fromarray(image[..., 0] if channels == 1 else image).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile.convert(canvas.mode), (label_w + (i % classes) * cell + (i // classes) * w * scale, y))
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def main(argv=None):
    p = runs.parser(__doc__, METHODS, eval_cfg="1,1.5,2,3")  # the study's guidance grid, fixed before its runs
    p.add_argument("--seeds", type=int_list, default="0,1,2", help="comma-separated seeds >= 0, one set of runs "
                   "each (default: 0,1,2)")
    p.add_argument("--kd-iters", type=positive_int, default=400, help="stage-1 KD steps from the no-KD student, "
                   ">= 1 (default: 400)")
    p.add_argument("--study-iters", type=positive_int, default=400, help="stage-2 steps of every row from the "
                   "stage-1 KD checkpoint, >= 1 (default: 400)")
    p.add_argument("--guidance-free", action="store_true", help="the guidance-free study instead: every method "
                   "taught the guided teacher (--teacher-cfg tuned), CCA beside them, from the no-KD student, tuned "
                   "at CFG 1, under <out-dir>/study_gf/ (default: the paper's study)")
    p.add_argument("--rows", help="comma-separated rows to run, e.g. kd_cont,varkd for a quick look at a long horizon "
                   f"(default: all: {','.join(name for name, *_ in ROWS)}; with --guidance-free: "
                   f"{','.join(name for name, *_ in GF_ROWS)})")
    p.add_argument("--tune-seed", type=seed_int, default=100, help="the validation seed of the tuning, training and "
                   "sampling, never reported, >= 0 (default: 100)")
    p.add_argument("--no-tune", action="store_true", help="no tuning: every method with its defaults (a quick look)")
    p.add_argument("--winners", help="no tuning: each method's setting chosen by an earlier one, "
                   "method=setting pairs as its tuning.md names them, every tuned method of the rows (default: tune)")
    args = runs.get_args(argv, p)
    args.plan = PLANS["guidance-free" if args.guidance_free else "paper"]
    args.rows, problem = row_list(args.rows, args.plan["rows"]) if args.rows else ([n for n, *_ in args.plan["rows"]], None)
    if args.winners and not problem:
        args.winners, problem = winner_list(args.winners, args.plan)
    if problem:
        p.error(problem)
    if args.tune_seed in args.seeds and not args.no_tune:
        p.error(f"--seeds {','.join(map(str, args.seeds))} holds the validation seed {args.tune_seed}, which is never "
                f"reported: pass other seeds, or another --tune-seed")
    if args.winners is not None:
        needed = {method for name, method, *_ in args.plan["rows"] if name in args.rows and method in args.plan["tuned"]}
        if needed - set(args.winners):
            p.error(f"--winners names no setting for {', '.join(sorted(needed - set(args.winners)))}: give every "
                    f"tuned method of the rows, or drop --winners to tune")
    seeds = args.seeds
    rank, _ = runs.setup_ddp(args)
    torch.manual_seed(args.seed + rank)
    tokenizer, splits = runs.load_data(args)
    results = run(args, tokenizer, splits, seeds)
    runs.teardown_ddp()
    return results


if __name__ == "__main__":
    main()
