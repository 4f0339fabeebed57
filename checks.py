"""What stands between a user's input and lost or silently wrong work: flag values checked at parse
time, checkpoints verified against the fingerprint of their weights on every load, and outputs
checked writable before any work, written atomically, by one process at a time (a lock beside
each output) and never over a file this run did not make unless the user passes --force.

Every refusal is one sentence that names the flag or the file and the fix. Nothing here imports the
rest of the project: every program and module may use it.
"""
import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

# ------------------------------------------------------------------------------------------------
# Flags: argparse `type=` functions, so that a bad value is refused before any work, with its range.


def ranged(kind, low=None, high=None, low_open=False, high_open=False):
    """A type for argparse: a finite `kind` (int or float) within [low, high] (an open end with *_open)."""
    name = "an integer" if kind is int else "a number"
    bound = (f"{'>' if low_open else '>='} {low}" if high is None else
             f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}: pass {name} {bound}") from None
        bad_low = low is not None and (value <= low if low_open else value < low)
        bad_high = high is not None and (value >= high if high_open else value > high)
        if bad_low or bad_high or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: pass {name} {bound}")
        return value
    return parse


positive_int = ranged(int, 1)
count = ranged(int, 0)
positive = ranged(float, 0, low_open=True)
non_negative = ranged(float, 0)
fraction = ranged(float, 0, 1)
# a seed feeds torch.Generator.manual_seed after the per-step arithmetic (distill.step_seed): it must
# stay inside 64 bits there
seed_int = ranged(int, 0, 2 ** 32 - 1)
# guidance beyond this mixes the logits into infinities (and no model is sampled there)
guidance_scale = ranged(float, 0, 100)


def int_list(text):
    """'0,3,5' -> [0, 3, 5] (distinct integers in [0, 2^32): ids and seeds)."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 0,3,5") from None
    if min(values) < 0 or max(values) >= 2 ** 32:
        raise argparse.ArgumentTypeError(f"{text!r} holds a number out of range: pass ids in [0, 2^32)")
    if len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"{text!r} names one value twice: pass each once")
    return values


def scale_list(text):
    """'1,1.5,2' -> [1.0, 1.5, 2.0]: guidance scales, each finite and >= 0, duplicates dropped."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 1,1.5,2,3") from None
    if not all(math.isfinite(v) and 0 <= v <= 100 for v in values):
        raise argparse.ArgumentTypeError(f"{text}: pass guidance scales in [0, 100], e.g. 1,1.5,2,3")
    return list(dict.fromkeys(values))


def fraction_range(text):
    """'lo,hi' with 0 <= lo <= hi < 1 -> (lo, hi)."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not two fractions lo,hi, e.g. 0.25,0.75") from None
    if not 0 <= lo <= hi < 1:
        raise argparse.ArgumentTypeError(f"{text}: pass lo,hi with 0 <= lo <= hi < 1 (the real prefix leaves at "
                                         f"least one code to sample)")
    return lo, hi


def existing_device(text):
    """A torch device that exists on this machine."""
    try:
        d = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: pass cpu or cuda (cuda:N)") from None
    found = {"cpu": 1, "cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
             "mps": int(torch.backends.mps.is_available())}.get(d.type, 0)
    if (d.index or 0) >= found:
        raise argparse.ArgumentTypeError(f"{text}: no such device on this machine (this torch build "
                                         f"{'sees ' + str(found) if found else 'has none of that type'}): pass cpu")
    return text


# ------------------------------------------------------------------------------------------------
# Fingerprints and checkpoints.


def fingerprint(*parts):
    """Short sha256 of arrays, strings and numbers: what an artifact was built from."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(str((p.dtype, p.shape)).encode())
            h.update(np.ascontiguousarray(p).data)
        else:
            h.update(repr(p).encode())
    return h.hexdigest()[:16]


def weights_fingerprint(state):
    """The fingerprint of a state dict's tensors, in their order: what every checkpoint we write
    records as "fingerprint", its weights' identity (the parents a checkpoint names by it)."""
    return fingerprint(*(v.detach().cpu().numpy() for v in state.values()))


def integrity(ckpt):
    """What a checkpoint of ours must still be when it is read: every tensor by name and value, and
    whatever else changes its computation, its config and a tokenizer's codebook groups. Recorded as
    "integrity" by every save; a file written before it has only "fingerprint", which misses a swap
    of two layers or an edited config."""
    tensors = [x for name, t in sorted(ckpt["model"].items()) for x in (name, t.detach().cpu().numpy())]
    groups = [x for k, g in sorted((ckpt.get("groups") or {}).items()) for x in (str(k), g.cpu().numpy())]
    config = {k: ckpt[k] for k in ("config", "in_channels", "image_size", "num_classes") if k in ckpt}  # the classifier's
    return fingerprint(*tensors, json.dumps(config, sort_keys=True), *groups)


# the shipped files, each committed once, written before "integrity": (sha256 of the file, fingerprint
# of its weights). A file there with those weights and other bytes was edited (its config, its groups)
# and is refused; one rebuilt by the README's commands has other weights, and its own integrity record
WEIGHTS = Path(__file__).parent / "weights"  # the shipped tokenizer, teacher, no-KD student and FID-cls classifier
SHIPPED = {"tokenizer.pt": ("f83b2b77f87a663cb97b98b108d78605b5951530e96938cc73dafcf35e8bd419", "d569027b9e62fd49"),
           "teacher.pt": ("84fbb03528e7a3312c03d283b6d304516f2d1fa4d68fb095f922a14807d0474d", "29040d8dd7fe1ec5"),
           "student.pt": ("c3851975bcdab8bea22d1f8728dea7a712fc694c5e67a943fd41a4d9d1b6c31a", "20fbb9aba11e50b0"),
           "classifier.pt": ("959bb89569720665103d6e3a72c15b29deeeb3408c346300b4bfa37a2f04c64b", "aff13c29bb3b4eda")}
OURS = ("config", "args", "metrics", "fingerprints", "settings", "step")  # keys only our checkpoints hold


def read_checkpoint(path, what="checkpoint", fix="pass one saved by torch.save"):
    """torch.load(..., weights_only=True) of a user-supplied file, as a dict. Anything unreadable, and weights
    that no longer match their recorded fingerprint (a damaged file), are refused in one sentence."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"no {what} at {path}: check the path, or {fix}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, truncated, not a zip or pickle, a hostile pickle: all refused alike
        reason = ("empty" if path.stat().st_size == 0 else "truncated, or not a torch.save file"
                  if not zipfile.is_zipfile(path) else (str(e).splitlines() or [type(e).__name__])[0][:100])
        raise SystemExit(f"{path} exists and is not a {what} (unreadable: {reason}): {fix}") from None
    if not isinstance(ckpt, dict):
        raise SystemExit(f"{path} exists and is not a {what} (it holds a {type(ckpt).__name__}): {fix}")
    if not isinstance(ckpt.get("model"), dict):
        return ckpt  # a bare state dict (LlamaGen's tokenizer is one): nothing recorded to check it against
    if path.resolve().parent == WEIGHTS.resolve() and path.name in SHIPPED:
        sha, weights = SHIPPED[path.name]
        if hashlib.sha256(path.read_bytes()).hexdigest() != sha and weights_fingerprint(ckpt["model"]) == weights:
            raise SystemExit(f"{path} holds the shipped weights but is not the file this repository ships (edited: "
                             f"its config or groups?): restore it with `git checkout {WEIGHTS.name}/{path.name}`")
    recorded = {"integrity": integrity, "fingerprint": lambda c: weights_fingerprint(c["model"])}
    if not any(k in ckpt for k in recorded):
        if any(k in ckpt for k in OURS):
            raise SystemExit(f"{path} is a checkpoint of ours without its fingerprint (edited, or written by other "
                             f"code): it cannot be checked; rebuild it, or restore the file as it was saved")
        return ckpt  # not ours (LlamaGen's {"model": ...}): the loader names it unchecked
    for key, compute in recorded.items():
        if key in ckpt:
            try:
                got = compute(ckpt)
            except (AttributeError, TypeError, KeyError):
                got = None
            if got != ckpt[key]:
                raise SystemExit(f"{path} is damaged: its weights, their names or its config have {key} {got}, not "
                                 f"the {ckpt[key]} recorded when it was saved; restore it from a copy or rebuild it")
    return ckpt


def check_weights(path, ckpt, state):
    """After read_checkpoint, the weights a loader is about to use: every one finite (a damaged file is
    named so here, never found later as a diverging run), and a file with no record of ours to check
    it against (LlamaGen's) named as unchecked."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SystemExit(f"{path} is damaged: {bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''} holds values "
                         f"that are not finite; restore it from a copy or build it again")
    if "fingerprint" not in ckpt and "integrity" not in ckpt:
        print(f"{path}: no fingerprint of ours (LlamaGen's, or a bare state dict): loaded as it is, unchecked")


def check_memory(n, shape, what):
    """Before drawing n images of `shape` (H, W, C) and holding them (uint8) in memory: refuse a count
    the machine cannot hold, in one sentence, rather than be killed by the kernel hours later."""
    need = n * math.prod(shape)
    free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if need > free // 2:  # the images, and room for the model and the batch being decoded
        raise SystemExit(f"{what} {n}: {n} images of {'x'.join(map(str, shape))} take {need / 1e9:.1f} GB, more than half "
                         f"of the {free / 1e9:.1f} GB free here: pass fewer")


def is_checkpoint(path):
    """A torch.save file (a zip holding data.pkl): never replaced by an image or an array."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


# ------------------------------------------------------------------------------------------------
# Outputs.


def check_output(path, flag, force=None, kind="checkpoint"):
    """Before any work: refuse an output that cannot be written (a parent that is a file, a
    read-only folder, a folder in its place), a checkpoint that an image or an array (kind) would
    replace, even with --force, and, when force is False, any existing file (force None: the
    caller decides, as distill.py does for the checkpoint it continues)."""
    path = Path(path)
    # a name longer than the filesystem takes (the output's own with ".lock" added: the lock beside it)
    limit = os.pathconf("/", "PC_NAME_MAX")
    for part in [*path.parent.parts, path.name + ".lock"]:
        if len(part.encode()) > limit:
            raise SystemExit(f"{flag} {path}: the name {part[:24]}... is too long for the filesystem ({len(part.encode())} "
                             f"bytes, {limit} at most, the output's own with '.lock' added): pass a shorter one")
    if path.is_dir():
        raise SystemExit(f"{flag} {path} is a folder: pass a file path")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SystemExit(f"{flag} {path}: {parent} is a file, not a folder; pass a path under a folder")
    probe = parent / f".write-test-{os.getpid()}"  # a real write: permissions, read-only mounts, quotas
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"{flag} {path}: cannot write in {parent} ({e.strerror}); pass {flag} under a folder you "
                         f"can write to") from None
    if path.exists() and kind != "checkpoint" and is_checkpoint(path):
        raise SystemExit(f"{flag} {path} is a checkpoint: pass {flag} elsewhere (a checkpoint is never "
                         f"replaced by an {kind})")
    if path.exists() and force is False:
        raise SystemExit(f"{flag} {path} exists: pass --force to replace it, or {flag} elsewhere")


def os_fault(path, error):
    """One sentence for an operating system's refusal to write `path`: what happened and what to do."""
    path, code = Path(path), getattr(error, "errno", None)
    free = shutil.disk_usage(next(p for p in path.parents if p.exists())).free
    # torch.save says only that its writer failed: a disk with next to nothing free is the reason
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and free < 2 ** 24):
        return f"no space left to write {path} ({free / 1e6:.1f} MB free there): free some space, or write elsewhere"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: {error.strerror.lower()}; make its folder writable, or write elsewhere"
    if code == errno.ENAMETOOLONG:
        return f"cannot write {path}: a name in it is too long for the filesystem; pass a shorter path"
    if code in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST):
        return f"cannot write {path}: a folder stands where a file goes, or a file where a folder goes; pass another path"
    return f"cannot write {path} ({getattr(error, 'strerror', None) or error}): write elsewhere"


def atomic_write(path, write):
    """Call write(tmp_path), then move tmp_path onto path: a crash, a full disk or a refused write
    never leaves half a file and never changes what was there (an operating system's refusal ends in
    one sentence, os_fault). The temporary name is unique per process and short whatever the name:
    its suffix is the file's, so np.save and PIL keep it, and never empty, which torch.save refuses."""
    path = Path(path)
    digest = hashlib.sha256(path.name.encode()).hexdigest()[:8]
    tmp = path.with_name(f".tmp-{os.getpid()}-{digest}{path.suffix[:16] or '.tmp'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise SystemExit(os_fault(path, e)) from None
    except RuntimeError as e:  # torch.save reports a failed write as a RuntimeError of its zip writer
        if "inline_container" not in str(e) and "write" not in str(e):
            raise
        raise SystemExit(os_fault(path, e)) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def output_lock(path, flag="--out"):
    """One writer per output: an advisory lock on <path>.lock holding the writer's pid. The kernel
    drops it when the process ends, however it ends (kill -9 included), so a lock is never stale."""
    lock = Path(f"{path}.lock")
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SystemExit(f"{flag} {path}: its lock {lock} cannot be made ({e.strerror.lower()}): remove what is "
                             f"there, or pass {flag} elsewhere") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SystemExit(f"{flag} {path} is being written by process {holder} (lock {lock}): wait for it to "
                             f"finish, or pass {flag} elsewhere") from None
        # the lock file may have been removed by its last holder between our open and our lock
        if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    with contextlib.suppress(OSError):  # the pid is for the message of a second writer; a full disk may refuse it
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
