"""Every test of the project: fast, CPU, no network except a local HTTP server on 127.0.0.1.

    python -m pytest -q test_all.py

Tests that train on Fashion-MNIST need the data (apt-get install dataset-fashion-mnist).
"""
import argparse
import ast
import contextlib
import copy
import functools
import errno
import gzip
import hashlib
import itertools
import http.server
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import types
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import bench
import checks
import classifier
import data
import diagnose
import distill
import evaluate
import inception
import model as model_module
import runs
import sample
import study
import tokenizer as tok
from model import GPT, PRESETS, GPTConfig, load_checkpoint
from distill import mixed_rollout, zipar_schedule
from sample import filtered_probs, generate, relax, sample_logits, speculative_figures, speculative_generate

FORMATS = Path(__file__).resolve().parent / "assets" / "formats"  # key layouts of the real checkpoints


# ---------------------------------------------------------------------------------------- the house


def project_imports():
    """{file stem: the project modules it imports, at any depth of the file}."""
    here = Path(__file__).resolve().parent
    stems = {p.stem for p in here.glob("*.py")}
    graph = {}
    for path in here.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        graph[path.stem] = names & stems - {path.stem}
    return graph


def test_imports_point_one_way_and_only_the_tools_and_tests_import_distill():
    graph = project_imports()
    order, seen = [], set()

    def visit(name, path):
        assert name not in path, f"import circle: {' -> '.join(path + [name])}"
        if name not in seen:
            for dep in sorted(graph[name]):
                visit(dep, path + [name])
            seen.add(name)
            order.append(name)
    for name in sorted(graph):
        visit(name, [])
    assert {n for n, deps in graph.items() if "distill" in deps} <= {"study", "bench", "diagnose", "test_all"}
    assert graph["runs"] <= {"checks", "data", "model", "tokenizer"} and not graph["checks"]
    assert graph["data"] <= {"checks"} and graph["model"] <= {"checks"}


def github_anchor(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_docs_code_pointers_name_their_lines_and_every_link_resolves():
    here = Path(__file__).resolve().parent
    anchors = {doc: {github_anchor(h) for h in re.findall(r"^#+ (.+)$", (here / doc).read_text(), re.M)}
               for doc in ("README.md", "RESULTS.md")}
    pointers = 0
    for doc in anchors:
        text = (here / doc).read_text()
        for name, path, line in re.findall(r"\[`(\w+)`\]\((\w+\.py)#L(\d+)\)", text):  # [`kd_loss`](distill.py#L66)
            source = (here / path).read_text().split("\n")  # a function, a class or a table
            assert re.match(rf"(def|class) {name}\b|{name} = ", source[int(line) - 1]), f"{doc}: {name} is not at {path}:{line}"
            pointers += 1
        for target, anchor in re.findall(r"\]\(([\w.]*)#([\w-]+)\)", text):
            if not target.endswith(".py"):
                assert anchor in anchors[target or doc], f"{doc}: no heading for the link {target}#{anchor}"
        for path in re.findall(r"\]\(((?:assets|weights|results)/[^)#]+)\)", text):
            assert (here / path).exists(), f"{doc} links to {path}, which is not in the repository"
    assert pointers >= 10  # the README's methods point at their code


# ---------------------------------------------------------------------------------------- data


def idx_bytes(array, magic):
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def make_fashion_mnist(folder, n_train=20, n_test=10, seed=0):
    """The four IDX .gz files of a tiny fake Fashion-MNIST; returns {name: sha256}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shas = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, magic, array in (("images-idx3", 2051, rng.integers(0, 256, (n, 28, 28))),
                                   ("labels-idx1", 2049, rng.integers(0, 10, n))):
            name = f"{prefix}-{kind}-ubyte.gz"
            raw = idx_bytes(array, magic)
            (folder / name).write_bytes(raw)
            shas[name] = hashlib.sha256(raw).hexdigest()
    return shas


def test_fashion_mnist_loads_from_data_dir_with_shapes_and_dtypes(tmp_path):
    make_fashion_mnist(tmp_path, n_train=20, n_test=10)
    images, labels = data.load_fashion_mnist("train", tmp_path)
    assert images.shape == (20, 28, 28, 1) and images.dtype == np.uint8
    assert labels.shape == (20,) and labels.dtype == np.int64
    assert data.load_fashion_mnist("test", tmp_path)[0].shape == (10, 28, 28, 1)


def test_missing_idx_file_is_named_with_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="missing.*apt-get install dataset-fashion-mnist"):
        data.read_idx(tmp_path / "train-images-idx3-ubyte.gz", 2051)


def test_truncated_gzip_is_refused(tmp_path):
    raw = idx_bytes(np.zeros((5, 28, 28)), 2051)
    (tmp_path / "x.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SystemExit, match="x.gz is truncated or not a gzip file"):
        data.read_idx(tmp_path / "x.gz", 2051)


def test_corrupt_file_that_is_not_gzip_is_refused(tmp_path):
    (tmp_path / "x.gz").write_bytes(b"this is not gzip at all")
    with pytest.raises(SystemExit, match="x.gz is truncated or not a gzip file"):
        data.read_idx(tmp_path / "x.gz", 2051)


def test_wrong_magic_number_is_refused(tmp_path):
    (tmp_path / "x.gz").write_bytes(idx_bytes(np.zeros(5), 2049))  # a label file
    with pytest.raises(SystemExit, match="magic number 2049, expected 2051"):
        data.read_idx(tmp_path / "x.gz", 2051)


def test_payload_shorter_than_header_says_is_refused(tmp_path):
    header = struct.pack(">IIII", 2051, 5, 28, 28)
    (tmp_path / "x.gz").write_bytes(gzip.compress(header + bytes(28 * 28 * 4)))  # 4 images, not 5
    with pytest.raises(SystemExit, match="header says"):
        data.read_idx(tmp_path / "x.gz", 2051)


@pytest.fixture
def http_server(tmp_path):
    """Serves tmp_path/served on 127.0.0.1; yields (folder, base url)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_download_writes_the_file_when_its_checksum_matches(http_server, tmp_path):
    served, url = http_server
    (served / "f.bin").write_bytes(b"good bytes" * 1000)
    dest = tmp_path / "dl" / "f.bin"
    data.download(url + "f.bin", dest, hashlib.sha256(b"good bytes" * 1000).hexdigest())
    assert dest.read_bytes() == b"good bytes" * 1000
    assert list(dest.parent.iterdir()) == [dest]  # no temp file left


def test_download_with_wrong_checksum_is_refused_and_leaves_nothing(http_server, tmp_path):
    served, url = http_server
    (served / "f.bin").write_bytes(b"tampered")
    dest = tmp_path / "dl" / "f.bin"
    with pytest.raises(SystemExit, match="sha256"):
        data.download(url + "f.bin", dest, hashlib.sha256(b"expected").hexdigest())
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(b"already here")  # a failed download overwrites nothing
    with pytest.raises(SystemExit, match="sha256"):
        data.download(url + "f.bin", dest, hashlib.sha256(b"expected").hexdigest())
    assert dest.read_bytes() == b"already here" and list(dest.parent.iterdir()) == [dest]


def test_fashion_mnist_is_downloaded_when_nowhere_on_disk(http_server, tmp_path, monkeypatch):
    served, url = http_server
    shas = make_fashion_mnist(served, n_train=12, n_test=6)
    monkeypatch.setattr(data, "FASHION_MNIST_URL", url)
    monkeypatch.setattr(data, "FASHION_MNIST_FILES", shas)
    monkeypatch.setattr(data, "SYSTEM_DIR", str(tmp_path / "no-system-copy"))
    images, labels = data.load_fashion_mnist("train", tmp_path / "data")
    assert images.shape == (12, 28, 28, 1) and sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(shas)
    stored_images, _ = data.load_fashion_mnist("train", served)
    assert np.array_equal(images, stored_images)


def make_image_folder(root, sizes):
    for c, size_list in sizes.items():
        (root / c).mkdir(parents=True)
        for i, (w, h) in enumerate(size_list):
            Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_gives_centre_cropped_resized_uint8_and_sorted_labels(tmp_path):
    make_image_folder(tmp_path, {"zebra": [(50, 30)], "apple": [(30, 40), (64, 64)]})
    images, labels, classes = data.load_image_folder(tmp_path, 16)
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    assert classes == ["apple", "zebra"] and labels.tolist() == [0, 0, 1]
    # centre crop keeps the middle: a wide image with a red centre column block stays red inside
    im = np.zeros((20, 60, 3), np.uint8)
    im[:, 20:40, 0] = 255
    Image.fromarray(im).save(tmp_path / "zebra" / "wide.png")
    assert data.load_image(tmp_path / "zebra" / "wide.png", 8)[..., 0].min() > 200


def test_image_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        data.image_folder_files(tmp_path / "nope")
    with pytest.raises(SystemExit, match="no class subfolders"):
        data.image_folder_files(tmp_path)
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "notes.txt").write_text("no images here")
    with pytest.raises(SystemExit, match="cats has no images"):
        data.image_folder_files(tmp_path)
    (tmp_path / "cats" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="broken.png is not a readable image"):
        data.load_image_folder(tmp_path, 8)


def test_token_cache_is_built_once_then_reused_and_refuses_another_tokenizer(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (30, 28, 28, 1), dtype=np.uint8)
    labels = np.arange(30) % 10
    calls = []

    def encode(x):
        calls.append(len(x))
        return x[:, ::4, ::4, 0].astype(np.int64)  # (N, 7, 7)

    codes, got_labels, fp = data.token_cache(tmp_path / "train", images, labels, encode, "tokA", batch_size=8)
    assert codes.shape == (30, 7, 7) and sum(calls) == 30 and fp == data.fingerprint(images, labels)
    again, _, _ = data.token_cache(tmp_path / "train", images, labels, encode, "tokA")
    assert sum(calls) == 30 and np.array_equal(again, codes)  # reused, not re-encoded
    with pytest.raises(SystemExit, match="built by tokenizer tokA, not by this one"):
        data.token_cache(tmp_path / "train", images, labels, encode, "tokB")
    with pytest.raises(SystemExit, match="built from other images"):
        data.token_cache(tmp_path / "train", images[::-1].copy(), labels, encode, "tokA")


def test_the_training_cache_holds_each_image_and_its_mirror_image_and_the_test_cache_neither(tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (20, 28, 28, 1), dtype=np.uint8)
    monkeypatch.setattr(data, "load_fashion_mnist", lambda split, data_dir: (images[:12 if split == "train" else 8],
                                                                             np.arange(12 if split == "train" else 8) % 10))
    fake = types.SimpleNamespace(fingerprint="tokA", encode=lambda x: torch.from_numpy(x[:, ::4, ::4, 0].astype(np.int64)),
                                 cfg=types.SimpleNamespace(codebook_size=256))
    splits = data.prepare_tokens(fake, tmp_path / "none", tmp_path / "tokens", flip=True)
    codes, labels, _ = splits["train"]
    assert codes.shape == (24, 49) and labels.tolist() == np.repeat(np.arange(12) % 10, 2).tolist()
    assert torch.equal(codes[2 * 5], torch.from_numpy(images[5, ::4, ::4, 0].astype(np.int64)).flatten())
    assert torch.equal(codes[2 * 5 + 1], torch.from_numpy(images[5, :, ::-1][::4, ::4, 0].astype(np.int64)).flatten())
    assert splits["test"][0].shape == (8, 49)
    plain = data.prepare_tokens(fake, tmp_path / "none", tmp_path / "tokens")["train"]
    assert plain[0].shape == (12, 49) and plain[2] != splits["train"][2]  # another cache, another fingerprint


# ------------------------------------------------------------------------------------ the shipped weights


def test_the_shipped_files_load_and_reproduce_their_recorded_figures(tmp_path):
    """The token cache of the shipped tokenizer gives the recorded test NLL of the shipped teacher and
    student, and the shipped classifier its recorded test accuracy."""
    tokenizer = tok.load_tokenizer(data.WEIGHTS / "tokenizer.pt")
    images, labels = data.load_fashion_mnist("test")  # the test split's cache alone: the figures are on it
    encode = lambda x: tokenizer.encode(x).numpy()  # noqa: E731
    codes, labels, _ = data.token_cache(tmp_path / "test", images, labels, encode, tokenizer.fingerprint)
    codes, labels = torch.from_numpy(np.asarray(codes).reshape(len(codes), -1)), torch.from_numpy(labels)
    for name in ("teacher", "student"):
        ckpt = torch.load(data.WEIGHTS / f"{name}.pt", weights_only=True)
        assert ckpt["fingerprints"]["tokenizer"] == tokenizer.fingerprint and ckpt["step"] == ckpt["args"]["max_iters"]
        model = load_checkpoint(data.WEIGHTS / f"{name}.pt")
        assert ckpt["fingerprint"] == distill.runs.weights_fingerprint(model)
        nll = evaluate.held_out(model, codes.long(), labels)["test_nll"]
        assert abs(nll - ckpt["metrics"]["test_nll"]) < 1e-3, (name, nll, ckpt["metrics"]["test_nll"])
    cnn = classifier.load_classifier("data")
    images, test_labels = data.load_fashion_mnist("test")
    _, logits = evaluate.extract(cnn, images)
    recorded = torch.load(classifier.CLASSIFIER, weights_only=True)["test_accuracy"]
    assert abs((logits.argmax(1) == test_labels).mean() - recorded) < 1e-3


GRID14_SHIPPED = ("tokenizer", "teacher", "student")  # what weights/grid14/ holds: all three parents


def test_the_shipped_14x14_files_reproduce_their_recorded_figures_and_are_the_defaults_of_grid_14(tmp_path):
    """weights/grid14/: the tokenizer's recorded test MSE and code usage, every shipped GPT's recorded test
    NLL on that tokenizer's test cache; and each is what --grid 14 reads (the others: built under the out-dir)."""
    home = data.WEIGHTS / "grid14"
    assert sorted(p.stem for p in home.glob("*.pt")) == sorted(GRID14_SHIPPED)
    tokenizer = tok.load_tokenizer(home / "tokenizer.pt")
    recorded = torch.load(home / "tokenizer.pt", weights_only=True)
    images, labels = data.load_fashion_mnist("test")
    mse, psnr, usage = tok.evaluate(tokenizer, images)
    assert tokenizer.cfg.grid_size == 14 and abs(mse - recorded["test_mse"]) < 1e-6 and usage == recorded["code_usage"]
    encode = lambda x: tokenizer.encode(x).numpy()  # noqa: E731
    codes, labels, _ = data.token_cache(tmp_path / "test", images, labels, encode, tokenizer.fingerprint)
    codes, labels = torch.from_numpy(np.asarray(codes).reshape(len(codes), -1)), torch.from_numpy(labels)
    for name in set(GRID14_SHIPPED) - {"tokenizer"}:
        ckpt = torch.load(home / f"{name}.pt", weights_only=True)
        model = load_checkpoint(home / f"{name}.pt", tokenizer=tokenizer.fingerprint)
        assert model.config.grid_size == 14 and ckpt["step"] == ckpt["args"]["max_iters"]
        nll = evaluate.held_out(model, codes.long(), labels)["test_nll"]
        assert abs(nll - ckpt["metrics"]["test_nll"]) < 1e-3, (name, nll, ckpt["metrics"]["test_nll"])
    args = distill.runs.get_args(["--method", "kd", "--grid", "14", "--out-dir", "o"], methods=distill.METHODS)
    shipped = {k: str(home / f"{k}.pt") if k in GRID14_SHIPPED else v for k, v in
               {"tokenizer": "o/grid14/tokenizer.pt", "teacher": "o/grid14/teacher.pt", "student": "o/grid14/ce/ckpt.pt"}.items()}
    assert (args.tokenizer, args.teacher) == (shipped["tokenizer"], shipped["teacher"])
    chain = distill.runs.pipeline(args)  # the parents not shipped are built in the out-dir's tree, then kd
    built = [f"o/grid14/{path}" for path, name in (("teacher.pt", "teacher"), ("ce/ckpt.pt", "student"))
             if name not in GRID14_SHIPPED]
    assert [r.out for r in chain] == built + ["o/grid14/kd/ckpt.pt"] and chain[-1].init == shipped["student"]
    assert data.parents(14)["tokenizer"] == data.parents(14, "out/grid14")["tokenizer"] == str(home / "tokenizer.pt")
    assert data.beside(home / "teacher.pt") == Path("out/weights/grid14/teacher.pt")  # never written into weights/


def test_the_shipped_parents_are_the_defaults_and_another_tokenizer_builds_its_own():
    args = distill.runs.get_args(["--method", "varkd"], methods=distill.METHODS)
    assert Path(args.tokenizer) == data.WEIGHTS / "tokenizer.pt" and Path(args.teacher) == data.WEIGHTS / "teacher.pt"
    chain = distill.runs.pipeline(args)
    assert [(r.method, r.out) for r in chain] == [("kd", "out/kd/ckpt.pt"), ("varkd", "out/varkd/ckpt.pt")]
    assert Path(chain[0].init) == data.WEIGHTS / "student.pt" and chain[0].max_iters == 400
    own = distill.runs.pipeline(distill.runs.get_args(["--method", "varkd", "--tokenizer", "elsewhere/tok.pt"], methods=distill.METHODS))
    assert [(r.method, r.out, r.init) for r in own] == [("ce", "out/teacher.pt", "none"), ("ce", "out/ce/ckpt.pt", "none"),
                                                       ("kd", "out/kd/ckpt.pt", "out/ce/ckpt.pt"),
                                                       ("varkd", "out/varkd/ckpt.pt", "out/kd/ckpt.pt")]
    assert [r.max_iters for r in own] == [3000, 12000, 400, 400]
    assert own[0].size == "teacher" and own[1].size == "student"
    long = distill.runs.pipeline(distill.runs.get_args(["--method", "kd", "--grid", "14", "--out-dir", "o",
                                                        "--tokenizer", "o/grid14/tok.pt"], methods=distill.METHODS))
    assert [(r.method, r.out, r.tokenizer, r.grid) for r in long] == [
        ("ce", "o/grid14/teacher.pt", "o/grid14/tok.pt", 14), ("ce", "o/grid14/ce/ckpt.pt", "o/grid14/tok.pt", 14),
        ("kd", "o/grid14/kd/ckpt.pt", "o/grid14/tok.pt", 14)]  # its own tree, the parents' runs included


# ------------------------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def small_tokenizer():
    """A default-architecture tokenizer after 60 steps on real Fashion-MNIST."""
    images, _ = data.load_fashion_mnist("train")
    torch.manual_seed(0)
    model = tok.VQModel(tok.VQConfig())
    tok.train(model, images[:5000], steps=60, batch_size=64, reseed_every=20)
    model.fingerprint = tok.weights_fingerprint(model)
    return model


def test_tokenizer_encode_decode_shapes_and_dtypes(small_tokenizer):
    images, _ = data.load_fashion_mnist("test")
    codes = small_tokenizer.encode(images[:5])
    assert codes.shape == (5, 7, 7) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 256
    out = small_tokenizer.decode(codes)
    assert out.shape == (5, 28, 28, 1) and out.dtype == torch.uint8
    assert torch.equal(small_tokenizer.decode(codes.flatten(1)), out)  # (B, T) works too


def test_tokenizer_round_trip_reconstructs_and_re_encodes_to_the_same_codes(small_tokenizer):
    images, _ = data.load_fashion_mnist("test")
    x = images[:200]
    codes = small_tokenizer.encode(x)
    recon = small_tokenizer.decode(codes)
    err = (recon.float() - torch.as_tensor(x).float()).abs().mean().item()
    blank = (torch.as_tensor(x).float() - float(x.mean())).abs().mean().item()
    assert err < 0.6 * blank  # far better than predicting the mean image
    same = (small_tokenizer.encode(recon) == codes).float().mean().item()
    assert same > 0.4  # chance is 1/256; a 60-step tokenizer re-encodes about half the codes


def test_a_killed_tokenizer_run_continues_to_the_weights_of_one_that_never_stopped(tmp_path, monkeypatch):
    images = data.load_fashion_mnist("train")[0][:2000]
    def fresh():
        torch.manual_seed(0)
        return tok.VQModel(tok.VQConfig())
    whole = fresh()
    tok.train(whole, images, steps=12, batch_size=16, reseed_every=4)
    state = tmp_path / "run.partial.pt"
    class DiesAtStep8(tok.tqdm):  # the kill, before step 8: the partial run holds step 5
        def __iter__(self):
            for step in super().__iter__():
                if step == 8:
                    raise KeyboardInterrupt
                yield step
    monkeypatch.setattr(tok, "tqdm", DiesAtStep8)
    with pytest.raises(KeyboardInterrupt):
        tok.train(fresh(), images, steps=12, batch_size=16, reseed_every=4, state=state, save_every=5)
    monkeypatch.undo()
    assert torch.load(state, weights_only=True)["step"] == 5
    continued = fresh()
    assert tok.train(continued, images, steps=12, batch_size=16, reseed_every=4, state=state, save_every=5) > 0
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), continued.state_dict().values()))
    with pytest.raises(SystemExit, match="a partial run with other settings"):  # another run's partial: refused
        tok.train(fresh(), images, steps=12, batch_size=16, lr=1e-3, reseed_every=4, state=state, save_every=5)


@pytest.fixture(scope="module")
def small_tokenizer14():
    """The --grid 14 architecture (one downsampling fewer) after 60 steps on real Fashion-MNIST."""
    images, _ = data.load_fashion_mnist("train")
    torch.manual_seed(0)
    model = tok.VQModel(tok.VQConfig(**tok.PRESETS[tok.GRIDS[14]]))
    tok.train(model, images[:5000], steps=60, batch_size=64, reseed_every=20)
    model.fingerprint = tok.weights_fingerprint(model)
    return model


def test_a_14x14_tokenizer_round_trips_a_batch(small_tokenizer14):
    x = data.load_fashion_mnist("test")[0][:200]
    codes = small_tokenizer14.encode(x)
    assert codes.shape == (200, 14, 14) and small_tokenizer14.cfg.grid_size == 14
    recon = small_tokenizer14.decode(codes)
    assert recon.shape == (200, 28, 28, 1) and recon.dtype == torch.uint8
    err = (recon.float() - torch.as_tensor(x).float()).abs().mean().item()
    assert err < 0.6 * (torch.as_tensor(x).float() - float(x.mean())).abs().mean().item()
    assert (small_tokenizer14.encode(recon) == codes).float().mean().item() > 0.15  # chance: 1/256


def test_tokenizer_refuses_images_of_the_wrong_size(small_tokenizer):
    with pytest.raises(SystemExit, match=r"uint8 images \(N, 28, 28, 1\), got \(2, 32, 32, 1\)"):
        small_tokenizer.encode(np.zeros((2, 32, 32, 1), np.uint8))


def test_tokenizer_save_load_keeps_codes_fingerprint_and_groups(small_tokenizer, tmp_path):
    groups = small_tokenizer.codebook_groups(64)
    tok.save_tokenizer(small_tokenizer, tmp_path / "t.pt")
    loaded = tok.load_tokenizer(tmp_path / "t.pt")
    images, _ = data.load_fashion_mnist("test")
    assert torch.equal(loaded.encode(images[:20]), small_tokenizer.encode(images[:20]))
    assert loaded.fingerprint == small_tokenizer.fingerprint
    assert torch.equal(loaded.groups[64], groups)
    with torch.no_grad():
        loaded.decoder[0].bias.add_(1.0)
    assert tok.weights_fingerprint(loaded) != small_tokenizer.fingerprint


def test_codebook_groups_partition_the_codebook_into_similar_codes(small_tokenizer):
    groups = small_tokenizer.codebook_groups(64)
    assert groups.shape == (256,) and groups.dtype == torch.long
    assert set(groups.tolist()) == set(range(int(groups.max()) + 1))  # every id used, none skipped
    assert int(groups.max()) + 1 >= 60  # k-means rarely leaves a cluster empty
    cb = small_tokenizer.codebook().detach()
    sim = cb @ cb.t()
    same = groups[:, None] == groups[None, :]
    off_diag = ~torch.eye(256, dtype=torch.bool)
    assert sim[same & off_diag].mean() > sim[off_diag].mean() + 0.2  # groups hold near-duplicates


def test_vq16_state_dict_with_llamagen_keys_loads_strictly(tmp_path):
    rows = [line.rstrip("\n").split("\t") for line in open(FORMATS / "llamagen_vq16_keys.tsv")
            if not line.startswith("#")]
    sd = {k: torch.randn(eval(shape) if shape != "()" else ()) for k, shape, _ in rows}
    assert sum(v.numel() for k, v in sd.items() if k != "quantize.codebook_used") == 71_883_403
    torch.save({"model": sd}, tmp_path / "vq_ds16_c2i.pt")
    model = tok.load_tokenizer(tmp_path / "vq_ds16_c2i.pt")
    assert model.cfg.grid_size == 16 and model.cfg.codebook_size == 16384
    assert torch.equal(model.state_dict()["encoder.conv_in.weight"], sd["encoder.conv_in.weight"])
    del sd["quant_conv.bias"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save({"model": sd}, tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match=r"missing keys \['quant_conv.bias'\], unexpected keys \['extra.weight'\]"):
        tok.load_tokenizer(tmp_path / "bad.pt")


# -------------------------------------------------------------------------- model and sampling


def tiny_model(seed=0, **overrides):
    """The tiny preset in eval mode, with a random output head (the zero-init one predicts uniform
    logits everywhere, which would make every comparison pass)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**PRESETS["tiny"], "vocab_size": 64, "num_classes": 5, "grid_size": 4, **overrides}))
    torch.nn.init.normal_(model.output.weight, std=0.5)
    return model.eval()


def random_batch(model, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(model.config.vocab_size, (B, model.config.block_size), generator=g)
    labels = torch.randint(model.config.num_classes, (B,), generator=g)
    return codes, labels


@torch.no_grad()
def test_kv_cache_decoding_matches_full_forward():
    model = tiny_model()
    codes, labels = random_batch(model)
    T, prefix_len = codes.shape[1], 5
    full = model(codes, labels)  # (B, T, V)
    model.setup_cache(len(labels))
    cached = [model.prefill(labels, codes[:, :prefix_len])]  # predicts codes 0..prefix_len
    for t in range(prefix_len, T - 1):
        cached.append(model.decode(codes[:, t : t + 1], t))
    cached = torch.cat(cached, dim=1)
    assert full.abs().max() > 0.1
    assert (cached - full).abs().max() < 1e-5
    assert (model.prefill(labels, codes[:, :-1]) - full).abs().max() < 1e-5
    assert (model.prefill(labels, codes[:, :0]) - full[:, :1]).abs().max() < 1e-5


@torch.no_grad()
def test_forward_on_a_prefix_matches_full_forward():
    model = tiny_model()
    codes, labels = random_batch(model)
    assert (model(codes[:, :6], labels) - model(codes, labels)[:, :6]).abs().max() < 1e-5


@torch.no_grad()
def test_multi_code_decode_matches_one_at_a_time():
    model = tiny_model()
    codes, labels = random_batch(model)
    model.setup_cache(len(labels))
    model.prefill(labels, codes[:, :3])
    one_by_one = torch.cat([model.decode(codes[:, t : t + 1], t) for t in range(3, 9)], dim=1)
    # write garbage further on first: a rollback leaves stale entries that must stay invisible
    model.decode(torch.zeros_like(codes[:, 9:14]), 9)
    model.prefill(labels, codes[:, :3])
    at_once = model.decode(codes[:, 3:9], 3)  # (B, 6, V)
    assert (at_once - one_by_one).abs().max() < 1e-5


# ------------------------------------------------------- compiled decode and bf16 (the GPU paths, on a CPU)


@pytest.mark.slow  # five compilations, ~1 min on 2 cores
@torch.no_grad()
def test_compiled_decode_gives_the_eager_logits_and_codes():
    target, draft = tiny_model(0), tiny_model(1)
    codes, labels = random_batch(target, B=4)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731

    def decode_all():
        target.setup_cache(len(labels))
        logits = [target.prefill(labels, codes[:, :2])]
        logits += [target.decode(codes[:, t : t + 1], t) for t in range(2, 6)]  # one code per call
        logits.append(target.decode(codes[:, 6:9], 6))  # several, as a speculative target call
        target.clear_cache()
        return dict(logits=torch.cat(logits, 1),
                    greedy=generate(target, labels, cfg_scale=2.0, temperature=0),  # CFG: a batch of 8
                    speculative=speculative_generate(target, draft, labels, gamma=3, generator=g()),
                    zipar=mixed_rollout(target, codes, labels, generator=g(), window=2)[0])

    eager = decode_all()
    bystander = tiny_model(2)
    assert model_module.compile_decode(target, "compiled") is target and model_module.compile_decode(draft, "compiled")
    compiled = decode_all()
    # chosen per model by its caller: another model decodes as written, and "auto" is eager on a CPU
    assert bystander.decode_mode == "eager" and model_module.compile_decode(bystander, "auto").decode_mode == "eager"
    assert target.decode_mode == draft.decode_mode == "compiled"
    assert eager["logits"].abs().max() > 0.1 and (compiled["logits"] - eager["logits"]).abs().max() < 1e-5
    assert torch.equal(compiled["greedy"], eager["greedy"])
    assert torch.equal(compiled["speculative"][0], eager["speculative"][0])
    assert compiled["speculative"][1] == eager["speculative"][1]
    assert torch.equal(compiled["zipar"], eager["zipar"])


@torch.no_grad()
def test_bf16_autocast_sampling_runs_on_a_cpu_close_to_fp32():
    model = tiny_model()
    codes, labels = random_batch(model)
    full = model(codes, labels)
    with model_module.autocast("cpu", bf16=True):
        model.setup_cache(len(labels))
        assert model.layers[0].attention.kv_cache.k_cache.dtype == torch.bfloat16
        cached = torch.cat([model.prefill(labels, codes[:, :5]), model.decode(codes[:, 5:-1], 5)], 1)
        model.clear_cache()
        sampled = generate(model, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
        rollout, mask = mixed_rollout(model, codes, labels, generator=torch.Generator().manual_seed(0))
    assert cached.dtype == torch.float32 and model.output.weight.dtype == torch.float32  # weights stay fp32
    assert 0 < (cached - full).abs().max() < 0.05 * full.abs().max()  # bf16 rounding, not another model
    assert sampled.shape == codes.shape and 0 <= sampled.min() and sampled.max() < 64
    assert torch.equal(rollout[~mask], codes[~mask])
    assert isinstance(model_module.autocast("cpu"), contextlib.nullcontext)  # CPUs sample in fp32 by default


def test_bf16_autocast_training_loss_is_close_to_fp32():
    student, teacher = tiny_model(0).train(), tiny_model(1)
    codes, labels = random_batch(student, B=8)
    args = runs.get_args(["--method", "varkd", "--no-parallel"], methods=distill.METHODS)
    groups = torch.arange(64) // 4
    losses = []
    for bf16 in (False, True):
        with model_module.autocast("cpu", bf16=bf16):
            loss = distill.method_loss(args, student, student, teacher, codes, labels, groups,
                                       torch.Generator().manual_seed(0))
        student.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in student.parameters())
        losses.append(loss.item())
    assert losses[0] > 0.01 and abs(losses[1] - losses[0]) < 0.05 * losses[0]


@pytest.mark.slow  # compiles a training step and two decode graphs: ~1 min on 2 cores
def test_gpu_check_script_runs_its_paths_at_tiny_sizes_on_a_cpu():
    import bench
    figures = bench.gpu_check(torch.device("cpu"), student="tiny", teacher="tiny", grid=4, vocab=64, classes=5,
                              batch=4, sample_batch=3, steps=1, bf16=False)  # bf16 has its own tests above
    assert {"ce", "kd", "varkd"} <= set(figures) and "ddp" not in figures  # no 2 GPUs here: skipped, said so
    assert all(figures[m]["seconds"] > 0 and np.isfinite(figures[m]["loss"]) for m in ("ce", "kd", "varkd"))
    assert figures["ce"]["loss"] > figures["kd"]["loss"] > 0  # CE over 64 codes ~ log 64; a KL of near twins is small
    assert figures["greedy_agreement"] == 1.0  # fp32: compiled decoding draws the eager codes
    assert not hasattr(model_module, "_compiled_decode")  # no module-level switch: each caller picks per model


def test_generate_with_kv_cache_matches_reference_path():
    model = tiny_model()
    labels = torch.tensor([0, 1, 4, 4])
    for cfg_scale in (1.0, 3.0):
        cached = generate(model, labels, cfg_scale, generator=torch.Generator().manual_seed(0))
        reference = generate(model, labels, cfg_scale, generator=torch.Generator().manual_seed(0),
                             kv_cache=False)
        assert cached.shape == (4, model.config.block_size)
        assert torch.equal(cached, reference)
    assert not model.training and model.layers[0].attention.kv_cache is None


def test_generate_restores_training_mode():
    model = tiny_model().train()
    generate(model, torch.tensor([0]))
    assert model.training


def test_sampling_speed_times_each_architecture_once_and_every_guided_scale_alike(monkeypatch):
    small = GPTConfig(**{**PRESETS["tiny"], "vocab_size": 64, "num_classes": 5, "grid_size": 4})
    wide = GPTConfig(**{**asdict(small), "dim": 64})
    built, real = [], sample.GPT
    monkeypatch.setattr(sample, "GPT", lambda config: built.append(config) or real(config))
    speed = sample.sampling_speed({"a": small, "b": small, "c": wide}, [1.0, 2.0, 3.0], (4, 1), rounds=3, min_seconds=0.01)
    assert built == [small, wide]  # one model per architecture
    assert set(speed) == {(n, s, b) for n in "abc" for s in (1.0, 2.0, 3.0) for b in (4, 1)}
    for s, b in itertools.product((1.0, 2.0, 3.0), (4, 1)):
        assert speed["a", s, b] == speed["b", s, b] > 0  # one architecture, one figure
    assert all(speed[n, 2.0, b] == speed[n, 3.0, b] != speed[n, 1.0, b] for n in "abc" for b in (4, 1))


def test_cfg_scale_one_matches_plain_conditional_sampling():
    model = tiny_model()
    labels = torch.tensor([0, 2, 3])
    filters = dict(top_k=20, top_p=0.9)
    plain = generate(model, labels, 1.0, **filters, generator=torch.Generator().manual_seed(3))
    guided = generate(model, labels, 1.0 + 1e-6, **filters, generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain, guided)


@torch.no_grad()
def test_cfg_mixes_logits_as_uncond_plus_scale_times_difference():
    model = tiny_model()
    # make the class matter a lot, so guidance changes the greedy choice
    torch.nn.init.normal_(model.cls_embedding["embedding_table"].weight, std=3.0)
    labels, scale = torch.arange(5), 4.0
    start = torch.zeros(5, 1, dtype=torch.long)  # forward on the class token alone: logits of code 0
    cond = model(start, labels)[:, 0]  # (5, V)
    uncond = model(start, torch.full_like(labels, 5))[:, 0]
    expected = (uncond + scale * (cond - uncond)).argmax(-1)
    assert not torch.equal(expected, cond.argmax(-1))  # guidance must matter for the test to mean anything
    assert torch.equal(generate(model, labels, scale, temperature=0)[:, 0], expected)


def test_label_dropout_rate_in_training_and_none_in_eval():
    model = tiny_model(class_dropout=0.3)
    seen = []
    model.cls_embedding["embedding_table"].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    codes = torch.zeros(20000, 2, dtype=torch.long)
    labels = torch.randint(5, (20000,))
    model.train()(codes, model.drop_labels(labels))
    dropped = (seen[-1] == 5).float().mean().item()
    assert abs(dropped - 0.3) < 0.02
    assert torch.equal(seen[-1][seen[-1] != 5], labels[seen[-1] != 5])
    model.eval()(codes, model.drop_labels(labels))
    assert torch.equal(seen[-1], labels)
    model.train()(codes, labels)  # forward itself never drops: the loop decides, once per batch
    assert torch.equal(seen[-1], labels)


def test_rope_class_row_is_zero_and_grid_rows_are_not():
    model = tiny_model()
    table = model.freqs_cis  # (1 + T, head_dim // 2, 2)
    assert table.shape == (1 + model.config.block_size, 8, 2)
    assert torch.all(table[0] == 0)
    assert torch.all(table[1:].abs().sum((-1, -2)) > 0)
    # LlamaGen's layout: the first half of the pairs turns with the row, the second with the column
    grid, quarter = model.config.grid_size, 4  # head_dim 16
    freqs = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    row, col = 2, 3
    angles = table[1 + row * grid + col]  # (head_dim // 2, 2) = (cos, sin)
    assert torch.allclose(angles[:quarter, 0], torch.cos(row * freqs))
    assert torch.allclose(angles[quarter:, 1], torch.sin(col * freqs))
    assert "freqs_cis" not in model.state_dict()


def test_llamagen_gpt_b_state_dict_loads_strictly_into_preset_b(tmp_path):
    rows = [line.split("\t") for line in (FORMATS / "llamagen_gpt_b_c2i_keys.tsv").read_text().splitlines()
            if line and not line.startswith("#")]
    state = {key: torch.randn(ast.literal_eval(shape)) for key, shape, _ in rows}
    assert sum(v.numel() for v in state.values()) == 110_888_448
    torch.save({"model": dict(state, freqs_cis=torch.zeros(257, 32, 2))}, tmp_path / "c2i_B_256.pt")
    model = load_checkpoint(tmp_path / "c2i_B_256.pt", preset="B")
    c = model.config
    assert (c.vocab_size, c.num_classes, c.grid_size, c.dim, c.n_layer) == (16384, 1000, 16, 768, 12)
    assert torch.equal(model.layers[11].feed_forward.w2.weight, state["layers.11.feed_forward.w2.weight"])
    assert not model.training


def save_tiny(path, model, edit=None):
    state = model.state_dict()
    if edit:
        edit(state)
    ckpt = {"model": state, "config": asdict(model.config), "step": 0}
    torch.save({**ckpt, "integrity": checks.integrity(ckpt)}, path)  # as every save of ours records it


def test_our_checkpoint_round_trips(tmp_path):
    model = tiny_model()
    save_tiny(tmp_path / "m.pt", model)
    loaded = load_checkpoint(tmp_path / "m.pt")
    codes, labels = random_batch(model)
    assert loaded.config == model.config
    assert torch.equal(loaded(codes, labels), model(codes, labels))


def test_unknown_and_missing_keys_are_refused_by_name(tmp_path):
    model = tiny_model()
    save_tiny(tmp_path / "extra.pt", model, lambda sd: sd.update({"layers.0.attention.bias": torch.zeros(3)}))
    with pytest.raises(SystemExit, match="layers.0.attention.bias"):
        load_checkpoint(tmp_path / "extra.pt")
    save_tiny(tmp_path / "missing.pt", model, lambda sd: sd.pop("layers.1.ffn_norm.weight"))
    with pytest.raises(SystemExit, match="layers.1.ffn_norm.weight"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_user_errors_are_one_sentence(tmp_path):
    with pytest.raises(SystemExit, match="nowhere.pt"):
        load_checkpoint(tmp_path / "nowhere.pt")
    model = tiny_model()
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(SystemExit, match="preset"):
        load_checkpoint(tmp_path / "bare.pt")
    with pytest.raises(SystemExit, match="does not fit preset student"):  # shapes of another preset
        load_checkpoint(tmp_path / "bare.pt", preset="student")
    assert load_checkpoint(tmp_path / "bare.pt", preset="tiny", grid_size=4).config == model.config
    save_tiny(tmp_path / "ours.pt", model)
    with pytest.raises(SystemExit, match="not preset B"):
        load_checkpoint(tmp_path / "ours.pt", preset="B")


def test_llamagen_parameter_counts():
    for preset, count in (("B", 110_888_448), ("L", 342_910_976)):
        with torch.device("meta"):
            model = GPT(GPTConfig(**PRESETS[preset], vocab_size=16384, num_classes=1000, grid_size=16))
        assert sum(p.numel() for p in model.parameters()) == count


def test_top_k_and_top_p_keep_the_right_codes():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).log_softmax(-1)  # probs ~ .64 .24 .09 .03 .01
    assert torch.equal(filtered_probs(logits, top_k=2) > 0, torch.tensor([[True, True, False, False, False]]))
    # the nucleus is the smallest head holding top_p: .64 < .8 <= .64 + .24
    nucleus = filtered_probs(logits, top_p=0.8)
    assert torch.equal(nucleus > 0, torch.tensor([[True, True, False, False, False]]))
    assert torch.allclose(nucleus.sum(-1), torch.ones(1))
    assert torch.equal(filtered_probs(logits, top_p=0.01) > 0, torch.tensor([[True, False, False, False, False]]))
    assert torch.equal(sample_logits(logits.repeat(3, 1), temperature=0), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------------------- speculative sampling


def test_with_the_target_as_its_own_draft_every_draft_is_accepted():
    model = tiny_model()  # 16 codes: rounds at codes 0, 5, 10 draft 4 each and keep 5; code 15 alone
    for filters in (dict(cfg_scale=2.0), dict(temperature=0.7, top_k=10, top_p=0.9)):
        codes, counts = speculative_generate(model, model, torch.arange(5), gamma=4, **filters,
                                             generator=torch.Generator().manual_seed(0))
        assert codes.shape == (5, 16) and counts["accepted"] == counts["drafted"] == 5 * 12
        assert speculative_figures(counts) == dict(acceptance=1.0, codes_per_call=16 / 5)
        assert model.layers[0].attention.kv_cache is None and not model.training


@torch.no_grad()
def enumerable_law():
    """Two random models that disagree, on 3 codes and a 2x2 grid (all 81 sequences enumerable), the
    filters they sample with, and a chi-square p-value of samples against the target's exact law."""
    from scipy.stats import chisquare
    target, draft = (tiny_model(seed, vocab_size=3, grid_size=2, num_classes=2) for seed in (0, 1))
    for model in (target, draft):
        torch.nn.init.normal_(model.output.weight, std=0.3)
    filters = dict(cfg_scale=2.0, temperature=0.9, top_k=2)
    seqs = torch.tensor(list(itertools.product(range(3), repeat=4)))  # (81, 4)
    labels = torch.zeros(len(seqs), dtype=torch.long)
    cond, uncond = target(seqs, labels), target(seqs, torch.full_like(labels, 2))
    probs = filtered_probs((uncond + 2.0 * (cond - uncond)).flatten(0, 1), 0.9, 2).view(81, 4, 3)
    exact = probs.gather(-1, seqs[..., None])[..., 0].double().prod(1)  # (81,) the target's sequence law
    support = exact > 0

    def p_value(codes):
        counts = torch.bincount((codes * torch.tensor([27, 9, 3, 1])).sum(1), minlength=81)
        if counts[~support].sum():  # a sequence the target never draws
            return 0.0
        return chisquare(counts[support].double(), exact[support] / exact.sum() * len(codes)).pvalue
    return target, draft, filters, p_value


@torch.no_grad()
def test_speculative_samples_follow_the_targets_exact_distribution():
    target, draft, filters, p_value = enumerable_law()
    g, n = torch.Generator().manual_seed(0), 2000
    # batches of 1 to 40 rows, so that rows are cut short by their batch's shortest accepted run (a
    # batch of 1 never is), with gamma 2 and 3 (rounds with every draft kept, then the target's code)
    samples, totals = [], dict(accepted=0, drafted=0)
    for i, size in enumerate(itertools.islice(itertools.cycle([1, 4, 16, 40]), 4 * n // 61 + 4)):
        codes, counts = speculative_generate(target, draft, torch.zeros(size, dtype=torch.long), gamma=2 + i % 2,
                                             **filters, generator=g)
        samples.append(codes)
        totals = {k: totals[k] + counts[k] for k in totals}
    samples = torch.cat(samples)[:n]
    assert 0.2 < totals["accepted"] / totals["drafted"] < 0.9  # the residual path is taken, often
    assert p_value(samples) > 1e-3
    # the same test tells the draft's own samples apart: it has the power to fail
    assert p_value(generate(draft, torch.zeros(n, dtype=torch.long), **filters, generator=g)) < 1e-6


@torch.no_grad()
def test_speculative_jacobi_decoding_draws_the_models_own_distribution():
    target, draft, filters, p_value = enumerable_law()
    g, n, samples, totals = torch.Generator().manual_seed(0), 2000, [], dict(accepted=0, drafted=0, target_calls=0)
    # batches of 1 to 40 rows (rows cut short by their batch's shortest accepted run), windows of 1 to 3
    for i, size in enumerate(itertools.islice(itertools.cycle([1, 4, 16, 40]), 4 * n // 61 + 4)):
        codes, counts = sample.jacobi_generate(target, torch.zeros(size, dtype=torch.long), window=1 + i % 3,
                                               **filters, generator=g)
        samples.append(codes)
        totals = {k: totals[k] + counts[k] for k in totals}
    assert 0.1 < totals["accepted"] / totals["drafted"] < 0.95  # drafts are kept, and rejected, often
    assert p_value(torch.cat(samples)[:n]) > 1e-3
    assert p_value(generate(draft, torch.zeros(n, dtype=torch.long), **filters, generator=g)) < 1e-6  # the power to fail


@torch.no_grad()
def test_gsd_grouping_accepts_more_drafts_and_keeps_the_outputs_shape():
    model, groups = tiny_model(0), torch.arange(64) // 16
    labels, g = torch.arange(5).repeat(4), lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain, counts = sample.jacobi_generate(model, labels, window=4, generator=g())
    same, _ = sample.jacobi_generate(model, labels, window=4, generator=g(), groups=groups, threshold=0.0)
    assert torch.equal(plain, same)  # threshold 0: no grouping, exact speculative Jacobi decoding
    grouped, grouped_counts = sample.jacobi_generate(model, labels, window=4, generator=g(), groups=groups, threshold=0.3)
    rate = lambda c: c["accepted"] / c["drafted"]  # noqa: E731
    assert rate(grouped_counts) > rate(counts) + 0.05 and grouped_counts["target_calls"] < counts["target_calls"]
    assert grouped.shape == plain.shape == (20, 16) and 0 <= grouped.min() and grouped.max() < 64
    clusters = sample.gsd_clusters(torch.tensor([[[0.3, 0.25, 0.05, 0.4]]]), torch.tensor([[0]]),
                                   torch.tensor([0, 0, 0, 1]), 0.1)
    assert clusters.tolist() == [[[True, True, False, False]]]  # its group, within 0.1 of its probability


@torch.no_grad()
def test_after_a_rejection_the_targets_cache_equals_the_cache_of_the_accepted_prefix():
    target, draft = tiny_model(0), tiny_model(1)
    labels = torch.tensor([0, 3])
    snapshots, decode = [], target.decode

    def spy(codes, start):  # before each target call: the cache at positions 0..start (class + codes < start)
        cache = [(layer.attention.kv_cache.k_cache[:, :, : start + 1].clone(),
                  layer.attention.kv_cache.v_cache[:, :, : start + 1].clone()) for layer in target.layers]
        snapshots.append((start, codes.shape[1], cache))
        return decode(codes, start)

    target.decode = spy
    codes, counts = speculative_generate(target, draft, labels, gamma=4, cfg_scale=2.0,
                                         generator=torch.Generator().manual_seed(0))
    del target.decode
    rollbacks = sum(start < prev + fed for (prev, fed, _), (start, _, _) in zip(snapshots, snapshots[1:]))
    assert counts["accepted"] < counts["drafted"] and rollbacks >= 2
    both = torch.cat([labels, torch.full_like(labels, 5)])
    for start, _, cache in snapshots:
        target.setup_cache(len(both))
        target.prefill(both, torch.cat([codes, codes])[:, :start])  # the accepted prefix, from scratch
        for layer, (k, v) in zip(target.layers, cache):
            assert torch.allclose(layer.attention.kv_cache.k_cache[:, :, : start + 1], k, atol=1e-5)
            assert torch.allclose(layer.attention.kv_cache.v_cache[:, :, : start + 1], v, atol=1e-5)
    target.clear_cache()


def test_relaxed_target_moves_at_most_delta_onto_the_draft_from_its_group():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.05, 0.05, 0.4], [0.1, 0.0, 0.5, 0.4]])
    groups = torch.tensor([0, 0, 1, 1])
    relaxed = relax(probs, torch.tensor([0, 1, 1]), groups, delta=0.15)
    # the draft gains min(delta, its group's other mass), taken from them in proportion; other groups keep theirs
    assert torch.allclose(relaxed, torch.tensor([[0.25, 0.05, 0.3, 0.4], [0.35, 0.2, 0.05, 0.4],
                                                 [0.0, 0.1, 0.5, 0.4]]))
    assert ((relaxed - probs).abs().sum(-1) / 2 <= 0.15 + 1e-6).all()
    # relaxed acceptance with 4 groups of 16 codes accepts more of a draft's codes than the exact test
    target, draft, g = tiny_model(0), tiny_model(1), torch.Generator().manual_seed(0)
    rates = [speculative_figures(speculative_generate(target, draft, torch.arange(5).repeat(4), gamma=4,
                                                      groups=torch.arange(64) // 16, delta=delta, generator=g)[1])
             ["acceptance"] for delta in (0.0, 0.3)]
    assert rates[1] > rates[0] + 0.05
    with pytest.raises(ValueError, match="codebook groups"):
        speculative_generate(target, draft, torch.arange(2), delta=0.1)
    with pytest.raises(ValueError, match="draft predicts 4x4 codes of 32"):
        speculative_generate(target, tiny_model(1, vocab_size=32), torch.arange(2))


# ------------------------------------------------------------------------------ training loop


@pytest.fixture(scope="module")
def trained_setup(tmp_path_factory, small_tokenizer):
    """An out-dir holding the small tokenizer; the token cache is built on first use."""
    out = tmp_path_factory.mktemp("out")
    tok.save_tokenizer(small_tokenizer, out / "tokenizer.pt")
    return out


def run_distill(out, *extra):
    return distill.main(["--out-dir", str(out), "--tokenizer", str(out / "tokenizer.pt"), "--size", "tiny", "--batch-size", "16",
                         "--eval-interval", "1000", "--eval-seqs", "50", "--eval-samples", "0", *extra])


@pytest.mark.slow
def test_training_lowers_the_held_out_nll(trained_setup):
    metrics = run_distill(trained_setup, "--max-iters", "40", "--lr", "3e-3", "--warmup", "5",
                          "--out", str(trained_setup / "lower.pt"))
    assert metrics["test_nll"] < np.log(256) - 0.5  # a zero-initialised head starts at log|V|


@pytest.mark.slow  # the compilation of a training step: ~1 min on 2 cores
def test_compiled_training_gives_the_eager_weights(trained_setup):
    common = ["--max-iters", "4", "--warmup", "1", "--lr", "3e-3"]
    eager = run_distill(trained_setup, *common, "--out", str(trained_setup / "eager.pt"))
    compiled = run_distill(trained_setup, *common, "--compile", "--out", str(trained_setup / "compiled.pt"))
    a, b = (torch.load(trained_setup / name, weights_only=True)["model"] for name in ("eager.pt", "compiled.pt"))
    assert eager["test_nll"] < np.log(256) - 0.01  # four steps moved it off the uniform start
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert abs(eager["test_nll"] - compiled["test_nll"]) < 1e-4


def distill_cmd(out, *extra):
    return [sys.executable, "distill.py", "--out-dir", str(out), "--tokenizer", str(out / "tokenizer.pt"), "--size", "tiny", "--batch-size", "16",
            "--eval-interval", "1000", "--eval-seqs", "50", "--eval-samples", "0", *extra]


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_weights_as_an_uninterrupted_run(trained_setup):
    common = ["--max-iters", "200", "--warmup", "5", "--ckpt-interval", "10"]
    run_distill(trained_setup, *common, "--out", str(trained_setup / "full.pt"))
    part = trained_setup / "part.pt"
    proc = subprocess.Popen(distill_cmd(trained_setup, *common, "--out", str(part)), cwd=Path(__file__).parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not part.exists():  # the first checkpoint, at step 10
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.005)
    proc.kill()  # SIGKILL: no cleanup, no last checkpoint
    proc.wait()
    assert torch.load(part, weights_only=True)["step"] < 200
    with pytest.raises(SystemExit, match=r"stopped at step \d+ of 200: pass --resume"):
        run_distill(trained_setup, *common, "--out", str(part))
    run_distill(trained_setup, *common, "--out", str(part), "--resume")
    full = torch.load(trained_setup / "full.pt", weights_only=True)
    resumed = torch.load(part, weights_only=True)
    assert resumed["step"] == full["step"] == 200
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k


@pytest.mark.slow
def test_existing_checkpoint_is_never_overwritten_without_resume(trained_setup):
    path = trained_setup / "keep.pt"
    path.write_bytes(b"precious")
    with pytest.raises(SystemExit, match="exists and is not a checkpoint"):
        run_distill(trained_setup, "--max-iters", "2", "--out", str(path))
    assert path.read_bytes() == b"precious"


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_from_another_tokenizer(trained_setup, tmp_path):
    run_distill(trained_setup, "--max-iters", "2", "--out", str(tmp_path / "a.pt"))
    ckpt = torch.load(tmp_path / "a.pt", weights_only=True)
    ckpt["fingerprints"]["tokenizer"] = "0123456789abcdef"
    torch.save(ckpt, tmp_path / "a.pt")
    with pytest.raises(SystemExit, match="was built from another tokenizer"):
        run_distill(trained_setup, "--max-iters", "4", "--out", str(tmp_path / "a.pt"), "--resume")


@pytest.mark.slow
def test_a_finished_run_is_reused_only_with_the_same_flags(trained_setup, tmp_path, capsys):
    run_distill(trained_setup, "--max-iters", "2", "--out", str(tmp_path / "a.pt"))
    before = (tmp_path / "a.pt").stat().st_mtime_ns
    run_distill(trained_setup, "--max-iters", "2", "--out", str(tmp_path / "a.pt"))
    assert "reusing it" in capsys.readouterr().out and (tmp_path / "a.pt").stat().st_mtime_ns == before
    with pytest.raises(SystemExit, match=r"was trained with --max-iters 2 \(now 3\), --lr 0.003 \(now 0.002\)"):
        run_distill(trained_setup, "--max-iters", "3", "--lr", "2e-3", "--out", str(tmp_path / "a.pt"))


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(trained_setup, tmp_path,
                                                                                monkeypatch):
    calls, real = [], distill.method_loss

    def poisoned(*args):
        calls.append(1)
        return real(*args) * (float("nan") if len(calls) == 8 else 1.0)

    monkeypatch.setattr(distill, "method_loss", poisoned)
    with pytest.raises(SystemExit, match=r"at step 7: training diverged; .*nan.pt keeps step 5 \(finite weights\); "
                                         r"resumed with the same flags it would diverge again"):
        run_distill(trained_setup, "--max-iters", "20", "--ckpt-interval", "5", "--out", str(tmp_path / "nan.pt"))
    ckpt = torch.load(tmp_path / "nan.pt", weights_only=True)
    assert ckpt["step"] == 5 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_batches_cover_each_epoch_once_and_depend_only_on_the_step():
    n, b = 50, 16
    seen = torch.cat([data.batch_indices(s, n, b, seed=3) for s in range(25)])  # 400 = 8 epochs
    for e in range(8):
        assert sorted(seen[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert torch.equal(data.batch_indices(7, n, b, 3), seen[7 * b:8 * b])
    assert not torch.equal(data.batch_indices(7, n, b, 4), seen[7 * b:8 * b])


# ------------------------------------------------------------------------------ the KD maths


def random_logits(*shape, seed=0, scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def kl(p_logits, q_logits):
    """KL(p || q) per position, written out from probabilities."""
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    return (p * (p.log() - q.log())).sum(-1)


def test_gkd_beta_0_is_forward_kl_beta_1_reverse_kl_and_half_the_jsd():
    s, t = random_logits(3, 5, 7, seed=1), random_logits(3, 5, 7, seed=2)
    assert torch.allclose(distill.gkd_loss(s, t, 0.0), kl(t, s).mean(), atol=1e-6)
    assert torch.allclose(distill.gkd_loss(s, t, 1.0), kl(s, t).mean(), atol=1e-6)
    p, q = t.softmax(-1), s.softmax(-1)
    m = 0.5 * (p + q)
    js = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    assert torch.allclose(distill.gkd_loss(s, t, 0.5), js.mean(), atol=1e-6)
    assert distill.gkd_loss(s, t, 0.5) < np.log(2)  # the JSD is bounded by log 2


def test_gkd_on_a_mask_averages_the_masked_positions_only_and_each_method_has_its_default():
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    per = distill.jsd(torch.log_softmax(s, -1), torch.log_softmax(t, -1), 0.5)
    assert torch.allclose(distill.gkd_loss(s, t, 0.5, mask), per[mask].mean())
    assert torch.allclose(distill.gkd_loss(s, t, 0.5), per.mean()) and not torch.allclose(per[mask].mean(), per.mean())
    assert [distill.runs.get_args(["--method", m], methods=distill.METHODS).supervise for m in ("onpolicy", "varkd")] == ["prefix-kd"] * 2
    assert distill.runs.get_args(["--method", "onpolicy", "--supervise", "sampled"], methods=distill.METHODS).supervise == "sampled"


def test_kd_of_identical_logits_is_zero_and_scales_with_tau_squared():
    s = random_logits(2, 4, 9)
    assert distill.kd_loss(s, s.clone(), tau=2.0).abs() < 1e-6
    t = random_logits(2, 4, 9, seed=5)
    assert torch.allclose(distill.kd_loss(s, t, tau=2.0), kl(t / 2, s / 2).mean() * 4, atol=1e-6)


def test_taid_at_t_1_is_kd_at_t_0_nothing_and_its_t_rises_on_the_line_or_faster():
    s, t = random_logits(2, 4, 9, seed=6).requires_grad_(), random_logits(2, 4, 9, seed=7)
    assert torch.equal(distill.taid_loss(s, t, 1.0), distill.kd_loss(s, t, 1.0))
    zero = distill.taid_loss(s, t, 0.0)
    zero.backward()
    assert zero == 0 and s.grad.abs().max() < 1e-7  # the target is the student itself, held fixed
    mid = (1 - 0.5) * s.detach() + 0.5 * t  # the interpolated logits, the student's held fixed
    assert torch.allclose(distill.taid_loss(s, t, 0.5), kl(mid, s).mean(), atol=1e-6)
    args = distill.runs.get_args(["--method", "taid", "--max-iters", "100"], methods=distill.METHODS)
    assert (args.taid_t_start, args.taid_alpha, args.taid_beta, args.init) == (0.4, 5e-4, 0.99, "out/kd/ckpt.pt")
    state = {"t": 0.4, "prev": None, "momentum": 0.0}
    state = distill.taid_step(state, 3.0, 0, args)
    assert state == {"t": 0.4, "prev": 3.0, "momentum": 0.0}  # the first step only records its loss
    ts = []
    for step in range(1, 100):  # a falling loss
        state = distill.taid_step(state, 3.0 - 0.01 * step, step, args)
        ts.append(state["t"])
    assert all(b >= a for a, b in zip(ts, ts[1:])) and ts[-1] <= 1.0 and state["momentum"] > 0
    assert all(t_ >= 0.4 + 0.6 * step / 100 - 1e-12 for step, t_ in enumerate(ts, 1))  # never below the line
    fast = argparse.Namespace(**{**vars(args), "taid_alpha": 0.5})
    quick = distill.taid_step({"t": 0.4, "prev": 3.0, "momentum": 1.0}, 2.9, 1, fast)
    assert quick["t"] > 0.4 + 0.6 / 100 + 0.1  # the adaptive part: a falling loss pushes t above the line


def test_varkd_with_one_group_per_code_no_weights_and_full_mask_is_reverse_kl():
    s, t = random_logits(2, 6, 8, seed=3), random_logits(2, 6, 8, seed=4)
    ones = torch.ones(2, 6)
    got = distill.varkd_loss(s, t, ones, ones.bool(), groups=torch.arange(8))
    assert torch.allclose(got, kl(s, t).mean(), atol=1e-5)
    assert torch.allclose(distill.varkd_loss(s, t, ones, ones.bool()), kl(s, t).mean(), atol=1e-6)


def test_varkd_averages_weighted_kl_over_mask_positions_only():
    s, t = random_logits(1, 4, 5, seed=6), random_logits(1, 4, 5, seed=7)
    weights = torch.tensor([[0.5, 1.0, 0.25, 2.0]])
    mask = torch.tensor([[False, True, True, False]])
    expected = (1.0 * kl(s, t)[0, 1] + 0.25 * kl(s, t)[0, 2]) / 2
    assert torch.allclose(distill.varkd_loss(s, t, weights, mask), expected, atol=1e-6)


def test_codebook_groups_sum_probabilities_before_the_kl():
    # 4 codes in 2 groups {0, 1} and {2, 3}: student and teacher split each group's mass differently
    # but agree on the group totals (0.75 / 0.25), so the relaxed KL is 0 while the plain one is not
    s = torch.tensor([[[0.70, 0.05, 0.20, 0.05]]]).log()
    t = torch.tensor([[[0.05, 0.70, 0.05, 0.20]]]).log()
    groups = torch.tensor([0, 0, 1, 1])
    one, mask = torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool)
    assert distill.varkd_loss(s, t, one, mask, groups).abs() < 1e-6
    assert distill.varkd_loss(s, t, one, mask) > 0.5
    t2 = torch.tensor([[[0.45, 0.05, 0.25, 0.25]]]).log()  # group totals 0.5 / 0.5
    q_s, q_t = torch.tensor([0.75, 0.25]), torch.tensor([0.5, 0.5])
    expected = (q_s * (q_s / q_t).log()).sum()
    assert torch.allclose(distill.varkd_loss(s, t2, one, mask, groups), expected, atol=1e-6)


def test_group_logp_is_exact_for_groups_of_any_mass():
    logits = torch.tensor([[[0.0, -150.0, -160.0, 5.0]]], requires_grad=True)  # group 1 holds ~e^-155 of the mass
    groups = torch.tensor([0, 1, 1, 0])
    got = distill.group_logp(logits, groups, 2)
    logp = logits.double().log_softmax(-1)
    expected = torch.stack([logp[..., [0, 3]].logsumexp(-1), logp[..., [1, 2]].logsumexp(-1)], -1)
    assert torch.allclose(got.double(), expected, rtol=1e-5) and got[0, 0, 1] < -150
    got[0, 0, 1].backward()
    assert logits.grad[0, 0, 1] > 0.5  # a gradient, not a clamp


def prefix_setup(supervise, seed=0):
    """A varkd step on a rollout (lambda 1) of a tiny student, with the student's logits kept for
    their gradient: the supervised positions are those whose logits get one."""
    student, teacher = tiny_model(seed).train(), tiny_model(seed + 1)
    codes, labels = random_batch(student, B=6)
    args = runs.get_args(["--method", "varkd", "--no-parallel", "--supervise", supervise, "--no-groups"], methods=distill.METHODS)
    kept = {}

    def step_fn(c, y):
        kept["logits"] = student(c, y)
        kept["logits"].retain_grad()
        return kept["logits"]

    loss = distill.method_loss(args, step_fn, student, teacher, codes, labels, None, torch.Generator().manual_seed(0))
    loss.backward()
    return kept["logits"].grad.abs().sum(-1), teacher, codes, labels  # (B, T)


def test_prefix_kd_gives_every_position_a_signal_and_sampled_leaves_the_prefix_out():
    grad_prefix_kd = prefix_setup("prefix-kd")[0]
    grad_sampled = prefix_setup("sampled")[0]
    prefix = grad_sampled == 0  # the real prefix of each rollout (the same rollout: same generator)
    assert prefix.any(1).all() and not prefix.all(1).any()
    assert (grad_prefix_kd > 0).all()  # every position a sampler draws gets a signal
    T = prefix.shape[1]
    assert prefix[:, :int(0.25 * T)].all()  # the first quarter, never trained under "sampled"


def test_prefix_kd_is_forward_kl_on_the_prefix_and_weighted_reverse_kl_on_the_rest():
    student, teacher = tiny_model(0).train(), tiny_model(1)
    codes, labels = random_batch(student, B=6)
    args = runs.get_args(["--method", "varkd", "--no-parallel", "--no-groups"], methods=distill.METHODS)  # prefix-kd by default
    loss = distill.method_loss(args, student, student, teacher, codes, labels, None, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    torch.rand(1, generator=g)  # the step's draw of rollout or data
    rolled, sampled = mixed_rollout(student, codes, labels, args.prefix_frac, g)
    s, t = student(rolled, labels), teacher(rolled, labels)
    weights = distill.entropy_weights(t, args.threshold, sampled)
    per = torch.where(sampled, weights * kl(s, t), kl(t, s))  # reverse KL weighted, forward KL on the prefix
    assert torch.allclose(loss, per.mean(), atol=1e-5)


def test_the_guided_target_is_the_teachers_own_at_scale_1_and_what_the_guided_sampler_draws_from(monkeypatch):
    teacher, student = tiny_model(1), tiny_model(0).train()
    codes, labels = random_batch(student, B=6)
    labels[0] = student.config.num_classes  # a dropped label
    assert torch.equal(distill.teacher_target(teacher, codes, labels, 1.0), teacher(codes, labels))  # to the bit
    # every method takes it: unchanged at S = 1, moved at S = 2
    own = distill.teacher_target
    for method in ("kd", "seqkd", "onpolicy", "varkd"):
        losses = {}
        for scale, target in [(1, own), (1, lambda t, c, l, s: t(c, l)), (2, own)]:
            monkeypatch.setattr(distill, "teacher_target", target)
            args = runs.get_args(["--method", method, "--lam", "1", "--teacher-cfg", str(scale)], methods=distill.METHODS)
            losses.setdefault(scale, []).append(distill.method_loss(args, student, student, teacher, codes, labels, None,
                                                                     torch.Generator().manual_seed(0)))
        assert torch.equal(*losses[1]) and not torch.allclose(losses[2][0], losses[1][0]), method
    monkeypatch.setattr(distill, "teacher_target", own)
    # S = 2: the logits generate() mixes and samples from, on the context it sampled
    drawn = []
    real_sample = sample.sample_logits
    monkeypatch.setattr(sample, "sample_logits", lambda logits, *a, **k: drawn.append(logits) or real_sample(logits, *a, **k))
    labels = torch.arange(5)
    out = generate(teacher, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    target = distill.teacher_target(teacher, out, labels, 2.0)
    assert torch.allclose(target, torch.stack(drawn, 1), atol=1e-4)
    null = torch.full_like(labels, 5)  # a dropped label: the teacher's unconditional logits
    assert torch.equal(distill.teacher_target(teacher, out, null, 2.0), teacher(out, null))
    assert runs.get_args(["--method", "seqkd", "--teacher-cfg", "3"], methods=distill.METHODS).pool_cfg == 3  # SeqKD samples what it is taught
    for method in ("ce", "cca"):
        with pytest.raises(SystemExit):
            runs.get_args(["--method", method, "--teacher-cfg", "2"], methods=distill.METHODS)


def test_cca_is_the_contrastive_loss_of_its_paper_and_separates_the_classes_it_trains_on():
    gap, negative_gap = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 1.0, -1.0])
    unconditional = torch.tensor([False, False, True])
    beta, lam = 0.5, 10.0
    positive = -F.logsigmoid(beta * gap)
    negative = torch.stack([-lam * F.logsigmoid(-beta * negative_gap[0]), -lam * F.logsigmoid(-beta * negative_gap[1]),
                            -F.logsigmoid(beta * negative_gap[2])])  # a dropped label is a positive on both terms
    assert torch.allclose(distill.cca_loss(gap, negative_gap, unconditional, beta, lam),
                          (positive.mean() + negative.mean()) / lam)
    # one step of the method: at the start the model is its reference, every log-ratio 0
    model = tiny_model(0).train()
    reference = copy.deepcopy(model).requires_grad_(False)
    codes, labels = random_batch(model, B=8)
    labels[:2] = model.config.num_classes
    args = runs.get_args(["--method", "cca"], methods=distill.METHODS)
    g = lambda: torch.Generator().manual_seed(0)
    loss = distill.method_loss(args, model, model, reference, codes, labels, None, g())
    n_null = 2
    expected = math.log(2) * (1 + (n_null + (8 - n_null) * args.cca_lambda) / 8) / args.cca_lambda
    assert abs(loss.item() - expected) < 1e-5
    # trained on a batch, the model prefers each image's own class over the others more than its reference
    def margin(m):
        own = distill.sequence_logp(m(codes, labels), codes)
        others = torch.stack([distill.sequence_logp(m(codes, torch.full_like(labels, c)), codes) for c in range(5)])
        return (own - others.logsumexp(0))[2:].mean().item()  # the rows with a real label
    before = margin(reference)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(20):
        opt.zero_grad()
        distill.method_loss(args, model, model, reference, codes, labels, None, torch.Generator().manual_seed(step)).backward()
        opt.step()
    assert margin(model) > before + 1.0


def test_entropy_weights_are_one_minus_normalised_entropy_and_truncate_after_first_low():
    V = 16
    confident, uniform = torch.full((V,), -20.0), torch.zeros(V)
    confident[3] = 20.0
    t = torch.stack([confident, uniform, confident, confident])[None]  # (1, 4, V)
    alpha = distill.entropy_weights(t, threshold=None)
    assert torch.allclose(alpha, torch.tensor([[1.0, 0.0, 1.0, 1.0]]), atol=1e-4)
    truncated = distill.entropy_weights(t, threshold=0.1)
    assert torch.allclose(truncated, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), atol=1e-4)
    # a low alpha outside the supervised positions (the real prefix) does not truncate
    mask = torch.tensor([[False, False, True, True]])
    assert torch.allclose(distill.entropy_weights(t, 0.1, mask), alpha, atol=1e-4)
    half = torch.tensor([0.0] * 4 + [-50.0] * (V - 4))  # uniform over 4 of 16: alpha = 1 - log4/log16
    assert torch.allclose(distill.entropy_weights(half[None, None], None), torch.tensor([[0.5]]), atol=1e-5)


@pytest.mark.parametrize("grid, window", [(5, 0), (5, 4), (14, 4)])  # at 14, rows' stand-ins lie inside the prefix
def test_mixed_rollout_keeps_the_prefix_and_samples_only_the_suffix(grid, window):
    model = tiny_model(grid_size=grid)
    codes, labels = random_batch(model, B=16)
    out, mask = mixed_rollout(model, codes, labels, (0.25, 0.75), torch.Generator().manual_seed(0), window)
    T = codes.shape[1]
    k = (~mask).sum(1)  # prefix lengths
    assert torch.equal(mask, torch.arange(T)[None] >= k[:, None])  # mask = exactly the positions >= k
    assert int(k.min()) >= int(0.25 * T) and int(k.max()) <= int(0.75 * T) and len(set(k.tolist())) > 1
    assert torch.equal(out[~mask], codes[~mask])  # the real prefix is kept
    assert (out[mask] != codes[mask]).float().mean() > 0.8  # the suffix is resampled (64 codes)
    assert model.layers[0].attention.kv_cache is None and not model.training


def test_sequential_rollout_samples_from_the_student_distribution():
    # with the same generator, the sequential rollout of a single example equals generate()'s
    # cached sampling continued from the real prefix: check the first sampled code's distribution
    model = tiny_model(grid_size=4)
    codes, labels = random_batch(model, B=1)
    codes, labels = codes.repeat(4000, 1), labels.repeat(4000)
    out, mask = mixed_rollout(model, codes, labels, (0.5, 0.5), torch.Generator().manual_seed(1))
    k = int((~mask[0]).sum())
    with torch.no_grad():
        p = model(codes[:1], labels[:1])[0, k].softmax(-1)  # p(code k | class, real prefix)
    freq = torch.bincount(out[:, k], minlength=p.numel()).float() / len(out)
    assert (freq - p).abs().max() < 0.03


def test_zipar_schedule_covers_every_code_once_and_waits_for_window_codes_of_the_row_above():
    grid, window = 7, 5
    steps = zipar_schedule(grid, 10, window)
    flat = [p for s in steps for p in s]
    assert sorted(flat) == list(range(10, 49))
    when = {p: i for i, s in enumerate(steps) for p in s}
    for p in flat:
        r, c = divmod(p, grid)
        if c > 0 and p - 1 >= 10:
            assert when[p] > when[p - 1]
        above = (r - 1) * grid + min(c + window - 1, grid - 1)  # ZipAR: `window` codes of the row above
        if r > 0 and above >= 10:
            assert when[p] > when[above]
    assert len(steps) < 49 - 10  # fewer decoding steps than codes
    assert zipar_schedule(grid, 10, grid) == tuple((p,) for p in range(10, 49))  # a whole row: raster order


@torch.no_grad()
def rollout_kl(model, codes, labels, window, prefix_frac=(0.25, 0.75)):
    """KL(exact || used) per position (B, T) of a rollout: the model's conditional on the finished
    sequence (what raster decoding draws from) against the logits each code was drawn from; 0 on the prefix."""
    used = torch.zeros(*codes.shape, model.config.vocab_size)
    out, mask = mixed_rollout(model, codes, labels, prefix_frac, torch.Generator().manual_seed(1), window, used)
    exact = model(out, labels).log_softmax(-1)
    return torch.where(mask, (exact.exp() * (exact - used.log_softmax(-1))).sum(-1), 0.0), out, mask


def test_zipar_rollout_is_exact_in_raster_order_and_close_at_every_position_with_a_window():
    student = load_checkpoint(data.WEIGHTS / "student.pt")  # a trained model: near-uniform ones would hide a wrong cell
    labels = torch.arange(200) % 10
    codes = generate(student, labels, generator=torch.Generator().manual_seed(0))
    T, grid = codes.shape[1], student.config.grid_size
    for window in (0, grid):  # sequential, and ZipAR with a whole row as window: exact
        kl, out, mask = rollout_kl(student, codes, labels, window)
        assert kl.abs().max() < 1e-4 and torch.equal(out[~mask], codes[~mask])
    kl, _, mask = rollout_kl(student, codes, labels, 5)
    per_position = kl.sum(0) / mask.sum(0).clamp_min(1)  # (T,)
    row_starts = torch.arange(T) % grid == 0
    # a row start drawn from the cell of the row above (its logits predict that row's next code) is
    # 5-7 nats off; its own query, the code above standing in, well under 1
    assert per_position[row_starts].max() < 1.0 and per_position[~row_starts].max() < 0.05
    assert per_position[row_starts].max() > 0.05  # ZipAR is an approximation there, and the test can see it


def test_rollout_decodes_each_prefix_as_a_prefix():
    # prefixes of different lengths in one batch: every sequence's first sampled code is drawn from the
    # model's conditional on its own whole prefix, as raster decoding would (at any window)
    model = tiny_model(grid_size=5)
    codes, labels = random_batch(model, B=32)
    for window in (0, 2):
        kl, _, mask = rollout_kl(model, codes, labels, window, (0.2, 0.8))
        first = mask.float().argmax(1)  # (B,) = k
        assert len(set(first.tolist())) > 3 and kl[torch.arange(32), first].abs().max() < 1e-4


def diagnosed(teacher, student, groups, threshold=0.1):
    codes, labels = random_batch(teacher, B=40)
    return diagnose.diagnose(teacher, student, codes, labels, groups, threshold=threshold, seed=0, batch_size=16)


def test_diagnosis_figures_are_in_range_and_agree_where_the_context_is_still_real():
    teacher, student = tiny_model(0, grid_size=4), tiny_model(3, grid_size=4)  # T = 16, V = 64
    d = diagnosed(teacher, student, torch.arange(64) // 4)
    assert sum(d["positions"]) == sum(d["distances"]) > 0 and d["positions"][:4] == [0.0] * 4  # prefix >= 4 codes
    for context in ("data", "student"):
        for key in ("by_position", "by_distance"):
            v = {q: np.array(x, dtype=float) for q, x in d[context][key].items()}
            alpha = v["alpha"][~np.isnan(v["alpha"])]
            assert alpha.size and alpha.min() >= 0 and alpha.max() <= 1
            assert np.nanmin(v["ambiguity"]) >= 0 and np.nanmax(v["ambiguity"]) > 0.01
            assert np.nanmin(v["kl_ts"]) >= -1e-6 and np.nanmin(v["kl_st"]) >= -1e-6 and np.nanmax(v["kl_ts"]) > 0.01
        assert 0 <= d[context]["cut_share"] <= 1 and 0 < d[context]["kept_share"] <= 1
    # the first sampled position is predicted from an all-real context in both: the same figures
    for q in ("alpha", "kl_ts", "nll_real"):
        assert d["data"]["by_distance"][q][0] == pytest.approx(d["student"]["by_distance"][q][0], abs=1e-5)
    assert d["student"]["by_distance"]["nll_real"][3] != pytest.approx(d["data"]["by_distance"]["nll_real"][3], abs=1e-3)


def test_diagnosis_of_a_model_against_itself_has_zero_kl_and_one_group_per_code_no_ambiguity():
    teacher = tiny_model(0, grid_size=4)
    d = diagnosed(teacher, teacher, torch.arange(64))
    for context in ("data", "student"):
        for q in ("kl_ts", "kl_st", "ambiguity"):
            assert np.nanmax(np.abs(np.array(d[context]["by_position"][q], dtype=float))) < 1e-5


def test_diagnosis_truncates_every_sequence_at_its_first_sampled_code_when_no_alpha_passes():
    teacher, student = tiny_model(0, grid_size=4), tiny_model(3, grid_size=4)
    d = diagnosed(teacher, student, torch.arange(64) // 4, threshold=1.01)
    sampled = sum(d["positions"])
    for context in ("data", "student"):
        assert d[context]["cut_share"] == 1 and d[context]["cut_distance_median"] == 0
        assert d[context]["kept_share"] == pytest.approx(40 / sampled)  # one kept position per sequence


def test_diagnosis_heat_map_shows_every_quantity_over_the_grid(tmp_path):
    teacher, student = tiny_model(0, grid_size=4), tiny_model(3, grid_size=4)
    d = diagnosed(teacher, student, torch.arange(64) // 4)
    diagnose.heat_maps(d, 4, tmp_path / "d.png", scale=10)
    image = np.asarray(Image.open(tmp_path / "d.png"))
    assert image.shape[2] == 3 and image.shape[0] > 5 * 40  # five rows of 40-px maps
    text = diagnose.report(d, 4, {"teacher_path": "t.pt", "student_path": "s.pt", "command": "python diagnose.py"})
    assert "| codes after the prefix |" in text and "| grid row |" in text and "t.pt teaching s.pt" in text


@pytest.fixture(scope="module")
def tiny_teacher(trained_setup):
    """A tiny teacher trained 40 steps with ce, in the shared out-dir."""
    path = trained_setup / "teacher_tiny.pt"
    run_distill(trained_setup, "--max-iters", "40", "--lr", "3e-3", "--warmup", "5", "--out", str(path))
    return path


@pytest.mark.slow
def test_a_taid_run_resumed_after_an_interruption_ends_with_the_weights_and_t_of_one_that_never_stopped(
        trained_setup, tiny_teacher, monkeypatch):
    common = ["--method", "taid", "--teacher", str(tiny_teacher), "--init", "none", "--max-iters", "6",
              "--ckpt-interval", "3", "--warmup", "1", "--lr", "3e-3"]
    whole = run_distill(trained_setup, *common, "--out", str(trained_setup / "taid_whole.pt"))
    step, real = [0], distill.taid_step
    def stopped_in_step_4(*a):
        step[0] += 1
        if step[0] == 5:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(distill, "taid_step", stopped_in_step_4)
    part = trained_setup / "taid_part.pt"
    with pytest.raises(SystemExit, match="keeps step 3: the same command with --resume"):
        run_distill(trained_setup, *common, "--out", str(part))
    monkeypatch.undo()
    resumed = run_distill(trained_setup, *common, "--out", str(part), "--resume")
    a, b = (torch.load(p, weights_only=True) for p in (trained_setup / "taid_whole.pt", part))
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert resumed["taid"] == whole["taid"] and 0.4 < whole["taid"]["t"] <= 1  # t was kept with the weights


@pytest.mark.slow
def test_diagnose_cli_writes_its_tables_json_and_heat_maps(trained_setup, tiny_teacher, tmp_path):
    student = tmp_path / "student.pt"
    save_tiny(student, tiny_model(1, vocab_size=256, num_classes=10, grid_size=7))
    d = diagnose.main(["--out-dir", str(trained_setup), "--tokenizer", str(trained_setup / "tokenizer.pt"), "--teacher",
                       str(tiny_teacher), "--student", str(student), "--num-seqs", "20", "--name", "diag"])
    assert d["num_seqs"] == 20 and d["seq_len"] == 49
    saved = json.loads((trained_setup / "diag.json").read_text())["student"]["by_distance"]
    for q, values in d["student"]["by_distance"].items():  # NaN where no sequence reaches that distance
        np.testing.assert_allclose(np.array(saved[q], dtype=float), np.array(values, dtype=float))
    assert f"{tiny_teacher} teaching {student}" in (trained_setup / "diag.md").read_text()
    assert Image.open(trained_setup / "diag.png").size[0] > 3 * 7 * 16


def test_diagnoses_at_7x7_and_14x14_are_compared_by_image_height(tmp_path, capsys):
    def fake(grid):  # every quantity = 1 + the band of the image height (7 bands), + 1 on student contexts
        T = grid * grid
        band = [float(t // (T // 7)) for t in range(T)]
        ctx = lambda shift: {"by_distance": {q: [v + shift for v in band] for q, _ in diagnose.QUANTITIES},
                             "cut_share": 0.5, "cut_distance_median": float(T // 2), "kept_share": 0.9}
        return {"seq_len": T, "threshold": 0.1, "distances": [1.0] * (T - T // 7) + [0.0] * (T // 7), "data": ctx(1), "student": ctx(2)}
    paths = [tmp_path / "d7.json", tmp_path / "d14.json"]
    for path, grid in zip(paths, (7, 14)):
        path.write_text(json.dumps(fake(grid)))
    text = diagnose.main(["--compare", *map(str, paths), "--out-dir", str(tmp_path)])
    assert (tmp_path / "diagnosis_compare.md").read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "/7 - " in line]
    assert len(rows) == 2 * 6  # the last seventh of the image is never after a prefix here: no row
    for b in range(6):
        for line, codes, count in zip(rows[2 * b:2 * b + 2], (f"{7 * b}-{7 * b + 6}", f"{28 * b}-{28 * b + 27}"), (7, 28)):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[:3] == [f"{b}/7 - {b + 1}/7", codes, str(count)]
            assert cells[3:9] == [f"{b + 1:.3f} / {b + 2:.3f}"] * 6 and cells[9:] == ["1.000", f"{(b + 2) / (b + 1):.2f}"]
    assert "| 196 | student | 0.500 | 98.000 | 0.50 | 0.900 |" in text
    bad = fake(7) | {"seq_len": 50}
    paths[0].write_text(json.dumps(bad))
    with pytest.raises(SystemExit, match="diagnosis_compare.md exists: pass --force"):  # an earlier comparison is kept
        diagnose.main(["--compare", *map(str, paths), "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="square grids"):
        diagnose.main(["--compare", *map(str, paths), "--out-dir", str(tmp_path), "--force"])
    with pytest.raises(SystemExit, match="not a diagnosis; pass the .json"):
        diagnose.main(["--compare", str(tmp_path / "diagnosis_compare.md"), "--out-dir", str(tmp_path), "--force"])


def test_sample_and_evaluate_read_the_shipped_14x14_parents_else_the_14x14_tree_with_grid_14(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "WEIGHTS", tmp_path / "w")  # nothing shipped: the tree distill.py --grid 14 builds
    with pytest.raises(SystemExit, match="no tokenizer at out/grid14/tokenizer.pt"):
        sample.main(["--grid", "14"])
    save_tiny(tmp_path / "m.pt", tiny_model())
    with pytest.raises(SystemExit, match="no tokenizer at out/grid14/tokenizer.pt"):
        evaluate.main(["m.pt", "--grid", "14"])
    (tmp_path / "w" / "grid14").mkdir(parents=True)  # the tokenizer shipped, the teacher not: the tree's teacher
    shutil.copy(Path(__file__).parent / "weights" / "grid14" / "tokenizer.pt", tmp_path / "w" / "grid14")
    with pytest.raises(SystemExit, match="no GPT checkpoint at out/grid14/teacher.pt"):
        sample.main(["--grid", "14"])
    with pytest.raises(SystemExit, match="m.pt was trained on a 4x4 grid of codes, not 14x14"):
        evaluate.main(["m.pt", "--grid", "14"])


@pytest.mark.slow
def test_the_pipeline_runs_end_to_end_at_grid_14_in_a_tree_of_its_own(small_tokenizer14, tmp_path, capsys):
    tok.save_tokenizer(small_tokenizer14, tmp_path / "grid14" / "tokenizer.pt")
    make_fashion_mnist(tmp_path / "fmnist", n_train=64, n_test=40)  # random pixels: the plumbing, in seconds
    tiny = ["--data-dir", str(tmp_path / "fmnist"), "--size", "tiny", "--teacher-size", "tiny", "--teacher-iters", "4", "--max-iters", "4", "--batch-size", "8",
            "--eval-interval", "1000", "--eval-seqs", "20", "--eval-samples", "0", "--warmup", "2"]
    metrics = distill.main(["--method", "varkd", "--grid", "14", "--out-dir", str(tmp_path), "--tokenizer",
                            str(tmp_path / "grid14" / "tokenizer.pt"), *tiny])  # not the shipped one: every parent built
    assert np.isfinite(metrics["test_nll"]) and np.isfinite(metrics["test_kl"])
    for path in ("teacher.pt", "ce/ckpt.pt", "kd/ckpt.pt", "varkd/ckpt.pt"):
        model = load_checkpoint(tmp_path / "grid14" / path)
        assert model.config.grid_size == 14 and model.config.block_size == 196
    assert not (tmp_path / "tokens").exists()  # the 7x7 tree is untouched
    with pytest.raises(SystemExit, match="encodes 14x14 codes, not the --grid 7 asked: pass --grid 14"):
        distill.main(["--method", "kd", "--out-dir", str(tmp_path / "grid14"), "--tokenizer",
                      str(tmp_path / "grid14" / "tokenizer.pt"), *tiny])


@pytest.mark.slow
def test_sample_cli_draws_speculatively_and_prints_the_acceptance(trained_setup, tiny_teacher, tmp_path, capsys):
    common = ["--teacher", str(tiny_teacher), "--tokenizer", str(trained_setup / "tokenizer.pt"), "--classes", "0,3",
              "--per-class", "3"]
    figures = sample.main(common + ["--draft", str(tiny_teacher), "--gamma", "3", "--out", str(tmp_path / "a.png")])
    assert figures == dict(acceptance=1.0, codes_per_call=49 / 14)  # 12 rounds of 4 codes, the prefill, the last
    assert "100.0% of drafted codes accepted, 3.50 codes per call of the target" in capsys.readouterr().out
    assert Image.open(tmp_path / "a.png").size == (3 * 28 + 4 * 2, 2 * 28 + 3 * 2)
    other = tmp_path / "other.pt"
    save_tiny(other, tiny_model(1, vocab_size=256, num_classes=10, grid_size=7))
    figures = sample.main(common + ["--draft", str(other), "--relax-delta", "0.2", "--groups", "16", "--batch-size", "2",
                                    "--out", str(tmp_path / "b.png")])
    assert 0 < figures["acceptance"] < 1 and (tmp_path / "b.png").exists()
    save_tiny(other, tiny_model(1, vocab_size=256, num_classes=5, grid_size=7))
    with pytest.raises(SystemExit, match="other.pt: the draft predicts 7x7 codes of 256, 5 classes"):
        sample.main(common + ["--draft", str(other)])
    capsys.readouterr()
    figures = sample.main(common + ["--gsd", "--gamma", "4", "--out", str(tmp_path / "c.png")])  # no draft model
    assert figures["codes_per_call"] > 1 and "speculative Jacobi, 4 codes ahead, GSD threshold 0.15" in capsys.readouterr().out
    assert Image.open(tmp_path / "c.png").size == (3 * 28 + 4 * 2, 2 * 28 + 3 * 2)
    with pytest.raises(SystemExit):  # argparse's error: one or the other
        sample.main(common + ["--gsd", "--draft", str(other)])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "seqkd", "onpolicy", "varkd"])
def test_each_method_lowers_the_held_out_kl_to_the_teacher(trained_setup, tiny_teacher, method):
    metrics = run_distill(trained_setup, "--method", method, "--teacher", str(tiny_teacher), "--init", "none",
                          "--max-iters", "15", "--lr", "3e-3", "--warmup", "2", "--pool-size", "64",
                          "--out", str(trained_setup / f"{method}.pt"))
    assert metrics["test_kl"] < 0.8 * metrics["start"]["test_kl"]
    ckpt = torch.load(trained_setup / f"{method}.pt", weights_only=True)
    assert ckpt["fingerprints"]["teacher"] and ckpt["fingerprints"]["tokenizer"]


@pytest.mark.slow
def test_a_missing_parent_you_pass_is_named(trained_setup, tiny_teacher):
    with pytest.raises(SystemExit, match=r"no student at .*nowhere.pt: pass an existing checkpoint as --init"):
        run_distill(trained_setup, "--method", "varkd", "--teacher", str(tiny_teacher), "--max-iters", "2",
                    "--init", str(trained_setup / "nowhere.pt"), "--out", str(trained_setup / "orphan.pt"))


@pytest.mark.slow
def test_a_teacher_of_other_classes_is_refused(trained_setup, tiny_teacher, tmp_path):
    ckpt = torch.load(tiny_teacher, weights_only=True)
    table = "cls_embedding.embedding_table.weight"
    ckpt["model"][table] = ckpt["model"][table][:6]  # 5 classes and the null class: class 5 of the data is its null
    ckpt["config"]["num_classes"] = 5
    ckpt["fingerprint"], ckpt["integrity"] = checks.weights_fingerprint(ckpt["model"]), checks.integrity(ckpt)
    torch.save(ckpt, tmp_path / "five.pt")
    with pytest.raises(SystemExit, match="five.pt has 5 classes, the data 10: pass a teacher trained on these classes"):
        run_distill(trained_setup, "--method", "kd", "--teacher", str(tmp_path / "five.pt"), "--init", "none",
                    "--max-iters", "2", "--out", str(tmp_path / "kd.pt"))


@pytest.mark.slow
def test_parents_from_another_tokenizer_or_size_are_refused(trained_setup, tiny_teacher, tmp_path):
    ckpt = torch.load(tiny_teacher, weights_only=True)
    ckpt["fingerprints"]["tokenizer"] = "0123456789abcdef"
    torch.save(ckpt, tmp_path / "alien.pt")
    with pytest.raises(SystemExit, match="was built on tokenizer 0123456789abcdef, not on this run's"):
        run_distill(trained_setup, "--method", "kd", "--teacher", str(tmp_path / "alien.pt"), "--init", "none",
                    "--max-iters", "2", "--out", str(tmp_path / "kd.pt"))
    with pytest.raises(SystemExit, match="is not a --size student model"):
        run_distill(trained_setup, "--method", "kd", "--teacher", str(tiny_teacher), "--init", str(tiny_teacher),
                    "--size", "student", "--max-iters", "2", "--out", str(tmp_path / "kd.pt"))


@pytest.mark.slow
def test_with_its_own_tokenizer_the_pipeline_builds_every_parent_once_then_reuses_them(small_tokenizer, tmp_path,
                                                                                       capsys):
    tok.save_tokenizer(small_tokenizer, tmp_path / "tokenizer.pt")  # training it takes minutes
    argv = ["--method", "varkd", "--out-dir", str(tmp_path), "--tokenizer", str(tmp_path / "tokenizer.pt"),
            "--size", "tiny", "--teacher-size", "tiny",
            "--teacher-iters", "20", "--max-iters", "4", "--batch-size", "16", "--eval-seqs", "50",
            "--eval-samples", "200"]
    distill.main(argv)
    first = capsys.readouterr().out
    ckpts = [tmp_path / p for p in ("teacher.pt", "ce/ckpt.pt", "kd/ckpt.pt", "varkd/ckpt.pt")]
    artifacts = ckpts + [p.with_suffix(f".cfg{s}.png") for p in ckpts for s in (1, 2)] + \
        [p.parent / "metrics.json" for p in ckpts] + [tmp_path / "fid_vs_cfg.png"] + \
        [tmp_path / "tokens" / f"{split}.{s}" for split in ("train", "test") for s in ("codes.npy", "json")]
    assert all(p.exists() for p in artifacts), [p for p in artifacts if not p.exists()]
    for role in ("teacher", "no-KD student", "stage-1 KD student"):
        assert f"no {role} at" in first
    teacher, ce, kd, varkd = (torch.load(p, weights_only=True) for p in ckpts)
    assert kd["fingerprints"]["init"] == ce["fingerprint"] and varkd["fingerprints"]["init"] == kd["fingerprint"]
    assert kd["fingerprints"]["teacher"] == varkd["fingerprints"]["teacher"] == teacher["fingerprint"]
    assert teacher["step"] == 20 and ce["step"] == kd["step"] == varkd["step"] == 4
    entries = json.loads((tmp_path / "varkd" / "metrics.json").read_text())  # one entry per guidance scale
    scored, held = entries["ckpt.pt@cfg2"], varkd["metrics"]  # the training run's held-out figures
    assert held["test_kl"] > 0 and len(held["test_kl_rows"]) == len(held["test_nll_rows"]) == 7
    assert np.isclose(np.mean(held["test_kl_rows"]), held["test_kl"]) and 0 <= scored["precision-cls"] <= 1
    assert scored["FID-cls"] > 0 and entries["ckpt.pt@cfg1"]["FID-cls"] != scored["FID-cls"]
    assert varkd["metrics"]["start"] == {k: kd["metrics"][k] for k in ("test_nll", "test_kl")}  # measured once
    stamps = {p: p.stat().st_mtime_ns for p in artifacts}
    distill.main(argv)
    second = capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in artifacts} == stamps  # nothing rebuilt, nothing re-measured
    # the teacher, kd and varkd; ce is not even looked at, kd exists (and records where it started)
    assert second.count("reusing it") == 3 and "training one" not in second
    table = second[second.index("FID-cls"):]
    assert all(str(p) in table for p in ckpts)


@pytest.mark.slow
def test_the_study_writes_its_results_and_resumes_without_redoing_finished_runs(small_tokenizer, tmp_path, capsys):
    tok.save_tokenizer(small_tokenizer, tmp_path / "tokenizer.pt")
    argv = ["--seeds", "0,1", "--out-dir", str(tmp_path), "--tokenizer", str(tmp_path / "tokenizer.pt"),
            "--size", "tiny", "--teacher-size", "tiny", "--teacher-iters", "10", "--max-iters", "3",
            "--kd-iters", "3", "--study-iters", "2", "--batch-size", "16",
            "--eval-seqs", "50", "--eval-samples", "100", "--eval-cfg", "1,2", "--no-tune"]
    results = study.main(argv)
    runs = ["kd"] + [name for name, *_ in study.ROWS]  # per seed, from the one no-KD student out/ce/
    drafts = [n for n in study.DRAFTS if n in ["ce"] + runs]
    ckpts = [tmp_path / "study" / f"seed{s}" / name / "ckpt.pt" for s in (0, 1) for name in runs]
    assert all(p.exists() for p in ckpts) and (tmp_path / "ce" / "ckpt.pt").exists()
    saved = json.loads((tmp_path / "study" / "results.json").read_text())
    assert saved["rows"] == results["rows"] and [r["name"] for r in saved["rows"]] == ["teacher", "ce"] + runs
    rows = {r["name"]: r for r in saved["rows"]}
    for row in saved["rows"]:
        for key, *_ in study.FIGURES:
            assert len(row[key]["values"]) == 2 and np.isclose(row[key]["mean"], np.mean(row[key]["values"])), key
    for name in drafts:  # each drafting for the teacher
        row = rows[name]
        assert 0 < row["spec_acceptance"]["mean"] <= 1 and row["spec_speed_up"]["mean"] > 0, name
        assert 49 / 50 <= row["spec_codes_per_call"]["mean"] <= 49 / 10  # at worst 1 code per round, at best 5
        assert len(row["spec_draft_cost"]["values"]) == 2
    assert not any(key.startswith("spec_") for key in rows["teacher"]) and "spec_acceptance" not in rows["varkd_rkl"]
    fid = {name: rows[name]["FID-cls"]["values"] for name in ("teacher", "ce", "varkd")}
    expected = [(c - v) / (c - t) for t, c, v in zip(fid["teacher"], fid["ce"], fid["varkd"])]
    assert np.allclose(rows["varkd"]["gap_closure"]["values"], expected)
    assert rows["varkd"]["steps"] == 2 and rows["kd"]["steps"] == 3 and rows["teacher"]["steps"] == 10
    assert rows["ce"]["teacher_seqs"]["mean"] == 0 and rows["kd"]["teacher_seqs"]["mean"] == 3 * 16
    assert rows["seqkd"]["teacher_seqs"]["mean"] == 8192 + 2 * 16  # its pool, then its batches
    assert "beats_control" in rows["varkd"] and "beats_control" not in rows["ce"]
    table = (tmp_path / "study" / "results.md").read_text().splitlines()
    # header, teacher, rows: at the best scale, at every scale, the sampling cost, the drift by grid row; then the
    # drafts' header and rows
    drafts = [n for n in study.DRAFTS if n in rows]
    assert len([line for line in table if line.startswith("| ")]) == 4 * (1 + 2 + len(runs)) + (1 + len(drafts))
    assert f"| varkd (+ parallel rollouts = VarKD) | 2 | {rows['varkd']['best_cfg']:g} |" in "\n".join(table)
    for name in ("teacher", "varkd"):
        by_cfg = {float(s): m["mean"] for s, m in rows[name]["fid_by_cfg"].items()}
        assert set(by_cfg) == {1.0, 2.0} and rows[name]["FID-cls"]["mean"] == min(by_cfg.values())
    assert len(rows["varkd"]["test_kl_rows"]) == 7 and (tmp_path / "study" / "fid_vs_cfg.png").exists()
    with Image.open(tmp_path / "study" / "compare.png") as im:
        assert im.height > (2 + len(runs)) * 28 * 2  # a row of samples per model, twice the size
    # a study killed during seed 1's varkd (its checkpoint not final, its figures not recorded): run again,
    # only that run is trained and measured
    lost = tmp_path / "study" / "seed1" / "varkd" / "ckpt.pt"
    before = torch.load(lost, weights_only=True)["fingerprint"]
    lost.unlink()
    recorded = tmp_path / "study" / "seed1" / "lines.json"
    saved = json.loads(recorded.read_text())
    del saved["lines"]["varkd"]
    recorded.write_text(json.dumps(saved))
    stamps = {p: p.stat().st_mtime_ns for p in ckpts if p != lost}
    capsys.readouterr()
    again = study.main(argv)
    out = capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and out.count("reusing it") == 2 + 2 * len(runs) - 1  # the teacher and ce, then all but the lost run
    assert out.count("speculative sampling, 10 images one at a time: varkd drafting") == 1
    assert out.count("speculative sampling") == 1
    assert torch.load(lost, weights_only=True)["fingerprint"] == before  # the same weights: runs are reproducible
    for old, new in zip(results["rows"], again["rows"]):  # measured once: the same figures (wall time aside)
        assert old["FID-cls"] == new["FID-cls"] and old["test_nll"] == new["test_nll"], old["name"]
    # a checkpoint deleted after its figures were recorded: they stand for it, nothing is trained
    (tmp_path / "study" / "seed0" / "seqkd" / "ckpt.pt").unlink()
    stamps.pop(tmp_path / "study" / "seed0" / "seqkd" / "ckpt.pt")
    capsys.readouterr()
    kept = study.main(argv)
    assert not (tmp_path / "study" / "seed0" / "seqkd" / "ckpt.pt").exists()
    assert [r["FID-cls"] for r in kept["rows"]] == [r["FID-cls"] for r in again["rows"]]
    # a few rows (the long horizon's quick look): nothing trained again, only those rows reported
    few = study.main(argv + ["--rows", "varkd,kd_cont"])
    assert [r["name"] for r in few["rows"]] == ["teacher", "ce", "kd", "kd_cont", "varkd"]
    assert few["command"].endswith("--rows kd_cont,varkd") and "beats_control" in few["rows"][-1]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.slow
def test_the_study_tunes_each_method_on_the_validation_seed_and_trains_the_winner(small_tokenizer, tmp_path):
    tok.save_tokenizer(small_tokenizer, tmp_path / "tokenizer.pt")
    argv = ["--seeds", "0", "--rows", "kd_cont,varkd_sampled", "--out-dir", str(tmp_path), "--tokenizer",
            str(tmp_path / "tokenizer.pt"), "--size", "tiny", "--teacher-size", "tiny", "--teacher-iters", "10",
            "--max-iters", "3", "--kd-iters", "3", "--study-iters", "2", "--batch-size", "16", "--eval-seqs", "50",
            "--eval-samples", "40", "--eval-cfg", "1,2"]
    results = study.main(argv)
    tuning = json.loads((tmp_path / "study" / "tuning.json").read_text())
    assert set(tuning["methods"]) == {"kd", "varkd"} and tuning["seed"] == 100  # the methods of the rows asked for
    for method, size in (("kd", 2), ("varkd", 4)):  # 2 learning rates, x 2 readings of the prefix with rollouts
        tried = tuning["methods"][method]["candidates"]
        assert len(tried) == size and tuning["methods"][method]["winner"] == min(tried, key=lambda c: tried[c]["FID-cls"])
        assert all(t["FID-cls"] == min(t["by_cfg"].values()) for t in tried.values())
    winner = tuning["methods"]["varkd"]["flags"]
    trained = torch.load(tmp_path / "study" / "seed0" / "varkd_sampled" / "ckpt.pt", weights_only=True)["args"]
    assert trained["lr"] == float(winner[1]) and trained["supervise"] == "sampled"  # the winner's rate, the row's reading
    assert results["winners"]["varkd"] == winner and (tmp_path / "study" / "tune100" / "varkd_lr1e-3_prefix0").is_dir()
    with pytest.raises(SystemExit):
        study.main(argv[:1] + ["0,100"] + argv[2:])  # the validation seed is never reported


def test_study_rows_must_be_names_of_its_rows(capsys):
    assert study.row_list("varkd, kd_cont", study.ROWS) == (["kd_cont", "varkd"], None)  # in the table's order
    with pytest.raises(SystemExit):
        study.main(["--rows", "varkd,vark"])
    assert "unknown row(s) vark: give comma-separated names from kd_cont," in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--guidance-free", "--rows", "varkd"])  # a row of the other study
    assert "unknown row(s) varkd: give comma-separated names from ce_cont, kd_gf," in capsys.readouterr().err
    for winners, problem in [("kd=lr9", "'kd=lr9': give method=setting pairs"),
                             ("kd=lr1e-3", "--winners names no setting for varkd")]:
        with pytest.raises(SystemExit):
            study.main(["--rows", "kd_cont,varkd", "--winners", winners])
        assert problem in capsys.readouterr().err


@pytest.mark.slow
def test_the_guidance_free_study_tunes_the_teachers_scale_at_cfg_1_and_its_seeds_stand_without_checkpoints(
        small_tokenizer, tmp_path, capsys):
    tok.save_tokenizer(small_tokenizer, tmp_path / "tokenizer.pt")
    argv = ["--guidance-free", "--seeds", "0", "--rows", "kd_gf,cca", "--out-dir", str(tmp_path), "--tokenizer",
            str(tmp_path / "tokenizer.pt"), "--size", "tiny", "--teacher-size", "tiny", "--teacher-iters", "10",
            "--max-iters", "3", "--study-iters", "2", "--batch-size", "16", "--eval-seqs", "50",
            "--eval-samples", "40", "--eval-cfg", "1,2"]
    results = study.main(argv)
    base = tmp_path / "study_gf"
    tuning = json.loads((base / "tuning.json").read_text())
    assert tuning["rule"] == "lowest FID-cls at CFG 1"
    for method, grid in (("kd", {"lr3e-4_S2", "lr3e-4_S3", "lr1e-3_S2", "lr1e-3_S3"}),
                         ("cca", {"lr3e-4_lam100", "lr3e-4_lam1000", "lr1e-3_lam100", "lr1e-3_lam1000"})):
        tried = tuning["methods"][method]["candidates"]
        assert set(tried) == grid and tuning["methods"][method]["winner"] == min(tried, key=lambda c: tried[c]["by_cfg"]["1.0"])
    ce = torch.load(tmp_path / "ce" / "ckpt.pt", weights_only=True)
    for name, method in (("kd_gf", "kd"), ("cca", "cca")):  # from the no-KD student, with the winner's setting
        ckpt = torch.load(base / "seed0" / name / "ckpt.pt", weights_only=True)
        assert ckpt["fingerprints"]["init"] == ce["fingerprint"] and ckpt["args"]["method"] == method
    flags = tuning["methods"]["kd"]["flags"]
    assert torch.load(base / "seed0" / "kd_gf" / "ckpt.pt", weights_only=True)["args"]["teacher_cfg"] == float(flags[-1])
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == ["teacher", "ce", "kd_gf", "cca"] and "kd" not in rows  # no stage 1 here
    assert rows["cca"]["teacher_seqs"]["mean"] == 0 and rows["kd_gf"]["teacher_seqs"]["mean"] == 2 * 16 * 2  # twice per sequence
    assert all(rows[n]["cost_cfg1"]["img_s_64"]["mean"] > 0 for n in rows)
    assert "| model | FID-cls at CFG 1 | img/s 64 |" in (base / "results.md").read_text()
    with Image.open(base / "compare.png") as im:  # teacher and ce at CFG 2, ce at 1, then each row at 1
        assert im.height == 14 + 5 * (2 * 28 + 4)
    # the seed's checkpoints gone (another machine): its lines.json stands for them, with the same settings only
    for name in ("kd_gf", "cca"):
        (base / "seed0" / name / "ckpt.pt").unlink()
    capsys.readouterr()
    winners = ["--winners", ",".join(f"{m}={t['winner']}" for m, t in tuning["methods"].items())]
    again = study.main(argv + winners)
    assert "the figures of" in capsys.readouterr().out and not (base / "seed0" / "cca" / "ckpt.pt").exists()
    assert [r["FID-cls"] for r in again["rows"]] == [r["FID-cls"] for r in results["rows"]]
    with pytest.raises(SystemExit, match="lines.json was measured with other settings"):
        study.main(argv + winners + ["--study-iters", "3"])


@pytest.mark.slow
def test_torchrun_ranks_agree_and_match_one_process(trained_setup, tiny_teacher, tmp_path):
    common = ["--max-iters", "3", "--warmup", "1", "--teacher", str(tiny_teacher), "--init", "none"]
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for method in ("ce", "varkd"):
        result = subprocess.run(run + distill_cmd(trained_setup, *common, "--method", method, "--out",
                                                  str(tmp_path / f"ddp_{method}.pt"))[1:],
                                cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert torch.load(tmp_path / f"ddp_{method}.pt", weights_only=True)["metrics"]["ranks_agree"] == 2
    # two ranks of 8 sequences average to the gradient of one batch of 16
    run_distill(trained_setup, *common, "--method", "ce", "--out", str(tmp_path / "one.pt"))
    ddp = torch.load(tmp_path / "ddp_ce.pt", weights_only=True)["model"]
    for k, v in torch.load(tmp_path / "one.pt", weights_only=True)["model"].items():
        assert torch.allclose(v, ddp[k], atol=1e-5), k


# ------------------------------------------------------------------------------ evaluation


def test_frechet_distance_equals_the_sqrtm_formula():
    from scipy import linalg
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3000, 256))
    b = rng.normal(size=(3000, 256)) @ rng.normal(size=(256, 256)) * 0.1 + 0.3
    (mu1, s1), (mu2, s2) = evaluate.gaussian(a), evaluate.gaussian(b)
    covmean = linalg.sqrtm(s1 @ s2).real  # pytorch-fid's formula
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert abs(evaluate.frechet_distance(mu1, s1, mu2, s2) - expected) < 1e-6 * expected
    assert abs(evaluate.frechet_distance(mu1, s1, mu1, s1)) < 1e-6 * np.trace(s1)  # a set to itself
    # fewer samples than dimensions: S1 is singular (no Cholesky); eigenvalues of S1 S2 directly
    (mu3, s3) = evaluate.gaussian(a[:100])
    root_eigs = np.sqrt(np.linalg.eigvals(s3 @ s2).real.clip(0))
    expected = (mu3 - mu2) @ (mu3 - mu2) + np.trace(s3) + np.trace(s2) - 2 * root_eigs.sum()
    assert abs(evaluate.frechet_distance(mu3, s3, mu2, s2) - expected) < 1e-6 * expected


def test_kid_is_zero_for_one_distribution_and_positive_for_a_shifted_one():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2000, 32)), rng.normal(size=(2000, 32))
    same, _ = evaluate.kid(a, b, subsets=20, subset_size=500)
    shifted, _ = evaluate.kid(a, b + 0.5, subsets=20, subset_size=500)
    assert abs(same) < 0.01 and shifted > 0.1


def test_precision_and_recall_on_constructed_point_sets():
    # reals at 0..99 on a line: the radius (3rd neighbour) is 2 inside, 3 at the ends
    real = np.arange(100, dtype=np.float32)[:, None]
    fake = np.concatenate([real[:50] + 0.25, 1000 + 10 * real[:50]])
    precision, recall = evaluate.precision_recall(real, fake, k=3, batch_size=17)
    assert precision == pytest.approx(0.5)  # the near half lies inside the real manifold, the far half not
    # reals 0..49 are 0.25 from a fake; 50..52 lie within 3 of the end fake 49.25, whose radius is 3
    assert recall == pytest.approx(0.53)


def test_inception_score_lies_between_one_and_the_number_of_classes():
    confident = torch.eye(10).repeat(100, 1).numpy() * 50  # every class equally often, certain
    by_class = torch.eye(10).repeat_interleave(100, 0).numpy() * 50  # the same, saved class by class
    # parts of 100 random samples hold ~10 of each class: exp(entropy) a little under 10, in either order
    scores = [evaluate.inception_score(x)[0] for x in (confident, by_class)]
    assert all(9.3 < s <= 10 for s in scores) and abs(scores[0] - scores[1]) < 0.3, scores
    assert abs(evaluate.inception_score(np.zeros((1000, 10)))[0] - 1) < 1e-6
    random = np.random.default_rng(0).normal(size=(1000, 10)) * 3
    assert 1 <= evaluate.inception_score(random)[0] <= 10


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    """An out-dir for reference features, and the shipped classifier's recorded test accuracy."""
    return tmp_path_factory.mktemp("eval"), torch.load(classifier.CLASSIFIER, weights_only=True)["test_accuracy"]


def test_the_classifier_learns_the_classes_and_is_never_replaced(tmp_path):
    images, labels = data.load_fashion_mnist("train")
    test_images, test_labels = data.load_fashion_mnist("test")
    _, acc = classifier.train_classifier(images[:12000], labels[:12000], test_images[:2000], test_labels[:2000], epochs=1)
    assert acc > 0.8  # one epoch on a fifth of the data; the shipped one is in the README
    (tmp_path / "classifier.pt").write_bytes(b"precious")
    with pytest.raises(SystemExit, match="classifier.pt exists: FID-cls figures are tied to it"):
        classifier.build(tmp_path / "classifier.pt")
    assert (tmp_path / "classifier.pt").read_bytes() == b"precious"
    with pytest.raises(SystemExit, match="no classifier at .*nowhere.pt: FID-cls is measured with the shipped one"):
        classifier.load_classifier("data", tmp_path / "nowhere.pt")


def test_real_test_images_score_like_the_reference_and_noise_does_not(eval_dir, tmp_path):
    out, acc = eval_dir
    images, labels = data.load_fashion_mnist("test")
    np.savez(tmp_path / "real.npz", images[:2000], labels[:2000])
    real = evaluate.main([str(tmp_path / "real.npz"), "--out-dir", str(out)])
    refs = list((out / "ref").glob("*.npz"))
    assert len(refs) == 1  # the reference features, computed once
    stamp = refs[0].stat().st_mtime_ns
    noise = np.random.default_rng(0).integers(0, 256, images[:2000].shape, dtype=np.uint8)
    np.savez(tmp_path / "noise.npz", noise)
    fake = evaluate.main([str(tmp_path / "noise.npz"), "--out-dir", str(out)])
    assert refs[0].stat().st_mtime_ns == stamp
    assert real["FID-cls"] < 0.1 * fake["FID-cls"] and real["precision-cls"] > 0.9 > fake["precision-cls"]
    assert abs(real["class_acc-cls"] - acc) < 0.05 and "class_acc-cls" not in fake  # noise.npz has no labels
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["real.npz@cls-cfg2-seed0-n2000"]["FID-cls"] == real["FID-cls"] and "noise.npz@cls-cfg2-seed0-n2000" in saved


def test_bad_evaluation_targets_get_one_sentence(eval_dir, tmp_path):
    out, _ = eval_dir
    with pytest.raises(SystemExit, match="no .*nowhere.pt: pass a checkpoint"):
        evaluate.main([str(tmp_path / "nowhere.pt"), "--out-dir", str(out)])
    np.savez(tmp_path / "wrong.npz", images=np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(SystemExit, match="arr_0"):
        evaluate.main([str(tmp_path / "wrong.npz"), "--out-dir", str(out)])
    np.savez(tmp_path / "big.npz", np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(SystemExit, match="the images are 32x32x3 but the reference test split is 28x28x1"):
        evaluate.main([str(tmp_path / "big.npz"), "--out-dir", str(out)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no .png files"):
        evaluate.main([str(tmp_path / "empty"), "--out-dir", str(out)])


def test_a_checkpoint_is_scored_at_every_guidance_scale_in_one_call(eval_dir, tmp_path):
    out, _ = eval_dir
    student = tmp_path / "student.pt"
    shutil.copy(data.WEIGHTS / "student.pt", student)
    got = evaluate.main([str(student), "--out-dir", str(out), "--num-samples", "200", "--cfg-scale", "1,3"])
    assert set(got) == {1.0, 3.0} and got[1.0]["FID-cls"] != got[3.0]["FID-cls"]
    assert got[3.0]["class_acc-cls"] > got[1.0]["class_acc-cls"]  # guidance sharpens the class
    assert len(list((out / "ref").glob("*.npz"))) == 1  # one reference pass for both scales
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["student.pt@cls-cfg1-seed0-n200"]["FID-cls"] == got[1.0]["FID-cls"]
    assert saved["student.pt@cls-cfg3-seed0-n200"]["cfg_scale"] == 3.0
    evaluate.main([str(student), "--out-dir", str(out), "--num-samples", "200", "--cfg-scale", "2"])  # another entry
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert {k: again[k] for k in saved} == saved and "student.pt@cls-cfg2-seed0-n200" in again
    np.savez(tmp_path / "s.npz", np.zeros((8, 28, 28), np.uint8))
    for argv, said in (([str(tmp_path / "s.npz"), "--cfg-scale", "1,2"], "saved samples have the scale they were drawn"),
                       ([str(student), "--cfg-scale", "1,2", "--save-npz", str(tmp_path / "x.npz")], "one --cfg-scale"),
                       ([str(student), "--cfg-scale", "1,-2"], "pass guidance scales in [0, 100]")):
        with pytest.raises(SystemExit):
            evaluate.main(argv + ["--out-dir", str(out)])


def test_the_guidance_plot_draws_a_line_per_model(tmp_path):
    curves = {"teacher": {1.0: 66.8, 2.0: 45.9, 3.0: 51.7}, "student": {1.0: 108.7, 2.0: 57.2, 3.0: 54.0}}
    evaluate.cfg_plot(curves, tmp_path / "plot.png", {n: {s: 2.0 for s in c} for n, c in curves.items()})
    with Image.open(tmp_path / "plot.png") as im:
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    colours = {tuple(p) for p in pixels}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # the first two lines' colours


@torch.no_grad()
def test_held_out_figures_by_grid_row_see_drift_in_rows_a_model_was_never_trained_on():
    student, teacher = tiny_model(0, grid_size=4), tiny_model(1, grid_size=4)  # 4 rows of 4 codes
    codes, labels = random_batch(student, B=64)
    before = evaluate.held_out(student, codes, labels, teacher, by_row=True)
    assert np.isclose(np.mean(before["test_nll_rows"]), before["test_nll"])
    assert np.isclose(np.mean(before["test_kl_rows"]), before["test_kl"])
    student.train()
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    for _ in range(20):  # CE on the last row's codes only
        with torch.enable_grad():
            logits = student(codes, labels)[:, 12:]
            loss = F.cross_entropy(logits.flatten(0, 1), codes[:, 12:].flatten())
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
    after = evaluate.held_out(student, codes, labels, teacher, by_row=True)
    assert after["test_nll_rows"][3] < before["test_nll_rows"][3] - 0.1  # the trained row learned
    assert abs(after["test_kl_rows"][0] - before["test_kl_rows"][0]) > 0.01  # and the first row moved with it


def save_fake_inception(path):
    """Random weights in pytorch-fid's layout at path; returns the file's sha256."""
    torch.manual_seed(0)
    torch.save(evaluate.InceptionV3().state_dict(), path)
    return data.sha256_file(path)


def test_inception_state_dict_has_pytorch_fid_keys_shapes_and_dtypes():
    dtypes = {"torch.FloatStorage": torch.float32, "torch.LongStorage": torch.int64}
    want = {}
    for line in (FORMATS / "fid_inception_keys.tsv").read_text().splitlines():
        if not line.startswith("#"):
            key, shape, storage = line.split("\t")
            want[key] = (ast.literal_eval(shape), dtypes[storage])
    got = {k: (tuple(v.shape), v.dtype) for k, v in evaluate.InceptionV3().state_dict().items()}
    assert len(want) == 566 and got == want


def test_inception_average_pools_leave_the_padding_out():
    # TF's average pool: a constant image stays constant up to its borders
    assert torch.equal(inception.tf_avg_pool(torch.ones(1, 1, 5, 5)), torch.ones(1, 1, 5, 5))


def test_inception_loads_saved_weights_and_gives_features_and_logits_for_grey_images(tmp_path):
    sha = save_fake_inception(tmp_path / "w.pth")
    model = evaluate.load_inception(tmp_path / "w.pth")
    assert data.sha256_file(tmp_path / "w.pth") == sha  # loading never rewrites the file
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert torch.equal(model.fc.weight, torch.load(tmp_path / "w.pth", weights_only=True)["fc.weight"])
    grey = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    x = classifier.as_input(grey, channels=3)
    assert x.shape == (2, 3, 28, 28) and torch.equal(x[:, 0], x[:, 2])
    with torch.no_grad():
        features, logits = model(x, logits=True)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(logits).all() and (features >= 0).all()  # features average ReLU outputs


def test_inception_weights_with_a_missing_key_or_not_a_state_dict_are_refused(tmp_path):
    state = evaluate.InceptionV3().state_dict()
    del state["Mixed_7c.branch_pool.bn.running_var"]
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(SystemExit, match=r"w\.pth is not the FID Inception.*Mixed_7c\.branch_pool\.bn\.running_var"):
        evaluate.load_inception(tmp_path / "w.pth")
    (tmp_path / "w.pth").write_bytes(b"not a torch file")
    with pytest.raises(SystemExit, match=r"w\.pth is not the FID Inception"):
        evaluate.load_inception(tmp_path / "w.pth")
    with pytest.raises(SystemExit, match="no Inception weights at"):
        evaluate.load_inception(tmp_path / "missing.pth")


def test_inception_weights_are_downloaded_once_to_the_cache_and_checked(http_server, tmp_path):
    served, url = http_server
    sha = save_fake_inception(served / "w.pth")
    cache = tmp_path / "cache"
    model = evaluate.load_inception(cache_dir=cache, url=url + "w.pth", sha256=sha)
    cached = cache / "pt_inception-2015-12-05-6726825d.pth"
    assert list(cache.iterdir()) == [cached] and data.sha256_file(cached) == sha
    assert not model.training
    (served / "w.pth").unlink()  # a second load must not need the server
    evaluate.load_inception(cache_dir=cache, url=url + "w.pth", sha256=sha)

    (served / "bad.pth").write_bytes(b"a damaged mirror")
    with pytest.raises(SystemExit, match="sha256"):
        evaluate.load_inception(cache_dir=tmp_path / "cache2", url=url + "bad.pth", sha256=sha)
    assert not any((tmp_path / "cache2").glob("*"))


# ------------------------------------------------------------------------------ ImageNet scale


def test_vq16_encodes_256px_to_16x16_codes_decodes_back_and_groups_its_codebook(tmp_path):
    torch.manual_seed(0)
    torch.save({"model": tok.VQModel(tok.VQConfig(**tok.PRESETS["VQ-16"])).state_dict()}, tmp_path / "vq.pt")
    model = tok.load_tokenizer(tmp_path / "vq.pt")  # LlamaGen's file: no config, the VQ-16 preset
    images = np.random.default_rng(0).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    codes = model.encode(images)
    assert codes.shape == (1, 16, 16) and 0 <= codes.min() and codes.max() < 16384
    assert torch.allclose(model.codebook().norm(dim=-1), torch.ones(16384))  # L2-normalised codebook
    out = model.decode(codes)
    assert out.shape == (1, 256, 256, 3) and out.dtype == torch.uint8
    groups = model.codebook_groups(16384 // 4)
    assert groups.shape == (16384,) and len(groups.unique()) == groups.max() + 1 > 4000
    assert tok.load_tokenizer(tmp_path / "vq.pt", image_size=384).cfg.grid_size == 24
    with pytest.raises(SystemExit, match="not a multiple of the tokenizer's downsampling 16"):
        tok.load_tokenizer(tmp_path / "vq.pt", image_size=300)


def make_class_folder(root, n_per_class, seed=0):
    rng = np.random.default_rng(seed)
    for c, n in n_per_class.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            size = (int(rng.integers(32, 60)), int(rng.integers(32, 60)), 3)
            Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / c / f"{i}.png")


def fake_encode(images, calls=None, fail_at=None):
    """A stand-in tokenizer: 32 px -> 4x4 codes that depend on every flip and crop."""
    if calls is not None:
        calls.append(len(images))
        if len(calls) == fail_at:
            raise KeyboardInterrupt("killed")
    return images.reshape(len(images), 4, 8, 4, 8, 3).astype(np.int64).sum((2, 4, 5)) % 64


def test_image_folder_extraction_shards_over_ranks_and_resumes_after_an_interruption(tmp_path):
    make_class_folder(tmp_path / "train", {"cat": 3, "dog": 2})
    paths, labels, _ = data.image_folder_files(tmp_path / "train")
    kw = dict(chunk=2, batch_size=2, workers=0)
    reference = data.folder_token_cache(tmp_path / "ref" / "train", tmp_path / "train", 32, fake_encode, "tokA", **kw)
    # rank 1 of 2 takes chunk 1 (images 2, 3); rank 0 is killed after chunk 0, before chunk 2
    parts = tmp_path / "tokens" / "train.parts"
    assert data.encode_chunks(parts, paths, 32, fake_encode, rank=1, world=2, **kw) == [1]
    calls = []
    with pytest.raises(KeyboardInterrupt):
        data.encode_chunks(parts, paths, 32, lambda x: fake_encode(x, calls, fail_at=2), rank=0, world=2, **kw)
    assert sorted(p.name for p in parts.glob("*.npy")) == ["000000.npy", "000001.npy"]
    calls = []  # run again, one rank: only chunk 2 is left to encode
    codes, got_labels, _ = data.folder_token_cache(tmp_path / "tokens" / "train", tmp_path / "train", 32,
                                                   lambda x: fake_encode(x, calls), "tokA", **kw)
    assert calls == [2] and not parts.exists()  # one image and its flip; the chunks merged, then removed
    assert np.array_equal(codes, reference[0]) and codes.shape == (10, 4, 4)
    assert got_labels.tolist() == np.repeat(labels, 2).tolist()
    crop = data.load_image(paths[3], 32)
    assert np.array_equal(codes[6], fake_encode(crop[None])[0]) and np.array_equal(codes[7], fake_encode(crop[None, :, ::-1])[0])
    with pytest.raises(SystemExit, match="built by tokenizer tokA, not by this one"):
        data.folder_token_cache(tmp_path / "tokens" / "train", tmp_path / "train", 32, fake_encode, "tokB", **kw)


@pytest.mark.slow
def test_a_llamagen_layout_pair_distils_on_an_image_folder_and_is_evaluated(tmp_path):
    make_class_folder(tmp_path / "imagenet" / "train", {"n01": 6, "n02": 6})
    make_class_folder(tmp_path / "imagenet" / "val", {"n01": 2, "n02": 2}, seed=1)
    torch.manual_seed(0)  # a VQ-16-architecture tokenizer at 32 px: 4x4 codes of 64
    vq = tok.VQModel(tok.VQConfig(arch="vqgan", image_size=32, in_channels=3, ch=32, ch_mult=(1, 1, 2, 2),
                                  num_res_blocks=1, z_channels=32, codebook_size=64))
    vq.fingerprint = tok.weights_fingerprint(vq)
    tok.save_tokenizer(vq, tmp_path / "vq.pt")
    for name, seed in (("teacher", 0), ("student", 1)):  # LlamaGen's files: {"model": state_dict}, no config
        torch.save({"model": tiny_model(seed, vocab_size=64, num_classes=2).state_dict()}, tmp_path / f"c2i_{name}.pt")
    common = ["--data-dir", str(tmp_path / "imagenet"), "--out-dir", str(tmp_path / "out"), "--tokenizer",
              str(tmp_path / "vq.pt"), "--teacher", str(tmp_path / "c2i_teacher.pt"), "--teacher-preset", "tiny",
              "--batch-size", "4", "--max-iters", "1", "--eval-seqs", "4"]
    splits = distill.main(["--prepare", *common])  # the token extraction alone
    assert splits["train"][0].shape == (24, 16) and splits["test"][0].shape == (8, 16)  # 12 and 4 images, x 2 views
    assert splits["train"][0].dtype == torch.int16 and splits["train"][1].tolist() == [0] * 12 + [1] * 12
    distill.main(["--method", "kd", "--student", str(tmp_path / "c2i_student.pt"), "--student-preset", "tiny", *common])
    distill.main(["--method", "varkd", "--size", "tiny", *common])  # stage 2 from out/kd/ckpt.pt
    tokens = json.loads((tmp_path / "out" / "tokens" / "train.json").read_text())
    assert tokens["shape"] == [24, 4, 4]  # 12 images, each cropped and flipped
    kd, varkd = (torch.load(tmp_path / "out" / m / "ckpt.pt", weights_only=True) for m in ("kd", "varkd"))
    assert varkd["fingerprints"]["init"] == kd["fingerprint"] and kd["step"] == varkd["step"] == 1
    assert np.isfinite(varkd["metrics"]["test_kl"])  # measured on val/: 4 images x 2 views
    save_fake_inception(tmp_path / "inception.pth")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2048, 2048)) / 50
    np.savez(tmp_path / "ref.npz", mu=rng.normal(size=2048), sigma=a @ a.T)
    for target, extra in ((tmp_path / "out" / "varkd" / "ckpt.pt", []), (tmp_path / "c2i_student.pt", ["--preset", "tiny"])):
        result = evaluate.main([str(target), "--features", "inception", "--inception-weights",
                                str(tmp_path / "inception.pth"), "--num-samples", "4", "--ref", str(tmp_path / "ref.npz"),
                                "--tokenizer", str(tmp_path / "vq.pt"), "--out-dir", str(tmp_path / "out"), *extra])
        assert result["n"] == 4 and result["FID"] > 0 and 1 <= result["IS"] <= 4 and "KID" not in result
    # the same over two torchrun ranks (gloo): each draws half, rank 0 scores all 6 and writes the figures
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "evaluate.py",
           str(target), "--features", "inception", "--inception-weights", str(tmp_path / "inception.pth"), "--num-samples", "6",
           "--ref", str(tmp_path / "ref.npz"), "--tokenizer", str(tmp_path / "vq.pt"), "--out-dir",
           str(tmp_path / "out"), "--preset", "tiny", "--seed", "1"]
    done = subprocess.run(cmd, cwd=Path(__file__).parent, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    line = json.loads((tmp_path / "metrics.json").read_text())["c2i_student.pt@inception-cfg2-seed1-n6-ref-ref.npz"]
    assert line["n"] == 6 and line["FID"] > 0 and 1 <= line["IS"] <= 6
    torch.save({"model": tiny_model(2, vocab_size=32, num_classes=2).state_dict()}, tmp_path / "c2i_other.pt")
    with pytest.raises(SystemExit, match=r"the student .*c2i_other.pt predicts 32 codes, the tokenizer has 64"):
        distill.main(["--method", "kd", "--student", str(tmp_path / "c2i_other.pt"), "--student-preset", "tiny",
                      "--out", str(tmp_path / "x.pt"), *common])
    with pytest.raises(SystemExit, match="an image folder needs a trained one"):
        distill.main(["--method", "kd", *common[:4]])


# ------------------------------------------------------------ bad input and faults: one sentence, nothing lost
# Every program refuses a bad flag or file with one sentence that names it, exits non-zero, prints no
# traceback and leaves every file that existed before byte-identical.


@pytest.fixture(scope="module")
def bad_env(tmp_path_factory):
    """A tiny world for the bad inputs: a fake Fashion-MNIST, a random tokenizer, its token cache, a tiny
    teacher of ours; each test works on its own copy."""
    root = tmp_path_factory.mktemp("bad")
    make_fashion_mnist(root / "fm", n_train=24, n_test=12)
    torch.manual_seed(0)
    vq = tok.VQModel(tok.VQConfig())
    vq.fingerprint = tok.weights_fingerprint(vq)
    tok.save_tokenizer(vq, root / "tok.pt")
    teacher = tiny_model(0, vocab_size=256, num_classes=10, grid_size=7)
    state = teacher.state_dict()
    torch.save({"model": state, "config": asdict(teacher.config), "fingerprints": {"tokenizer": vq.fingerprint},
                "fingerprint": distill.runs.weights_fingerprint(teacher)}, root / "teacher.pt")
    distill.main(["--prepare", *DISTILL(root)[:6]])
    return root


def flip_a_weight_byte(path):
    """One bit of one stored weight flipped, in place: the zip and the pickle still read."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))


def snapshot(root):
    return {p: p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


def refusal(main, argv, capsys):
    """main(argv) -> (exit code, everything it printed, the SystemExit message included)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    printed = capsys.readouterr()
    return code, printed.out + printed.err + (code if isinstance(code, str) else "")


def png(path, mode="L", size=28):
    Image.new(mode, (size, size)).save(path)


def other_tokenizer(src, dst):
    ckpt = torch.load(src, weights_only=True)
    ckpt["fingerprints"]["tokenizer"] = "0123456789abcdef"
    torch.save(ckpt, dst)


# (program, its argv in the copy r, what to make first, words the refusal must hold)
def DISTILL(r):
    return ["--data-dir", f"{r}/fm", "--out-dir", f"{r}/out", "--tokenizer", f"{r}/tok.pt", "--size", "tiny",
            "--batch-size", "4", "--max-iters", "2", "--eval-interval", "1000", "--eval-seqs", "5", "--eval-samples", "0",
            "--out", f"{r}/out/run.pt"]


def KD(r):
    return DISTILL(r) + ["--method", "kd", "--init", "none", "--teacher", f"{r}/teacher.pt"]


def SAMPLE(r):
    return ["--ckpt", f"{r}/teacher.pt", "--tokenizer", f"{r}/tok.pt", "--per-class", "1", "--out", f"{r}/s.png"]


BAD_INPUTS = [
    # flags, refused at parse time with their range
    ("distill", lambda r: DISTILL(r) + ["--max-iters", "0"], None, ["--max-iters", "an integer >= 1"]),
    ("distill", lambda r: DISTILL(r) + ["--max-iters", "-5"], None, ["--max-iters"]),
    ("distill", lambda r: DISTILL(r) + ["--lr", "0"], None, ["--lr", "a number > 0"]),
    ("distill", lambda r: DISTILL(r) + ["--batch-size", "0"], None, ["--batch-size"]),
    ("distill", lambda r: DISTILL(r) + ["--eval-interval", "0"], None, ["--eval-interval"]),
    ("distill", lambda r: KD(r) + ["--tau", "0"], None, ["--tau"]),
    ("distill", lambda r: KD(r) + ["--lam", "1.5"], None, ["--lam", "[0, 1]"]),
    ("distill", lambda r: KD(r) + ["--prefix-frac", "0.9,0.1"], None, ["--prefix-frac", "lo <= hi"]),
    ("distill", lambda r: KD(r) + ["--prefix-frac", "2,3"], None, ["--prefix-frac"]),
    ("distill", lambda r: DISTILL(r) + ["--device", "cuda:99"], None, ["--device", "no such device"]),
    ("distill", lambda r: DISTILL(r) + ["--seed", "abc"], None, ["--seed"]),
    ("sample", lambda r: SAMPLE(r) + ["--temperature", "-1"], None, ["--temperature"]),
    ("sample", lambda r: SAMPLE(r) + ["--cfg-scale", "-1"], None, ["--cfg-scale"]),
    ("sample", lambda r: SAMPLE(r) + ["--top-p", "0"], None, ["--top-p", "(0, 1]"]),
    ("sample", lambda r: SAMPLE(r) + ["--classes", "a,b"], None, ["--classes"]),
    ("sample", lambda r: SAMPLE(r) + ["--batch-size", "0"], None, ["--batch-size"]),
    ("sample", lambda r: SAMPLE(r) + ["--relax-delta", "0.2"], None, ["--relax-delta", "--draft"]),
    ("evaluate", lambda r: [f"{r}/teacher.pt", "--num-samples", "3"], None, ["--num-samples"]),
    ("tokenizer", lambda r: ["--steps", "0", "--out", f"{r}/new.pt"], None, ["--steps"]),
    ("tokenizer", lambda r: ["--lr", "nan", "--out", f"{r}/new.pt"], None, ["--lr"]),
    ("tokenizer", lambda r: ["--codebook-size", "2", "--out", f"{r}/new.pt"], None, ["--codebook-size"]),
    # files that are not what the flag wants: empty, truncated, another kind of checkpoint, text
    ("distill", lambda r: KD(r)[:-1] + [f"{r}/empty.pt"], lambda r: (r / "empty.pt").write_bytes(b""), ["empty.pt"]),
    ("distill", lambda r: KD(r)[:-1] + [f"{r}/cut.pt"],
     lambda r: (r / "cut.pt").write_bytes((r / "teacher.pt").read_bytes()[:3000]), ["cut.pt"]),
    ("distill", lambda r: KD(r)[:-1] + [f"{r}/tok.pt"], None, ["tok.pt", "not a GPT checkpoint"]),
    ("distill", lambda r: DISTILL(r) + ["--init", f"{r}/notes.txt"], lambda r: (r / "notes.txt").write_text("hi"),
     ["notes.txt", "--init"]),
    ("distill", lambda r: DISTILL(r)[:5] + [f"{r}/teacher.pt"] + DISTILL(r)[6:], None, ["teacher.pt", "not a tokenizer"]),
    ("distill", lambda r: DISTILL(r)[:3] + [f"{r}/afile"] + DISTILL(r)[4:-2], lambda r: (r / "afile").write_text("x"),
     ["afile", "not a folder"]),
    ("distill", DISTILL, lambda r: (r / "out" / "tokens" / "test.json").write_text("[1, 2"), ["test.json", "damaged"]),
    ("distill", DISTILL, lambda r: (r / "out" / "run.pt").write_bytes(b"precious"), ["run.pt", "--out elsewhere"]),
    ("sample", lambda r: SAMPLE(r)[:-1] + [f"{r}/teacher.pt", "--force"], None, ["teacher.pt", "is a checkpoint"]),
    ("sample", SAMPLE, lambda r: png(r / "s.png"), ["s.png", "--force"]),
    ("sample", lambda r: SAMPLE(r) + ["--npz", f"{r}/samples"], None, ["--npz", ".npz"]),
    ("sample", lambda r: SAMPLE(r) + ["--ckpt", f"{r}/tok.pt"], None, ["tok.pt", "not a GPT checkpoint"]),
    ("sample", lambda r: SAMPLE(r) + ["--tokenizer", f"{r}/teacher.pt"], None, ["teacher.pt", "not a tokenizer"]),
    ("sample", lambda r: SAMPLE(r) + ["--ckpt", f"{r}/alien.pt"], lambda r: other_tokenizer(r / "teacher.pt", r / "alien.pt"),
     ["alien.pt", "--tokenizer it was trained with"]),
    ("sample", lambda r: SAMPLE(r) + ["--draft", f"{r}/alien.pt"], lambda r: other_tokenizer(r / "teacher.pt", r / "alien.pt"),
     ["alien.pt", "--tokenizer it was trained with"]),
    ("evaluate", lambda r: [f"{r}/three.npz"], lambda r: np.savez(r / "three.npz", np.zeros((3, 28, 28), np.uint8)),
     ["three.npz holds 3 images, too few"]),
    ("evaluate", lambda r: [f"{r}/pngs"], lambda r: [(r / "pngs").mkdir()] + [png(r / "pngs" / f"{i}.png", m)
                                                 for i, m in enumerate(["L"] * 6 + ["RGB"] * 6)], ["pngs", "different shapes"]),
    ("evaluate", lambda r: [f"{r}/pngs"], lambda r: [(r / "pngs").mkdir(), (r / "pngs" / "bad.png").write_text("x")] +
     [png(r / "pngs" / f"{i}.png") for i in range(12)], ["bad.png", "not a readable PNG"]),
    ("evaluate", lambda r: [f"{r}/ten.npz"], lambda r: (np.savez(r / "ten.npz", np.zeros((10, 28, 28), np.uint8)),
                                                       (r / "metrics.json").write_text("[1, 2, 3]")), ["metrics.json"]),
    ("tokenizer", lambda r: ["--steps", "1", "--out", f"{r}/tok.pt"], None, ["tok.pt", "--force"]),
    # damaged weights: one flipped bit, caught by the fingerprint recorded at save time
    ("sample", SAMPLE, lambda r: flip_a_weight_byte(r / "teacher.pt"), ["teacher.pt", "is damaged"]),
    ("sample", SAMPLE, lambda r: flip_a_weight_byte(r / "tok.pt"), ["tok.pt", "is damaged"]),
    ("evaluate", lambda r: [f"{r}/teacher.pt", "--tokenizer", f"{r}/tok.pt", "--num-samples", "10"],
     lambda r: flip_a_weight_byte(r / "teacher.pt"), ["teacher.pt", "is damaged"]),
    ("distill", KD, lambda r: flip_a_weight_byte(r / "teacher.pt"), ["teacher.pt", "is damaged"]),
]


def EVAL(r, target="s.npz"):
    return [f"{r}/{target}", "--out-dir", f"{r}/out", "--data-dir", f"{r}/fm"]


def DIAGNOSE(r):
    return DISTILL(r)[:6] + ["--teacher", f"{r}/teacher.pt", "--student", f"{r}/teacher.pt", "--size", "tiny",
                             "--num-seqs", "4"]


def samples(r, name="s.npz", n=12, labels=True, **arrays):
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    np.savez(r / name, images, *([np.arange(n) % 10] if labels else []), **arrays)


def rewrite_cache(r, codes=None, labels=None, keep_fingerprint=False):
    """The test split's token cache with other codes or labels, its recorded content fingerprint kept
    (a cache changed after it was built) or recomputed (a cache built wrong)."""
    prefix = r / "out" / "tokens" / "test"
    if codes is not None:
        np.save(f"{prefix}.codes.npy", codes(np.load(f"{prefix}.codes.npy")))
    if labels is not None:
        np.save(f"{prefix}.labels.npy", labels(np.load(f"{prefix}.labels.npy")))
    if not keep_fingerprint:
        meta = json.loads(prefix.with_suffix(".json").read_text())
        meta["content"] = data.fingerprint(np.load(f"{prefix}.codes.npy"), np.load(f"{prefix}.labels.npy"))
        prefix.with_suffix(".json").write_text(json.dumps(meta))


def tamper(path, edit, record=True):
    """One of our checkpoints with its integrity recorded (as every save now writes it), then edited:
    the record kept (a file changed after it was saved), or recomputed (record=False: written so)."""
    ckpt = torch.load(path, weights_only=True)
    ckpt["integrity"] = checks.integrity(ckpt)
    edit(ckpt)
    if not record:
        ckpt.pop("fingerprint", None)
        ckpt["integrity"] = checks.integrity(ckpt)
    torch.save(ckpt, path)


def tamper_save(r, classes):
    """other.pt: a tiny GPT of ours on the same tokenizer, with another number of classes."""
    teacher = tiny_model(3, vocab_size=256, num_classes=classes, grid_size=7)
    ckpt = {"model": teacher.state_dict(), "config": asdict(teacher.config),
            "fingerprints": {"tokenizer": torch.load(r / "teacher.pt", weights_only=True)["fingerprints"]["tokenizer"]}}
    torch.save({**ckpt, "integrity": checks.integrity(ckpt)}, r / "other.pt")


def swap_layers(ckpt):
    """The names of layers 0 and 1 swapped, the tensors in the same order (what a fingerprint of the
    values in order cannot see)."""
    ckpt["model"] = {k.replace("layers.0.", "layers.X.").replace("layers.1.", "layers.0.").replace("layers.X.", "layers.1."): v
                     for k, v in ckpt["model"].items()}


def nan_weight(ckpt):
    ckpt["model"]["norm.weight"][0] = float("nan")


def nan_moment(ckpt):
    next(iter(ckpt["optimizer"]["state"].values()))["exp_avg"].view(-1)[0] = float("nan")


LONG = "n" * 252
# round two: what the first table did not try, by kind (traceback, loss, silent, misleading before)
BAD_INPUTS += [
    # tracebacks: flags without a bound, names the filesystem refuses, a lock that cannot be taken
    ("sample", lambda r: SAMPLE(r) + ["--seed", str(2 ** 64)], None, ["--seed", "out of range"]),
    ("distill", lambda r: DISTILL(r) + ["--seed", str(2 ** 40)], None, ["--seed", "out of range"]),
    ("tokenizer", lambda r: ["--seed", str(2 ** 33), "--out", f"{r}/new.pt"], None, ["--seed"]),
    ("evaluate", lambda r: EVAL(r) + ["--seed", "-1"], None, ["--seed"]),
    ("sample", lambda r: SAMPLE(r) + ["--cfg-scale", "1e300"], None, ["--cfg-scale", "[0, 100]"]),
    ("distill", lambda r: KD(r) + ["--teacher-cfg", "1e9"], None, ["--teacher-cfg", "[0, 100]"]),
    ("distill", lambda r: KD(r) + ["--pool-cfg", "inf"], None, ["--pool-cfg"]),
    ("study", lambda r: ["--seeds", "0,0"], None, ["--seeds", "twice"]),
    ("study", lambda r: ["--seeds", str(2 ** 40)], None, ["--seeds", "out of range"]),
    ("study", lambda r: ["--tune-seed", str(2 ** 40)], None, ["--tune-seed"]),
    ("distill", lambda r: DISTILL(r)[:-1] + [f"{r}/out/{LONG}.pt"], None, ["--out", "too long"]),
    ("distill", lambda r: DISTILL(r)[:-1] + [f"{r}/{LONG}{LONG}/run.pt"], None, ["--out", "too long"]),
    ("sample", lambda r: SAMPLE(r)[:-1] + [f"{r}/{LONG}.png"], None, ["--out", "too long"]),
    ("evaluate", lambda r: EVAL(r) + ["--save-npz", f"{r}/{LONG}.npz"], samples, ["--save-npz", "too long"]),
    ("distill", DISTILL, lambda r: (r / "out" / "run.pt.lock").mkdir(parents=True), ["run.pt.lock", "cannot be made"]),
    ("sample", SAMPLE, lambda r: (r / "s.png.lock").mkdir(), ["s.png.lock", "cannot be made"]),
    ("evaluate", lambda r: [f"{r}/teacher.pt", "--tokenizer", f"{r}/tok.pt", "--num-samples", "10", "--out-dir",
                            f"{r}/out", "--save-npz", f"{r}/x.npz"], lambda r: (r / "x.npz.lock").mkdir(), ["x.npz.lock"]),
    # loss: an output named twice, an earlier diagnosis replaced
    ("sample", lambda r: SAMPLE(r)[:-1] + [f"{r}/x.npz", "--npz", f"{r}/x.npz"], None, ["--npz", "also --out"]),
    ("evaluate", lambda r: EVAL(r) + ["--save-npz", f"{r}/s.npz", "--force"], samples, ["--save-npz", "the target itself"]),
    ("diagnose", DIAGNOSE, lambda r: (r / "out" / "diagnosis.json").write_text("{}"), ["diagnosis.json", "--force"]),
    ("diagnose", DIAGNOSE, lambda r: (r / "out" / "diagnosis.png").write_bytes(b"mine"), ["diagnosis.png", "--force"]),
    ("diagnose", lambda r: DIAGNOSE(r) + ["--compare", f"{r}/d.json"],
     lambda r: ((r / "d.json").write_text("{}"), (r / "out" / "diagnosis_compare.md").write_text("mine")),
     ["diagnosis_compare.md", "--force"]),
    # silent: evaluation inputs read wrong, token caches that are not what they were built as
    ("evaluate", EVAL, lambda r: samples(r, labels=False, arr_1=np.arange(12) + 5), ["labels run from 5 to 16"]),
    ("evaluate", EVAL, lambda r: samples(r, labels=False, arr_1=np.arange(12) * 0.5), ["labels are float64"]),
    ("evaluate", EVAL, lambda r: samples(r, labels=False, arr_1=np.arange(24).reshape(12, 2)), ["labels"]),
    ("evaluate", lambda r: EVAL(r) + ["--ref", f"{r}/ref.npz"],
     lambda r: (samples(r), np.savez(r / "ref.npz", mu=np.full(128, np.nan), sigma=np.eye(128))), ["ref.npz", "damaged"]),
    ("evaluate", lambda r: EVAL(r) + ["--ref", f"{r}/ref.npz"],
     lambda r: (samples(r), np.savez(r / "ref.npz", mu=np.zeros(128), sigma=np.ones(128))), ["ref.npz", "damaged"]),
    ("distill", DISTILL, lambda r: rewrite_cache(r, codes=np.zeros_like, keep_fingerprint=True),
     ["test.*", "changed after it was built"]),
    ("distill", DISTILL, lambda r: rewrite_cache(r, labels=lambda y: y[::-1].copy(), keep_fingerprint=True),
     ["test.*", "changed after it was built"]),
    ("distill", DISTILL, lambda r: rewrite_cache(r, codes=lambda c: c - 300), ["test.*", "codes from -"]),
    ("distill", DISTILL, lambda r: rewrite_cache(r, codes=lambda c: c + 256), ["test.*", "outside 0..255"]),
    ("distill", DISTILL, lambda r: rewrite_cache(r, labels=lambda y: y.astype(np.float32)), ["test.*", "not integers"]),
    ("distill", DISTILL, lambda r: rewrite_cache(r, labels=lambda y: y + 10), ["test.*", "labels from", "0..9"]),
    # silent: checkpoints whose names, config or groups changed after the save, or that carry no record
    ("sample", SAMPLE, lambda r: tamper(r / "teacher.pt", swap_layers), ["teacher.pt", "is damaged", "integrity"]),
    ("sample", SAMPLE, lambda r: tamper(r / "teacher.pt", lambda c: c["config"].update(n_head=1)), ["teacher.pt", "damaged"]),
    ("distill", KD, lambda r: tamper(r / "teacher.pt", lambda c: c["config"].update(rope_base=5000)), ["teacher.pt", "damaged"]),
    ("sample", SAMPLE, lambda r: tamper(r / "tok.pt", lambda c: c["groups"].update({"64": torch.zeros(256, dtype=torch.long)})),
     ["tok.pt", "damaged"]),
    ("sample", SAMPLE, lambda r: tamper(r / "teacher.pt", lambda c: [c.pop("fingerprint"), c.pop("integrity")]),
     ["teacher.pt", "without its fingerprint"]),
    ("sample", SAMPLE, lambda r: tamper(r / "tok.pt", lambda c: [c.pop("fingerprint"), c.pop("integrity")]),
     ["tok.pt", "without its fingerprint"]),
    # misleading before: a damaged input named as divergence
    ("distill", KD, lambda r: tamper(r / "teacher.pt", nan_weight, record=False), ["teacher.pt", "not finite"]),
    ("distill", lambda r: DISTILL(r) + ["--init", f"{r}/teacher.pt"], lambda r: tamper(r / "teacher.pt", nan_weight, record=False),
     ["teacher.pt", "not finite"]),
    ("distill", DISTILL, lambda r: [(r / "fm" / "t10k-labels-idx1-ubyte.gz").unlink(), (r / "fm" / "t10k-labels-idx1-ubyte.gz").mkdir(),
                                    shutil.rmtree(r / "out" / "tokens")], ["t10k-labels-idx1-ubyte.gz", "cannot be read"]),
    # a teacher (or a target) of other classes: its null class is a real class of the other model
    ("diagnose", lambda r: DIAGNOSE(r)[:-5] + [f"{r}/other.pt", "--size", "tiny", "--num-seqs", "4"],
     lambda r: tamper_save(r, 12), ["other.pt", "has 10 classes", "12: pass two models"]),
    ("sample", lambda r: SAMPLE(r) + ["--draft", f"{r}/other.pt"], lambda r: tamper_save(r, 12), ["other.pt", "12 classes"]),
    ("tokenizer", lambda r: ["--codebook-size", str(10 ** 9), "--out", f"{r}/new.pt"], None, ["--codebook-size", "65536"]),
    ("diagnose", lambda r: DIAGNOSE(r) + ["--compare", f"{r}/nothing.json"], None, ["nothing.json", "no such file"]),
    ("distill", lambda r: KD(r) + ["--teacher-preset", "bogus"], None, ["--teacher-preset", "invalid choice: 'bogus'"]),
    # counts no machine holds: refused before the work, not killed by the kernel later
    ("sample", lambda r: SAMPLE(r)[:4] + ["--per-class", str(10 ** 11), "--out", f"{r}/s.png"], None,
     ["--per-class", "GB", "pass fewer"]),
    ("evaluate", lambda r: [f"{r}/teacher.pt", "--tokenizer", f"{r}/tok.pt", "--num-samples", str(10 ** 12), "--out-dir",
                            f"{r}/out"], None, ["--num-samples", "GB", "pass fewer"]),
    # data.py and classifier.py, the two small programs
    ("data", lambda r: ["--folder", f"{r}/fm", "--image-size", "-5"], None, ["--image-size", ">= 1"]),
    ("classifier", lambda r: ["--out", f"{r}/c.pt", "--epochs", "-1", "--data-dir", f"{r}/fm"], None, ["--epochs", ">= 1"]),
    ("classifier", lambda r: ["--out", f"{r}/notes.txt/c.pt", "--data-dir", f"{r}/fm"],
     lambda r: (r / "notes.txt").write_text("hi"), ["--out", "notes.txt is a file"]),
    ("classifier", lambda r: ["--out", f"{r}/c.pt", "--data-dir", f"{r}/fm"], lambda r: (r / "c.pt.lock").mkdir(),
     ["c.pt.lock", "cannot be made"]),
    # more flags at their edges, program by program
    ("evaluate", lambda r: EVAL(r) + ["--cfg-scale", "1e9"], samples, ["--cfg-scale", "[0, 100]"]),
    ("sample", lambda r: SAMPLE(r) + ["--top-k", "-1"], None, ["--top-k"]),
    ("sample", lambda r: SAMPLE(r) + ["--classes", "0,0"], None, ["--classes", "twice"]),
    ("sample", lambda r: SAMPLE(r) + ["--classes", str(2 ** 40)], None, ["--classes", "out of range"]),
    ("diagnose", lambda r: DIAGNOSE(r)[:-1] + ["0"], None, ["--num-seqs", ">= 1"]),
    ("distill", lambda r: KD(r) + ["--window", "0"], None, ["--window", ">= 1"]),
    ("distill", lambda r: KD(r) + ["--eval-cfg", "1,nan"], None, ["--eval-cfg"]),
    ("study", lambda r: ["--rows", ","], None, ["--rows", "none given"]),
    ("tokenizer", lambda r: ["--out", f"{r}/fm", "--steps", "1"], None, ["--out", "is a folder"]),
    # bench.py: flags parsed and bounded like every other program's
    ("bench", lambda r: ["--sizes", "teacher,bogus"], None, ["--sizes", "unknown preset 'bogus'"]),
    ("bench", lambda r: ["--teacher", "huge"], None, ["--teacher", "unknown preset"]),
    ("bench", lambda r: ["--speculative", "--gamma", "4,a"], None, ["--gamma", "'a' is not an integer"]),
    ("bench", lambda r: ["--speculative", "--gamma", "0"], None, ["--gamma", ">= 1"]),
    ("bench", lambda r: ["--speculative", "--relax-delta", "0,2"], None, ["--relax-delta", "[0, 1]"]),
    ("bench", lambda r: ["--grid", "5000"], None, ["--grid", "[1, 64]"]),
    ("bench", lambda r: ["--gsd", "--speculative"], None, ["--speculative and --gsd", "pass one"]),
    ("bench", lambda r: ["--device", "cuda:7"], None, ["--device"]),
    ("distill", lambda r: DISTILL(r) + ["--resume", "--max-iters", "4"],
     lambda r: (distill.main(DISTILL(r)), tamper(r / "out" / "run.pt", lambda c: c["args"].update(max_iters=4)),
                tamper(r / "out" / "run.pt", nan_moment)), ["run.pt", "optimizer state", "not finite"]),
]
PROGRAMS = {"distill": distill.main, "sample": sample.main, "evaluate": evaluate.main, "tokenizer": tok.main,
            "study": study.main, "diagnose": diagnose.main, "bench": bench.main, "data": data.main,
            "classifier": classifier.main}


@pytest.mark.parametrize("program, argv, make, words", BAD_INPUTS,
                         ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD_INPUTS)])
def test_a_bad_input_is_refused_in_one_sentence_naming_it_and_nothing_is_lost(bad_env, tmp_path, capsys, monkeypatch,
                                                                             program, argv, make, words):
    r = tmp_path / "r"
    shutil.copytree(bad_env, r)
    monkeypatch.chdir(r)  # out/ and data/ defaults land in the copy
    if make:
        make(r)
    before = snapshot(r)
    code, printed = refusal(PROGRAMS[program], argv(r), capsys)
    assert code not in (0, None), printed
    assert "Traceback" not in printed
    for word in words:
        assert word in printed, (word, printed)
    after = snapshot(r)
    assert {p: after.get(p) for p in before} == before, "a file that existed before was changed or removed"


def test_a_run_that_diverges_keeps_only_finite_weights_and_says_which_step_truthfully(bad_env, tmp_path, capsys):
    r = tmp_path / "r"
    shutil.copytree(bad_env, r)
    code, printed = refusal(distill.main, DISTILL(r) + ["--lr", "1e9", "--warmup", "0", "--max-iters", "30",
                                                        "--ckpt-interval", "1000"], capsys)
    assert "training diverged; no checkpoint was written" in printed and "lower --lr" in printed
    assert not (r / "out" / "run.pt").exists()
    code, printed = refusal(distill.main, DISTILL(r) + ["--lr", "1e9", "--warmup", "0", "--max-iters", "30",
                                                        "--ckpt-interval", "1"], capsys)
    kept = torch.load(r / "out" / "run.pt", weights_only=True)
    assert f"run.pt keeps step {kept['step']} (finite weights)" in printed and "--out elsewhere" in printed
    assert all(torch.isfinite(v).all() for v in kept["model"].values())


def test_names_torch_save_would_refuse_are_written_and_a_tiny_temperature_samples_greedily(bad_env, tmp_path):
    r = tmp_path / "r"
    shutil.copytree(bad_env, r)
    distill.main(DISTILL(r)[:-1] + [f"{r}/out/run"])  # no suffix: torch.save refuses a temporary name without a stem
    assert torch.load(r / "out" / "run", weights_only=True)["step"] == 2
    assert not [p for p in (r / "out").iterdir() if p.name.startswith(".tmp-")]
    model, labels = tiny_model(), torch.arange(5)
    greedy = sample.generate(model, labels, 2.0, temperature=0)
    for tiny in (1e-300, 1e-30):  # below float32's range (0 there), and inside it
        assert torch.equal(sample.generate(model, labels, 2.0, temperature=tiny, generator=torch.Generator()), greedy)


def test_palette_and_16_bit_pngs_are_read_as_the_pixels_they_show(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    for name, palette, shown in (("grey", range(256), a), ("inverted", range(255, -1, -1), 255 - a)):
        im = Image.frombytes("P", (28, 28), a.tobytes())
        im.putpalette([v for i in palette for v in (i, i, i)])
        im.save(tmp_path / f"{name}.png")
        assert np.array_equal(evaluate.read_png(tmp_path / f"{name}.png"), shown[..., None]), name  # not the indices
    colours = np.random.default_rng(1).integers(0, 256, (16, 3), dtype=np.uint8)
    im = Image.frombytes("P", (28, 28), (a % 16).tobytes())
    im.putpalette(colours.flatten().tolist())
    im.save(tmp_path / "colour.png")
    assert np.array_equal(evaluate.read_png(tmp_path / "colour.png"), colours[a % 16])
    Image.fromarray(a.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit grey
    assert Image.open(tmp_path / "deep.png").mode.startswith("I") and np.array_equal(evaluate.read_png(tmp_path / "deep.png"), a[..., None])
    Image.fromarray(np.dstack([a, a, a, a])).save(tmp_path / "alpha.png")
    assert np.array_equal(evaluate.read_png(tmp_path / "alpha.png"), np.dstack([a, a, a]))


def test_a_shipped_file_changed_in_any_way_is_refused_and_a_foreign_one_is_named_unchecked(tmp_path, monkeypatch, capsys):
    shipped = tmp_path / "weights"
    shipped.mkdir()
    for name in checks.SHIPPED:
        shutil.copy(data.WEIGHTS / name, shipped / name)
    monkeypatch.setattr(checks, "WEIGHTS", shipped)
    assert load_checkpoint(shipped / "teacher.pt").fingerprint == load_checkpoint(data.WEIGHTS / "teacher.pt").fingerprint
    ckpt = torch.load(shipped / "tokenizer.pt", weights_only=True)
    ckpt["groups"] = {"64": torch.zeros(256, dtype=torch.long)}  # a file before "integrity": its fingerprint still holds
    torch.save(ckpt, shipped / "tokenizer.pt")
    assert checks.weights_fingerprint(ckpt["model"]) == ckpt["fingerprint"]
    with pytest.raises(SystemExit, match="tokenizer.pt holds the shipped weights but is not the file this repository ships .*"
                                         "git checkout weights/tokenizer.pt"):
        tok.load_tokenizer(shipped / "tokenizer.pt")
    save_tiny(shipped / "teacher.pt", tiny_model())  # rebuilt by the README's commands: other weights, its own record
    assert load_checkpoint(shipped / "teacher.pt").config == tiny_model().config
    torch.save({"model": tiny_model().state_dict()}, tmp_path / "c2i_tiny.pt")  # LlamaGen's layout: nothing to check
    load_checkpoint(tmp_path / "c2i_tiny.pt", "tiny", grid_size=4)
    assert "c2i_tiny.pt: no fingerprint of ours (LlamaGen's, or a bare state dict): loaded as it is, unchecked" in \
        capsys.readouterr().out


def hold_lock(path):
    """Another process holding the writer's lock of `path` (checks.output_lock) until it is killed."""
    code = (f"import sys, time; sys.path.insert(0, {str(Path(__file__).parent)!r}); from checks import output_lock\n"
            f"with output_lock({str(path)!r}):\n    print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_of_a_study_run_or_of_a_save_npz_is_refused_naming_the_first(bad_env, tmp_path, capsys):
    r = tmp_path / "r"
    shutil.copytree(bad_env, r)
    argv = ["--seeds", "0", "--no-tune", "--rows", "kd_cont", *DISTILL(r)[:8], "--size", "tiny", "--batch-size", "4",
            "--max-iters", "2", "--kd-iters", "2", "--study-iters", "2", "--eval-samples", "0", "--eval-seqs", "5",
            "--teacher", f"{r}/teacher.pt"]
    for target in (r / "out" / "ce" / "ckpt.pt", r / "x.npz"):  # a study's first run; evaluate.py's --save-npz
        holder = hold_lock(target)
        try:
            before = snapshot(r)
            if target.suffix == ".npz":
                samples(r)
                before = snapshot(r)
                code, printed = refusal(evaluate.main, EVAL(r) + ["--save-npz", str(target)], capsys)
            else:
                code, printed = refusal(study.main, argv, capsys)
        finally:
            holder.kill()
            holder.wait()
        assert code not in (0, None) and "Traceback" not in printed
        assert f"{target} is being written by process {holder.pid}" in printed, printed
        after = snapshot(r)
        assert {p: after.get(p) for p in before} == before


def test_an_out_dir_made_read_only_during_a_run_ends_in_one_sentence_and_the_run_resumes(bad_env, tmp_path, capsys,
                                                                                          monkeypatch):
    r = tmp_path / "r"
    shutil.copytree(bad_env, r)
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):  # the second checkpoint meets a folder remounted read-only
        calls.append(f)
        if len(calls) == 2:
            raise OSError(errno.EROFS, "Read-only file system", str(f))
        return real(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    argv = DISTILL(r) + ["--max-iters", "4", "--ckpt-interval", "2"]
    code, printed = refusal(distill.main, argv, capsys)
    assert code not in (0, None) and "Traceback" not in printed
    assert f"cannot write {r}/out/run.pt: read-only file system" in printed
    assert f"{r}/out/run.pt keeps step 2: the same command with --resume continues from it" in printed
    monkeypatch.undo()
    distill.main(argv + ["--resume"])
    assert torch.load(r / "out" / "run.pt", weights_only=True)["step"] == 4


def test_a_full_disk_ends_in_one_sentence_and_the_last_checkpoint_still_resumes(bad_env, tmp_path, capsys):
    r, disk = tmp_path / "r", tmp_path / "disk"
    shutil.copytree(bad_env, r)
    distill.main(DISTILL(r) + ["--max-iters", "4", "--ckpt-interval", "2"])
    size = (r / "out" / "run.pt").stat().st_size  # room for one checkpoint, not for its replacement beside it
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={(size * 3 // 2) // 4096 * 4096 + 4096}", "tmpfs",
                              str(disk)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"this machine allows no small tmpfs to fill (mount: {mounted.stderr.strip()[:80]})")
    try:
        code, printed = refusal(distill.main, DISTILL(r)[:-1] + [f"{disk}/run.pt", "--max-iters", "4", "--ckpt-interval", "2"],
                                capsys)
        assert code not in (0, None) and "Traceback" not in printed
        assert f"no space left to write {disk}/run.pt" in printed and f"{disk}/run.pt keeps step 2" in printed
        assert torch.load(disk / "run.pt", weights_only=True)["step"] == 2 and sorted(os.listdir(disk)) == ["run.pt"]
        (disk / "s.png").write_bytes(b"an earlier grid")
        (disk / "filler").write_bytes(b"\0" * shutil.disk_usage(disk).free)  # now nothing fits
        for program, argv in ((sample.main, SAMPLE(r)[:-1] + [f"{disk}/s.png", "--force"]),
                              (sample.main, SAMPLE(r)[:-1] + [f"{disk}/t.png"]),
                              (sample.main, SAMPLE(r) + ["--npz", f"{disk}/x.npz"])):
            before = snapshot(disk)
            code, printed = refusal(program, argv, capsys)
            assert code not in (0, None) and "Traceback" not in printed and "no space left" in printed, printed
            assert snapshot(disk) == before  # nothing half-written, the earlier grid as it was
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_a_second_run_on_one_output_is_refused_and_ctrl_c_names_the_step_and_the_checkpoint(bad_env, tmp_path, capsys):
    """A real second process holds the lock; the in-process run is refused naming its pid. Then Ctrl-C
    ends that process with one line that names the checkpoint --resume continues from."""
    r = tmp_path / "r"
    shutil.copytree(bad_env, r)
    argv = DISTILL(r) + ["--max-iters", "1000000", "--ckpt-interval", "20"]
    # a shell's background job (CI under nohup ... &) ignores SIGINT, and the child would inherit that
    first = subprocess.Popen([sys.executable, "distill.py", *argv], cwd=Path(__file__).parent, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not (r / "out" / "run.pt").exists():
            assert first.poll() is None and time.time() < deadline, first.stdout.read()
            time.sleep(0.05)
        code, printed = refusal(distill.main, argv, capsys)
        assert code not in (0, None) and f"is being written by process {first.pid}" in printed
        first.send_signal(2)  # SIGINT, as Ctrl-C
        out = first.communicate(timeout=60)[0]
    finally:
        first.kill()
    step = torch.load(r / "out" / "run.pt", weights_only=True)["step"]
    assert first.returncode != 0 and "Traceback" not in out, out
    assert f"run.pt keeps step {step}: the same command with --resume continues from it" in out.splitlines()[-1]
