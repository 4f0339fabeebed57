"""The paper's diagnosis as an instrument: how reliable is the teacher along the sequence, on data
contexts versus on student contexts?

    python diagnose.py                                   # shipped teacher and no-KD student
    python diagnose.py --student out/varkd/ckpt.pt --num-seqs 1000
    python diagnose.py --compare out/diagnosis.json out/grid14/diagnosis.json   # 49 and 196 codes side by side

An earlier diagnosis of the same --name is never replaced without --force.

Peruzzo et al. (2026, arXiv 2606.06078) build VarKD on the claim that "long decoding horizons and
visual token ambiguity make teacher supervision unreliable, especially under student-conditioned
contexts". This measures it. For --num-seqs test sequences, each cut at a real prefix of k codes
(k ~ U[--prefix-frac * T], as VarKD's rollouts), the same positions t >= k are scored twice: after
the real codes (data context) and after the student's own continuation (student context, a mixed
rollout at temperature 1). At every such position, from the teacher's p_T and the student's p_S:

    alpha        1 - H(p_T) / log|V|, VarKD's trust in the teacher (and the share under --threshold,
                 and where its truncation would cut each sequence)
    KL(T||S)     forward KL, what kd and seqkd minimise; KL(S||T), the reverse KL VarKD minimises
    ambiguity    H(p_T) - H(p_T summed within the codebook groups): the part of the teacher's
                 uncertainty that is only between near-duplicate codes (what the relaxation pools)
    NLL(real)    the teacher's NLL of the real code x_t: after the real prefix, and after the student's
                 continuation of it. Equal at the first sampled position (the context is all real);
                 the growth with distance is how far the teacher's idea of the image drifts when the
                 student writes the context, i.e. how much its signal there still says about the data

Reported per distance after the prefix (bands of one grid row) and per row of the code grid, in
<out-dir>/diagnosis.md and .json, with heat maps over the code grid in <out-dir>/diagnosis.png.
--compare puts diagnoses at different grids side by side, the distance after the prefix measured in
the image's height (a band of 1/7 of the image is 7 codes at 7x7 and 28 at 14x14): does the teacher's
signal on student contexts degrade faster when the same image takes 4x the codes?
"""
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import runs
from checks import check_output, output_lock, positive_int
from data import atomic_write
from distill import METHODS, group_logp, jsd, mixed_rollout
from model import compile_decode

QUANTITIES = [("alpha", "alpha"), ("low", "alpha < thr"), ("kl_ts", "KL(T||S)"), ("kl_st", "KL(S||T)"),
              ("ambiguity", "ambiguity"), ("nll_real", "teacher NLL(real)")]
CONTEXTS = ("data", "student")


def position_figures(t_logits, s_logits, real, groups, threshold):
    """Every quantity at every position: {name: (B, T)}. real (B, T): the real codes."""
    t_logp, s_logp = F.log_softmax(t_logits.float(), -1), F.log_softmax(s_logits.float(), -1)
    entropy = -(t_logp.exp() * t_logp).sum(-1)  # (B, T)
    g_logp = group_logp(t_logits.float(), groups, int(groups.max()) + 1)  # (B, T, G)
    alpha = 1 - entropy / math.log(t_logits.shape[-1])
    return {"alpha": alpha, "low": (alpha < threshold).float(), "kl_ts": jsd(s_logp, t_logp, 0),
            "kl_st": jsd(s_logp, t_logp, 1),
            # summing within groups can only lower the entropy; clamp fp noise at equality
            "ambiguity": (entropy + (g_logp.exp() * g_logp).sum(-1)).clamp_min(0),
            "nll_real": -t_logp.gather(-1, real[..., None])[..., 0]}


@torch.no_grad()
def diagnose(teacher, student, codes, labels, groups, prefix_frac=(0.25, 0.75), threshold=0.1, seed=0,
             batch_size=250):
    """The diagnosis of a teacher and a student on real sequences codes (N, T) with labels (N,).
    Returns, per context: the mean of each quantity per position (T,) and per distance after the
    prefix (T,) over the student-sampled positions (None where there is none), the truncation
    figures, and the counts. The data context's per-position means use every sequence (a real context does not
    depend on where the prefix ends)."""
    teacher.eval()
    student.eval()
    N, T = codes.shape
    position = torch.arange(T, device=codes.device)[None, :]  # (1, T)
    g = torch.Generator(codes.device).manual_seed(seed)
    zeros = lambda: torch.zeros(T, dtype=torch.float64)
    pos_sum = {c: {q: zeros() for q, _ in QUANTITIES} for c in CONTEXTS}
    dist_sum = {c: {q: zeros() for q, _ in QUANTITIES} for c in CONTEXTS}
    pos_n, dist_n, data_n = zeros(), zeros(), 0
    cut = {c: [] for c in CONTEXTS}  # per sequence: codes after the prefix where truncation cuts, or -1
    kept = {c: 0.0 for c in CONTEXTS}
    for i in tqdm(range(0, N, batch_size), desc="diagnosis", leave=False):
        x, y = codes[i:i + batch_size], labels[i:i + batch_size]
        rolled, sampled = mixed_rollout(student, x, y, prefix_frac, g)  # (B, T) each
        k = (~sampled).sum(1)  # (B,) prefix lengths
        distance = position - k[:, None]  # (B, T)
        m = sampled.double().cpu()
        pos_n += m.sum(0)
        dist_n.index_add_(0, distance[sampled].cpu(), torch.ones(int(sampled.sum()), dtype=torch.float64))
        data_n += len(x)
        for context, seq in zip(CONTEXTS, (x, rolled)):
            fig = position_figures(teacher(seq, y), student(seq, y), x, groups, threshold)
            for q, value in fig.items():
                v = value.double().cpu()
                pos_sum[context][q] += v.sum(0) if context == "data" else (v * m).sum(0)
                dist_sum[context][q].index_add_(0, distance[sampled].cpu(), v[sampled.cpu()])
            # VarKD's truncation: positions strictly after the first sampled one under the threshold
            low = (fig["alpha"] < threshold) & sampled
            first = torch.where(low.any(1), low.float().argmax(1), torch.full_like(k, T))  # (B,)
            cut[context] += torch.where(first < T, first - k, -1).tolist()
            kept[context] += float((sampled & (position <= first[:, None])).sum())
    out = {"num_seqs": N, "seq_len": T, "prefix_frac": list(prefix_frac), "threshold": threshold,
           "groups": int(groups.max()) + 1, "positions": pos_n.tolist(), "distances": dist_n.tolist()}
    means = lambda s, n: [v / c if c > 0 else None for v, c in zip(s.tolist(), n.tolist())]  # None: no position
    for c in CONTEXTS:
        n_pos = torch.full((T,), float(data_n), dtype=torch.float64) if c == "data" else pos_n
        cuts = np.array(cut[c])
        out[c] = {"by_position": {q: means(pos_sum[c][q], n_pos) for q, _ in QUANTITIES},
                  "by_distance": {q: means(dist_sum[c][q], dist_n) for q, _ in QUANTITIES},
                  "cut_share": float((cuts >= 0).mean()),
                  "cut_distance_median": float(np.median(cuts[cuts >= 0])) if (cuts >= 0).any() else None,
                  "kept_share": kept[c] / float(pos_n.sum())}
    return out


def bands(values, counts, width):
    """Means over consecutive bands of `width` entries, weighted by counts; None where empty."""
    out = []
    for lo in range(0, len(values), width):
        v, n = np.array(values[lo:lo + width], dtype=float), np.array(counts[lo:lo + width], dtype=float)
        ok = n > 0
        out.append(float((v[ok] * n[ok]).sum() / n[ok].sum()) if ok.any() else None)
    return out


def report(d, grid, names):
    """The markdown: truncation figures, then per distance band and per grid row, data vs student."""
    fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
    lines = [f"# Diagnosis: {names['teacher_path']} teaching {names['student_path']}", "",
             f"{d['num_seqs']} test sequences of {d['seq_len']} codes ({grid}x{grid}), real prefix of "
             f"U[{d['prefix_frac'][0]}, {d['prefix_frac'][1]}] x {d['seq_len']} codes, then the student's "
             f"continuation (temperature 1). alpha threshold {d['threshold']}, {d['groups']} codebook groups. "
             f"Nats per code. Written by `{names['command']}`.", "",
             "| context | sequences truncated | median codes after the prefix at the cut | sampled positions kept |",
             "|---|---:|---:|---:|"]
    for c in CONTEXTS:
        lines.append(f"| {c} | {d[c]['cut_share']:.3f} | {fmt(d[c]['cut_distance_median'])} | {d[c]['kept_share']:.3f} |")
    head = "| {} | positions | " + " | ".join(f"{label} data | student" for _, label in QUANTITIES) + " |"
    rule = "|---|---:|" + "---:|---:|" * len(QUANTITIES)
    for title, key, counts in (("codes after the prefix", "by_distance", d["distances"]),
                               ("grid row", "by_position", d["positions"])):
        lines += ["", head.format(title), rule]
        columns = {(c, q): bands(d[c][key][q], counts, grid) for c in CONTEXTS for q, _ in QUANTITIES}
        n_band = bands([1.0] * len(counts), counts, grid)
        for b in range(len(n_band)):
            n = int(sum(counts[b * grid:(b + 1) * grid]))
            if n == 0:
                continue
            label = f"{b * grid}-{(b + 1) * grid - 1}" if key == "by_distance" else str(b)
            lines.append(f"| {label} | {n} | " + " | ".join(
                f"{fmt(columns['data', q][b])} | {fmt(columns['student', q][b])}" for q, _ in QUANTITIES) + " |")
    lines += ["", "By grid row, the data column averages every sequence at those positions; the student "
              "column only those where the student wrote the context (rows inside every prefix are empty)."]
    return "\n".join(lines) + "\n"


def read_diagnosis(path):
    if not Path(path).is_file():
        raise SystemExit(f"--compare {path}: no such file; pass the .json that python diagnose.py wrote "
                         f"(<out-dir>/diagnosis.json)")
    try:
        d = json.loads(Path(path).read_text())
        assert all(key in d for key in ("seq_len", "distances", *CONTEXTS))
        return d
    except (OSError, ValueError, AssertionError, TypeError):
        raise SystemExit(f"--compare {path}: not a diagnosis; pass the .json that python diagnose.py wrote "
                         f"(<out-dir>/diagnosis.json)") from None


def compare(ds, names):
    """Diagnoses of the same image at different grids (their json), side by side: truncation, then per
    band of the distance after the prefix in fractions of the image height (as many bands as the
    coarsest grid has rows), each cell data / student."""
    grids = [round(math.sqrt(d["seq_len"])) for d in ds]
    n = min(grids)
    if any(g % n or g * g != d["seq_len"] for g, d in zip(grids, ds)):
        raise SystemExit(f"--compare needs square grids that are multiples of the coarsest ({n}x{n}); got "
                         f"{', '.join(str(d['seq_len']) + ' codes' for d in ds)}")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    lines = ["# The diagnosis at " + " and ".join(f"{g * g} codes ({g}x{g})" for g in grids), "",
             "Each cell: data context / student context, nats per code; alpha threshold "
             + ", ".join(str(d["threshold"]) for d in ds) + ". From " + ", ".join(f"`{x}`" for x in names) + ".", "",
             "| codes | context | sequences truncated | median cut, codes after the prefix | (image height) | sampled positions kept |",
             "|---:|---|---:|---:|---:|---:|"]
    for g, d in zip(grids, ds):
        for c in CONTEXTS:
            median = d[c]["cut_distance_median"]
            lines.append(f"| {g * g} | {c} | {d[c]['cut_share']:.3f} | {fmt(median)} | "
                         f"{'-' if median is None else f'{median / (g * g):.2f}'} | {d[c]['kept_share']:.3f} |")
    lines += ["", "| after the prefix (image height) | codes | positions | " + " | ".join(label for _, label in QUANTITIES)
              + " | NLL(real) student - data | student / data |", "|---|---:|---:|" + "---:|" * (len(QUANTITIES) + 2)]
    for b in range(n):
        for g, d in zip(grids, ds):
            width = g * g // n
            count = int(sum(d["distances"][b * width:(b + 1) * width]))
            if count == 0:
                continue
            cells = {(c, q): bands(d[c]["by_distance"][q], d["distances"], width)[b] for c in CONTEXTS for q, _ in QUANTITIES}
            # the NLL per code is lower on a finer grid (each code says less): the ratio compares across grids
            real, drift = cells["data", "nll_real"], cells["student", "nll_real"]
            growth = "- | -" if None in (real, drift) or real == 0 else f"{drift - real:.3f} | {drift / real:.2f}"
            lines.append(f"| {b}/{n} - {b + 1}/{n} | {b * width}-{(b + 1) * width - 1} | {count} | " + " | ".join(
                f"{fmt(cells['data', q])} / {fmt(cells['student', q])}" for q, _ in QUANTITIES) + f" | {growth} |")
    return "\n".join(lines) + "\n"


def colour(values, lo, hi, diverging=False):
    """values (H, W) -> RGB uint8: dark blue to yellow, or blue-white-red around 0 when diverging; grey for NaN."""
    anchors = (np.array([[59, 76, 192], [255, 255, 255], [180, 4, 38]]) if diverging else
               np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]]))
    t = np.clip((values - lo) / max(hi - lo, 1e-12), 0, 1) * (len(anchors) - 1)
    i = np.minimum(np.nan_to_num(t).astype(int), len(anchors) - 2)
    frac = (np.nan_to_num(t) - i)[..., None]
    rgb = anchors[i] * (1 - frac) + anchors[i + 1] * frac
    rgb[np.isnan(values)] = 160
    return rgb.astype(np.uint8)


def heat_maps(d, grid, path, scale=None):
    """One row per quantity, columns data / student / student - data, each a map over the code grid
    (shared scale within a row; the difference on its own scale around 0); written to path."""
    scale = scale or max(4, 112 // grid)
    side, pad, label_w, head_h, foot_h = grid * scale, 8, 120, 18, 14
    rows = [(q, label) for q, label in QUANTITIES if q != "low"]
    canvas = Image.new("RGB", (label_w + 3 * (side + pad), head_h + len(rows) * (side + foot_h + pad)), "white")
    pen = ImageDraw.Draw(canvas)
    for j, title in enumerate(("data context", "student context", "student - data")):
        pen.text((label_w + j * (side + pad), 2), title, fill=0)
    for r, (q, label) in enumerate(rows):
        y = head_h + r * (side + foot_h + pad)
        pen.text((4, y + side // 2 - 6), label, fill=0)
        maps = [np.array(d[c]["by_position"][q], dtype=float).reshape(grid, grid) for c in CONTEXTS]
        maps.append(maps[1] - maps[0])
        both = np.concatenate([maps[0].ravel(), maps[1].ravel()])
        lo, hi = np.nanmin(both), np.nanmax(both)
        span = np.nanmax(np.abs(maps[2])) if not np.isnan(maps[2]).all() else 1.0
        for j, (m, bounds) in enumerate(zip(maps, ((lo, hi), (lo, hi), (-span, span)))):
            tile = Image.fromarray(colour(m, *bounds, diverging=j == 2)).resize((side, side), Image.NEAREST)
            x = label_w + j * (side + pad)
            canvas.paste(tile, (x, y))
            pen.text((x, y + side + 1), f"{bounds[0]:.2f} .. {bounds[1]:.2f}", fill=0)
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def main(argv=None):
    p = runs.parser(__doc__, METHODS)
    # the kd stage's defaults: --student (alias of --init) is then the no-KD student, the shipped one
    p.set_defaults(method="kd")
    p.add_argument("--num-seqs", type=positive_int, default=2000, help="test sequences diagnosed, >= 1 (default: 2000)")
    p.add_argument("--name", default="diagnosis", help="output files <out-dir>/<name>.md, .json and .png "
                   "(default: diagnosis)")
    p.add_argument("--compare", nargs="+", metavar="JSON", help="no diagnosis: put these diagnoses (their .json, "
                   "e.g. out/diagnosis.json out/grid14/diagnosis.json) side by side in <out-dir>/<name>_compare.md")
    p.add_argument("--force", action="store_true", help="replace the files of an earlier diagnosis of this --name")
    args = runs.get_args(argv, p)
    out = Path(args.out_dir)
    outputs = [out / f"{args.name}_compare.md"] if args.compare else [out / f"{args.name}{s}" for s in (".md", ".json", ".png")]
    for path in outputs:  # before any work, and again holding the locks (another diagnosis may have finished)
        check_output(path, "--name", args.force, kind="output file")
    with contextlib.ExitStack() as locks:
        for path in outputs:
            locks.enter_context(output_lock(path, "--name"))
        for path in outputs:
            check_output(path, "--name", args.force, kind="output file")
        return run(args, argv)


def run(args, argv):
    """diagnose.py's work once its outputs are checked and locked: the diagnosis, or --compare."""
    if args.compare:
        ds = [read_diagnosis(path) for path in args.compare]
        text = compare(ds, args.compare)
        path = Path(args.out_dir) / f"{args.name}_compare.md"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        print(text + f"\nwrote {path}")
        return text
    t0 = time.time()
    tokenizer, splits = runs.load_data(args)
    fingerprints = {"tokenizer": tokenizer.fingerprint, "data": splits["train"][2]}
    teacher = runs.load_parent(args.teacher, "teacher", fingerprints, args.device, args.teacher_preset, tokenizer)[0]
    student = runs.load_parent(args.init, "student", fingerprints, args.device, args.size, tokenizer)[0]
    if teacher.config.num_classes != student.config.num_classes:  # the null class of one is a real class of the other
        raise SystemExit(f"the teacher {args.teacher} has {teacher.config.num_classes} classes, the student {args.init} "
                         f"{student.config.num_classes}: pass two models of the same classes")
    compile_decode(student, args.decode)  # its continuations
    codes, labels = (t[:args.num_seqs].to(args.device).long() for t in splits["test"][:2])
    groups = tokenizer.codebook_groups(args.groups or teacher.config.vocab_size // 4).to(args.device)
    d = diagnose(teacher, student, codes, labels, groups, args.prefix_frac, args.threshold, args.seed)
    names = {"teacher_path": args.teacher, "student_path": args.init,
             "command": " ".join(["python diagnose.py", *(sys.argv[1:] if argv is None else argv)])}
    d.update(names, seconds=time.time() - t0)
    grid = tokenizer.cfg.grid_size
    out = Path(args.out_dir)
    text = report(d, grid, names)
    atomic_write(out / f"{args.name}.md", lambda tmp: Path(tmp).write_text(text))
    atomic_write(out / f"{args.name}.json", lambda tmp: Path(tmp).write_text(json.dumps(d)))
    heat_maps(d, grid, out / f"{args.name}.png")
    print(text + f"\nwrote {out}/{args.name}.md, .json and .png in {time.time() - t0:.0f} s")
    return d


if __name__ == "__main__":
    main()
