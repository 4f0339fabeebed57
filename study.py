"""The reproduction study: every method, the paper's VarKD ablation and two controls, over seeds.

    python study.py --seeds 0,1,2              # the README's study, on the shipped parents
    python study.py --seeds 0 --study-iters 200
    python study.py --grid 14 --seeds 0 --rows kd_cont,varkd   # the long horizon: a few rows, one seed

The shipped tokenizer, teacher and no-KD student (weights/) serve every seed (with --tokenizer of
your own, they are built once under the out-dir). Per seed, under out/study/seed<s>/: stage-1 KD
from the no-KD student (--kd-iters steps), then from the KD checkpoint --study-iters more steps of
each row below (the paper's setting: stage 2 starts from stage-1 KD). A killed study is run again
with the same command: finished runs are reused, the unfinished one continues from its last
checkpoint, measured models are not measured again.

Writes out/study/results.md and results.json (mean +- std over seeds of every figure, gap closure,
whether a row beats kd continued by more than the spread, and each student as the draft of
speculative sampling for the teacher: acceptance, codes per teacher call, speed-up) and
out/study/compare.png (one row per model, one column per class, the same sampling seed for every row).
"""
import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import runs
from checks import int_list, positive_int
from data import CLASSES, atomic_write
from distill import train
from evaluate import draw, table
from model import compile_decode, load_checkpoint
from sample import speculative_speed

# name, method, flags, what it is, the paper's ImageNet FID (LlamaGen-L -> B; Table 1 and Table 2)
ROWS = [
    ("kd_cont", "kd", [], "kd continued (control)", None),
    ("ce_cont", "ce", ["--lr", "1e-3"], "ce continued, no teacher (control)", None),
    ("seqkd", "seqkd", [], "SeqKD: teacher samples", 5.08),
    ("onpolicy", "onpolicy", [], "GKD: mixed prefixes, lambda 0.1, JSD 0.5", 4.94),
    ("varkd_rkl", "varkd", ["--no-entropy-weights", "--no-truncation", "--no-groups", "--no-parallel"],
     "mixed rollouts, reverse KL only", None),
    ("varkd_rkl_all", "varkd", ["--no-entropy-weights", "--no-truncation", "--no-groups", "--no-parallel",
                                "--supervise", "all"], "the same on the real prefix too", None),
    ("varkd_entropy", "varkd", ["--no-groups", "--no-parallel"], "+ entropy weights, truncation", 4.66),
    ("varkd_groups", "varkd", ["--no-parallel"], "+ codebook relaxation", 4.60),
    ("varkd", "varkd", [], "+ parallel rollouts = VarKD", 4.58),
    ("varkd_all", "varkd", ["--supervise", "all"], "VarKD on the real prefix too", None),
    ("varkd_lam0.5", "varkd", ["--lam", "0.5"], "VarKD, rollouts on half the steps", None),
    ("varkd_lam0.1", "varkd", ["--lam", "0.1"], "VarKD, rollouts on a tenth of the steps (GKD's)", None),
]
STAGE1 = [("ce", "no-KD student", 6.51), ("kd", "stage-1 KD", 4.92)]
FIGURES = [("FID-cls", "FID-cls", 2), ("KID-cls", "KID-cls", 2), ("precision-cls", "prec", 3),
           ("recall-cls", "recall", 3), ("IS-cls", "IS-cls", 2), ("class_acc-cls", "acc", 3),
           ("test_nll", "NLL", 3), ("test_kl", "KL to teacher", 3), ("wall_time", "train min", 1),
           ("teacher_seqs", "teacher seqs (k)", 1)]
# the students that draft for the teacher (sample.speculative_speed): one image per call, gamma 4
DRAFTS = ("ce", "kd", "kd_cont", "seqkd", "onpolicy", "varkd")
SPECULATIVE = [("spec_acceptance", "drafts accepted", 3), ("spec_codes_per_call", "codes per teacher call", 2),
               ("spec_speed_up", "speed-up", 2), ("spec_draft_cost", "draft cost per call", 2)]


def row_list(text):
    """--rows: comma-separated names from ROWS, kept in ROWS' order."""
    names, known = {n.strip() for n in text.split(",") if n.strip()}, [name for name, *_ in ROWS]
    if not names or names - set(known):
        raise argparse.ArgumentTypeError(f"unknown row(s) {', '.join(sorted(names - set(known))) or '(none given)'}: "
                                         f"give comma-separated names from {', '.join(known)}")
    return [n for n in known if n in names]


def study_runs(args, seed):
    """The runs of one seed, parents first: [(name, run args)]. Stage-1 KD starts from the one no-KD
    student (the shipped one, or <out-dir>/ce/ckpt.pt with another tokenizer) with the seed's data
    order; every row starts from that seed's stage-1 KD."""
    base = f"{args.out_dir}/study/seed{seed}"
    shared = {**args.shared, "seed": seed, "resume": True}
    kd = runs.get_args([], **{**shared, "max_iters": args.kd_iters}, method="kd", out=f"{base}/kd/ckpt.pt")
    stage2 = {**shared, "max_iters": args.study_iters, "init": kd.out}
    return [("kd", kd)] + [(name, runs.get_args(["--method", method, *flags], **stage2, out=f"{base}/{name}/ckpt.pt"))
                           for name, method, flags, _, _ in ROWS if name in args.rows]


def run(args, tokenizer, splits, seeds):
    """Train what is missing, measure what is unmeasured, then write the results."""
    t0, (rank, _) = time.time(), runs.rank_world()
    # the parents: the shipped ones, or built once under the out-dir (another tokenizer)
    student = study_runs(args, seeds[0])[0][1].init
    for parent in runs.pipeline(runs.get_args([], **args.shared, method="kd", init=student))[:-1]:
        train(parent, tokenizer, splits, role=runs.ROLES["teacher" if parent.out == args.teacher else parent.method])
    lines = {}  # (name, seed) -> the table line of that model
    for seed in seeds:
        seed_runs = study_runs(args, seed)
        for name, r in seed_runs:
            print(f"\n== study, seed {seed}: {name} ==")
            train(r, tokenizer, splits)
        if rank > 0:  # rank 0 measures and writes
            continue
        # sampled with the seed of the runs (the teacher and the no-KD student too: their rows show
        # the sampling noise alone)
        measured = table([args.teacher, student] + [r.out for _, r in seed_runs], tokenizer, *splits["test"][:2],
                         argparse.Namespace(**{**vars(args), "seed": seed}))
        lines[("teacher", seed)] = measured[args.teacher]
        seed_runs = [("ce", argparse.Namespace(out=student))] + seed_runs
        spec = speculative(args, tokenizer, seed_runs, seed)
        lines.update({(name, seed): {**measured[r.out], **spec.get(name, {})} for name, r in seed_runs})
    if rank > 0:
        return None
    results = summarise(lines, seeds, args)
    results["wall_time_this_call"] = time.time() - t0
    out = Path(args.out_dir) / "study"
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    markdown = results_markdown(results)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(markdown))
    first = study_runs(args, seeds[0])  # the comparison image: the first seed's models
    compare_image([args.teacher, student] + [r.out for _, r in first], ["teacher", "ce"] + [n for n, _ in first], tokenizer,
                  out / "compare.png", args.eval_cfg, args.device)
    print("\n" + markdown + f"\nwrote {out}/results.md, results.json, compare.png")
    return results


def speculative(args, tokenizer, seed_runs, seed, gamma=4):
    """The DRAFTS of a seed drafting for the teacher: acceptance, codes per teacher call, speed-up and
    draft cost at one image per call, on eval_samples / 100 images (at least one per class). Kept in
    seed<s>/speculative.json and measured again only for a checkpoint (or teacher) that changed."""
    path = Path(args.out_dir) / "study" / f"seed{seed}" / "speculative.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    drafts = [(name, r) for name, r in seed_runs if name in DRAFTS]
    stamp = {name: [os.stat(r.out).st_mtime_ns, os.stat(args.teacher).st_mtime_ns] for name, r in drafts}
    todo = {name: r.out for name, r in drafts if saved.get(name, {}).get("stamp") != stamp[name]}
    if todo:
        teacher = load_checkpoint(args.teacher, tokenizer=tokenizer.fingerprint).to(args.device)
        classes = teacher.config.num_classes
        labels = torch.arange(max(args.eval_samples // 100, classes), device=args.device) % classes
        print(f"speculative sampling, {len(labels)} images one at a time: {', '.join(todo)} drafting for the teacher")
        figures = speculative_speed(teacher, {n: load_checkpoint(p, tokenizer=tokenizer.fingerprint).to(args.device) for n, p in todo.items()},
                                    labels, gamma, seed=seed, cfg_scale=args.eval_cfg)
        saved |= {n: {"stamp": stamp[n], **{f"spec_{k}": v for k, v in figures[n].items() if k != "seconds"}}
                  for n in todo}
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(saved, indent=2)))
    return {name: {k: v for k, v in saved[name].items() if k != "stamp"} for name, _ in drafts}


def mean_std(values):
    values = np.asarray(values, float)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "values": values.tolist()}


def summarise(lines, seeds, args):
    """Per row: mean +- std over seeds of every figure; gap closure per seed against that seed's
    no-KD student and the teacher sampled with the same seed; whether the row's FID-cls beats kd
    continued (same number of steps) by more than the larger of the two spreads."""
    info = {"teacher": ("teacher", None, "ce", [])} | {n: (what, fid, "ce" if n == "ce" else "kd", [])
                                                       for n, what, fid in STAGE1}
    info |= {n: (what, fid, method, flags) for n, method, flags, what, fid in ROWS if n in args.rows}
    fid = {key: line.get("FID-cls") for key, line in lines.items()}
    rows = []
    for name, (what, paper, method, flags) in info.items():
        row = {"name": name, "what": what, "method": method, "flags": flags, "paper_fid": paper, "seeds": seeds,
               "steps": lines[(name, seeds[0])]["steps"]}
        for key, _, _ in FIGURES + SPECULATIVE:
            values = [lines[(name, s)].get(key, 0.0 if key == "teacher_seqs" else None) for s in seeds]
            if None not in values:
                row[key] = mean_std(values)
        if None not in fid.values() and name not in ("teacher", "ce"):
            row["gap_closure"] = mean_std([(fid[("ce", s)] - fid[(name, s)]) / (fid[("ce", s)] - fid[("teacher", s)])
                                           for s in seeds])
        rows.append(row)
    by_name = {r["name"]: r for r in rows}
    if "FID-cls" in by_name.get("kd_cont", {}):
        base = by_name["kd_cont"]["FID-cls"]
        for r in rows[3:]:
            if r["name"] != "kd_cont":
                m = r["FID-cls"]
                r["beats_kd_cont"] = base["mean"] - m["mean"] > max(base["std"], m["std"])
    rows_flag = "" if len(args.rows) == len(ROWS) else f" --rows {','.join(args.rows)}"
    grid_flag = "" if args.grid == 7 else f" --grid {args.grid}"
    return {"command": f"python study.py{grid_flag} --seeds {','.join(map(str, args.seeds))} --kd-iters {args.kd_iters} "
                       f"--study-iters {args.study_iters}{rows_flag}",
            "ce_iters": lines[("ce", seeds[0])]["steps"], "kd_iters": args.kd_iters, "study_iters": args.study_iters,
            "eval_samples": args.eval_samples, "eval_cfg": args.eval_cfg, "rows": rows,
            "wall_time_training": sum(line.get("wall_time", 0.0) for line in lines.values()),
            "wall_time_evaluation": sum(line.get("eval_time", 0.0) for line in lines.values())}


def results_markdown(results):
    def cell(row, key, digits):
        if key not in row:
            return "-"
        m, scale = row[key], {"wall_time": 1 / 60, "teacher_seqs": 1e-3}.get(key, 1)
        text = f"{m['mean'] * scale:.{digits}f}"
        return text + (f" ± {m['std'] * scale:.{digits}f}" if len(m["values"]) > 1 else "")
    head = ["model", "steps", "paper FID"] + [label for _, label, _ in FIGURES] + ["gap closed", "beats kd_cont"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        beats = {True: "yes", False: "no"}.get(r.get("beats_kd_cont"), "")
        paper = "" if r["paper_fid"] is None else f"{r['paper_fid']:.2f}"
        cells = [r["name"] if r["what"] == r["name"] else f"{r['name']} ({r['what']})", str(r["steps"]), paper]
        cells += [cell(r, key, digits) for key, _, digits in FIGURES] + [cell(r, "gap_closure", 2), beats]
        out.append("| " + " | ".join(cells) + " |")
    n = len(results["rows"][0]["seeds"])
    out.append(f"\nMean ± std over {n} seed{'s' * (n > 1)} ({', '.join(map(str, results['rows'][0]['seeds']))}). "
               f"The no-KD student (ce, one for every seed): {results['ce_iters']} steps; stage 1: {results['kd_iters']} "
               f"steps of kd from it; every other student starts from kd and trains {results['study_iters']} more "
               f"steps. The -cls figures: "
               f"{results['eval_samples']} samples at CFG {results['eval_cfg']} against the test split (the teacher "
               f"is sampled once per seed); NLL and KL(teacher || model) in nats per code on the test split; teacher "
               f"seqs: sequences the teacher scored or sampled, in thousands (a CFG sample counts twice); gap closed "
               f"= (FID_ce - FID_m) / (FID_ce - FID_teacher) per seed; beats kd_cont: mean FID-cls lower than kd "
               f"continued by more than the larger std. Paper FID: ImageNet 256, LlamaGen-L -> B, Inception features.")
    head = ["draft for the teacher"] + [label for _, label, _ in SPECULATIVE]
    out += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        if "spec_acceptance" in r:
            out.append("| " + " | ".join([r["name"]] + [cell(r, key, digits) for key, _, digits in SPECULATIVE]) + " |")
    out.append(f"\nSpeculative sampling (sample.py), the teacher as target, each model as its draft, gamma 4, CFG "
               f"{results['eval_cfg']}, one image per call: drafts accepted / drafts tested; codes per teacher call "
               f"(1.00 without a draft); speed-up: teacher alone / speculative, wall clock, same images and seeds; "
               f"draft cost per call: the draft's sampling time over the teacher's.")
    return "\n".join(out) + "\n"


@torch.no_grad()
def compare_image(paths, names, tokenizer, path, cfg_scale, device, per_class=2, seed=1234, scale=2):
    """One row per model, `per_class` samples per class in class order, the same sampling seed for
    every row: the differences between methods at a glance."""
    rows = []
    for ckpt in paths:
        model = load_checkpoint(ckpt, tokenizer=tokenizer.fingerprint).to(device).eval()
        classes = model.config.num_classes
        images, _ = draw(model, tokenizer, per_class * classes, cfg_scale, seed=seed)  # labels cycle the classes
        rows.append(images)  # (per_class * classes, H, W, C), image i of class i % classes
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
    p = runs.parser(__doc__)
    p.add_argument("--seeds", type=int_list, default="0,1,2", help="comma-separated seeds >= 0, one set of runs "
                   "each (default: 0,1,2)")
    p.add_argument("--kd-iters", type=positive_int, default=400, help="stage-1 KD steps from the no-KD student, "
                   ">= 1 (default: 400)")
    p.add_argument("--study-iters", type=positive_int, default=400, help="stage-2 steps of every row from the "
                   "stage-1 KD checkpoint, >= 1 (default: 400)")
    p.add_argument("--rows", type=row_list, default=[name for name, *_ in ROWS], help="comma-separated rows to run "
                   "after stage 1, e.g. kd_cont,varkd for a quick look at a long horizon (default: all: "
                   f"{','.join(name for name, *_ in ROWS)})")
    args = runs.get_args(argv, p)
    compile_decode(args.decode, torch.device(args.device).type)
    seeds = args.seeds
    rank, _ = runs.setup_ddp(args)
    torch.manual_seed(args.seed + rank)
    tokenizer, splits = runs.load_data(args)
    results = run(args, tokenizer, splits, seeds)
    runs.teardown_ddp()
    return results


if __name__ == "__main__":
    main()
