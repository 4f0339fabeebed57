"""VQ tokenizer: images <-> grids of codes, and its training loop.

One architecture in LlamaGen's layout (VQGAN-style encoder/decoder of ResNet blocks, GroupNorm and
attention at the lowest resolution; an L2-normalised codebook), two sizes:
  - "fmnist": the embedded default, 28x28 grey -> 7x7 codes from a 256-entry codebook, shipped as
    weights/tokenizer.pt (12000 steps, about 11 minutes on 2 CPU cores; MSE + commitment only: at
    28 px no GAN is needed); with --grid 14, one downsampling fewer: 14x14 codes, the long horizon
    (196 codes per image, closer to the 256 of LlamaGen at 256 px);
  - "VQ-16": LlamaGen's vq_ds16_c2i.pt (256x256 RGB -> 16x16 codes, 16384 x 8 codebook), loaded
    from its checkpoint with strict key checks.

    python tokenizer.py                  # trains out/tokenizer.pt as the shipped one, writes out/tokenizer_recon.png
    python tokenizer.py --steps 200      # a quick one
    python tokenizer.py --grid 14        # 14x14 codes: out/grid14/tokenizer.pt, where distill.py --grid 14 looks
                                         # (about an hour; killed, the same command continues it)

Codes are the AR models' vocabulary: `encode(images) -> codes (B, h, w)`, `decode(codes) -> images`
(uint8 (B, H, W, C) at the API, [-1, 1] inside). `codebook_groups(k)` partitions the codebook by
k-means for VarKD's codebook relaxation.
"""
import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.cluster.vq import kmeans2
from tqdm import tqdm

from checks import check_output, check_weights, integrity, output_lock, positive, positive_int, ranged, read_checkpoint, seed_int
from data import atomic_write, fingerprint, load_fashion_mnist, save_grid


@dataclass
class VQConfig:
    arch: str = "conv"          # "conv": the small default; "vqgan": LlamaGen's VQ-16 towers
    image_size: int = 28
    in_channels: int = 1
    ch: int = 32
    ch_mult: tuple = (1, 2, 2)  # one level per entry; each level but the last halves the side
    num_res_blocks: int = 1     # encoder blocks per level; the decoder has one more (LlamaGen)
    z_channels: int = 64
    codebook_size: int = 256
    codebook_dim: int = 8
    norm_groups: int = 32
    commit_beta: float = 0.25

    @property
    def grid_size(self):
        return self.image_size // 2 ** (len(self.ch_mult) - 1)


PRESETS = {
    "fmnist": dict(),
    "fmnist14": dict(ch_mult=(1, 2)),
    "VQ-16": dict(arch="vqgan", image_size=256, in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                  z_channels=256, codebook_size=16384, codebook_dim=8),
}
GRIDS = {7: "fmnist", 14: "fmnist14"}  # the Fashion-MNIST presets by codes per side (28 / 4, 28 / 2)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map (1x1 convs, as LlamaGen)."""
    def __init__(self, c, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Resample(nn.Module):
    def __init__(self, c, down):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(c, c, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        if self.down:  # asymmetric padding, as LlamaGen (and taming-transformers)
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def level(cin, cout, n_res, attn, resample, groups):
    """One resolution level: `res` blocks, `attn` blocks after each (lowest level only), a resample."""
    block = nn.Module()
    block.res = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n_res))
    block.attn = nn.ModuleList(AttnBlock(cout, groups) for _ in range(n_res if attn else 0))
    if resample is not None:
        setattr(block, resample, Resample(cout, down=resample == "downsample"))
    return block


def run_level(block, x):
    for i, res in enumerate(block.res):
        x = res(x)
        if len(block.attn):
            x = block.attn[i](x)
    for name in ("downsample", "upsample"):
        if hasattr(block, name):
            x = getattr(block, name)(x)
    return x


class VQGANTower(nn.Module):
    """LlamaGen's encoder (image -> z) or decoder (z -> image), with its module names."""
    def __init__(self, cfg, decoder):
        super().__init__()
        c, g, n = cfg.ch, cfg.norm_groups, len(cfg.ch_mult)
        self.decoder = decoder
        top = c * cfg.ch_mult[-1]
        if not decoder:
            self.conv_in = nn.Conv2d(cfg.in_channels, c, 3, padding=1)
            chans = [c * m for m in (1,) + tuple(cfg.ch_mult)]
            self.conv_blocks = nn.ModuleList(
                level(chans[i], chans[i + 1], cfg.num_res_blocks, i == n - 1,
                      "downsample" if i < n - 1 else None, g) for i in range(n))
        else:
            self.conv_in = nn.Conv2d(cfg.z_channels, top, 3, padding=1)
            chans = [top] + [c * m for m in reversed(cfg.ch_mult)]
        self.mid = nn.ModuleList([ResnetBlock(top, top, g), AttnBlock(top, g), ResnetBlock(top, top, g)])
        if decoder:
            self.conv_blocks = nn.ModuleList(
                level(chans[i], chans[i + 1], cfg.num_res_blocks + 1, i == 0,
                      "upsample" if i < n - 1 else None, g) for i in range(n))
        self.norm_out = nn.GroupNorm(g, chans[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chans[-1], cfg.in_channels if decoder else cfg.z_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        if self.decoder:
            x = self.mid[2](self.mid[1](self.mid[0](x)))
        for block in self.conv_blocks:
            x = run_level(block, x)
        if not self.decoder:
            x = self.mid[2](self.mid[1](self.mid[0](x)))
        return self.conv_out(F.silu(self.norm_out(x)))


def conv_tower(cfg, decoder):
    """The small default: two stride-2 convolutions down (or transposed ones up) and 3x3 convs at
    the code grid; at 14x14 codes (ch_mult of two levels) the second one keeps the side. On 2 CPU
    cores the VQGAN tower at 28 px trains ~10x slower for little gain."""
    c, z, twice = cfg.ch, cfg.z_channels, len(cfg.ch_mult) == 3
    if not decoder:
        return nn.Sequential(nn.Conv2d(cfg.in_channels, c, 4, 2, 1), nn.SiLU(),
                             nn.Conv2d(c, 2 * c, 4, 2, 1) if twice else nn.Conv2d(c, 2 * c, 3, 1, 1), nn.SiLU(),
                             nn.Conv2d(2 * c, 2 * c, 3, 1, 1), nn.SiLU(), nn.Conv2d(2 * c, z, 3, 1, 1))
    return nn.Sequential(nn.Conv2d(z, 2 * c, 3, 1, 1), nn.SiLU(), nn.Conv2d(2 * c, 2 * c, 3, 1, 1), nn.SiLU(),
                         nn.ConvTranspose2d(2 * c, c, 4, 2, 1) if twice else nn.Conv2d(2 * c, c, 3, 1, 1), nn.SiLU(),
                         nn.ConvTranspose2d(c, cfg.in_channels, 4, 2, 1))


class VQModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        tower = VQGANTower if cfg.arch == "vqgan" else conv_tower
        self.encoder = tower(cfg, decoder=False)
        self.decoder = tower(cfg, decoder=True)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)
        self.quantize.embedding.weight.data.uniform_(-1 / cfg.codebook_size, 1 / cfg.codebook_size)
        # the codes of the last 65536 latents (LlamaGen's usage log); -1 = empty; finds dead codes
        self.quantize.register_buffer("codebook_used", torch.full((65536,), -1.0))
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)
        self.groups = {}  # n_groups -> LongTensor (V,), k-means cache saved with the checkpoint
        self.fingerprint = None

    def codebook(self):
        return F.normalize(self.quantize.embedding.weight, dim=-1)  # (V, d), unit vectors

    def quantize_latent(self, z):
        """z (B, d, h, w) -> straight-through z_q, codes (B, h, w), codebook + commitment loss."""
        z = F.normalize(z.permute(0, 2, 3, 1), dim=-1)  # (B, h, w, d)
        codes = (z @ self.codebook().t()).argmax(-1)      # nearest unit vector = largest dot product
        z_q = self.codebook()[codes]
        loss = F.mse_loss(z_q, z.detach()) + self.cfg.commit_beta * F.mse_loss(z, z_q.detach())
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2), codes, loss

    def forward(self, x):
        """x float (B, C, H, W) in [-1, 1] -> reconstruction, codes, VQ loss (training)."""
        z_q, codes, vq_loss = self.quantize_latent(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(z_q)), codes, vq_loss

    @torch.no_grad()
    def encode(self, images):
        """uint8 images (B, H, W, C), numpy or torch -> codes LongTensor (B, h, w)."""
        x = torch.as_tensor(np.asarray(images), device=self.codebook().device)
        expect = (self.cfg.image_size, self.cfg.image_size, self.cfg.in_channels)
        if x.dim() != 4 or tuple(x.shape[1:]) != expect:
            raise SystemExit(f"the tokenizer takes uint8 images (N, {', '.join(map(str, expect))}), got "
                             f"{tuple(x.shape)}: resize the images or use a matching tokenizer")
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
        return self.quantize_latent(self.quant_conv(self.encoder(x)))[1]

    @torch.no_grad()
    def decode(self, codes):
        """codes (B, h, w) or (B, h*w) -> uint8 images (B, H, W, C), on the model's device."""
        codes = torch.as_tensor(codes, device=self.codebook().device).long()
        g = self.cfg.grid_size
        z = self.codebook()[codes.reshape(-1, g, g)].permute(0, 3, 1, 2)
        x = self.decoder(self.post_quant_conv(z))
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)

    def codebook_groups(self, n_groups):
        """Partition of the codebook into n_groups by k-means on the unit code vectors: a LongTensor
        (V,) of group ids 0..G-1 (G = n_groups unless k-means left a cluster empty). VarKD pools
        the probabilities of near-duplicate codes within a group."""
        if n_groups not in self.groups:
            vectors = self.codebook().detach().double().cpu().numpy()  # (V, d)
            # k-means++ seeding, keeping each code's distance to its nearest centre: O(V k d), where
            # scipy's minit="++" recomputes all of them per centre, O(V k^2 d): hours for VQ-16's 4096
            rng = np.random.default_rng(0)
            centres = [rng.integers(len(vectors))]
            d2 = ((vectors - vectors[centres[0]]) ** 2).sum(1)
            for _ in range(n_groups - 1):
                if d2.sum() == 0:  # fewer distinct codes than groups
                    break
                centres.append(rng.choice(len(vectors), p=d2 / d2.sum()))
                d2 = np.minimum(d2, ((vectors - vectors[centres[-1]]) ** 2).sum(1))
            _, labels = kmeans2(vectors, vectors[centres], minit="matrix")
            self.groups[n_groups] = torch.from_numpy(np.unique(labels, return_inverse=True)[1].ravel())
        return self.groups[n_groups]


def weights_fingerprint(model):
    return fingerprint(*(t.detach().cpu().numpy() for t in model.state_dict().values()))


def save_tokenizer(model, path, **meta):
    state = {"model": model.state_dict(), "config": asdict(model.cfg), "fingerprint": model.fingerprint,
             "groups": {str(k): v for k, v in model.groups.items()}, **meta}
    state["integrity"] = integrity(state)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_tokenizer(path, preset="VQ-16", image_size=None):
    """Our tokenizer checkpoints, or LlamaGen's (vq_ds16_c2i.pt: {"model": state_dict}, no config,
    built with `preset`); image_size overrides the side it encodes (VQ-16 is convolutional: LlamaGen
    uses it at 256 and 384 px). Returns the model in eval mode with .fingerprint set from its weights."""
    ckpt = read_checkpoint(path, "tokenizer", "train one with `python tokenizer.py` or pass --tokenizer PATH")
    sd = ckpt.get("model", ckpt)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SystemExit(f"{path} holds no state dict: pass a tokenizer checkpoint")
    if isinstance(ckpt.get("config"), dict) and set(ckpt["config"]) - set(VQConfig.__dataclass_fields__):
        raise SystemExit(f"{path} is not a tokenizer (a GPT's or another model's config): pass the tokenizer "
                         f"checkpoint as --tokenizer, e.g. weights/tokenizer.pt")
    if "config" in ckpt:
        cfg = dict(ckpt["config"], ch_mult=tuple(ckpt["config"]["ch_mult"]))
    else:
        cfg = PRESETS[preset]
    cfg = {**cfg, "image_size": image_size or cfg.get("image_size", VQConfig.image_size)}
    if cfg["image_size"] % 2 ** (len(cfg.get("ch_mult", VQConfig.ch_mult)) - 1):
        raise SystemExit(f"--image-size {image_size} is not a multiple of the tokenizer's downsampling "
                         f"{2 ** (len(cfg.get('ch_mult', VQConfig.ch_mult)) - 1)}: pick one that is")
    model = VQModel(VQConfig(**cfg))
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise SystemExit(f"{path} does not fit the tokenizer architecture: missing keys {missing[:3]}, "
                         f"unexpected keys {unexpected[:3]}, wrong shapes {wrong[:3]}; pass a "
                         f"checkpoint written by tokenizer.py or LlamaGen's {preset}")
    check_weights(path, ckpt, sd)
    model.load_state_dict(sd)
    model.groups = {int(k): v for k, v in ckpt.get("groups", {}).items()}
    model.fingerprint = weights_fingerprint(model)
    return model.eval()


@torch.no_grad()
def evaluate(model, images, batch_size=500):
    """Reconstruction MSE (on [0, 1]), PSNR (dB) and the fraction of codes used on `images`."""
    model.eval()
    se, used = 0.0, torch.zeros(model.cfg.codebook_size, dtype=torch.bool)
    for i in range(0, len(images), batch_size):
        x = torch.as_tensor(images[i:i + batch_size])
        codes = model.encode(x)
        used[codes.flatten().cpu()] = True
        se += ((model.decode(codes).cpu().float() - x.float()) / 255).pow(2).sum().item()
    mse = se / images.size
    return mse, 10 * math.log10(1 / mse), used.float().mean().item()


def train(model, images, steps, batch_size=128, lr=2e-3, seed=0, reseed_every=100, state=None, save_every=500):
    """Adam on MSE + VQ losses with warm-up and cosine decay; codes unused in the last 65536
    latents are re-seeded to random encoder outputs (no codebook collapse). With `state` (a path), the
    run is saved there every save_every steps and continued from it when it exists: a killed run
    started again ends with the weights of one that never stopped (the 14x14 tokenizer is an hour).
    Trains `model` in place; returns the seconds it trained, every stretch of a continued run counted."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    settings = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, reseed_every=reseed_every,
                    config=asdict(model.cfg), data=fingerprint(images))
    start, before, t0 = 0, 0.0, time.time()
    if state is not None and Path(state).exists():
        saved = read_checkpoint(state, "partial tokenizer run", f"delete {state} to start over")
        if saved.get("settings") != settings:
            raise SystemExit(f"{state} is a partial run with other settings ({saved.get('settings')}): run the "
                             f"command that started it to continue it, or delete it to start over")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        g.set_state(saved["rng"])
        start, before = saved["step"], saved["seconds"]
        print(f"continuing {state} from step {start} of {steps}")
    model.train()
    bar = tqdm(range(start, steps), desc="tokenizer", initial=start, total=steps)
    for step in bar:
        frac = step / max(1, steps)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * frac))
        idx = torch.randint(len(images), (batch_size,), generator=g)
        x = torch.as_tensor(images[idx.numpy()]).permute(0, 3, 1, 2).float() / 127.5 - 1
        recon, codes, vq_loss = model(x)
        loss = F.mse_loss(recon, x) + vq_loss
        if not torch.isfinite(loss):
            raise SystemExit(f"the tokenizer's loss is {loss.item()} at step {step}: training diverged and no "
                             f"tokenizer is written; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        used = model.quantize.codebook_used
        flat = codes.flatten().float()[-len(used):]
        used.copy_(torch.cat([used[len(flat):], flat]))
        if (step + 1) % reseed_every == 0 and step < 0.9 * steps:
            dead = torch.ones(model.cfg.codebook_size, dtype=torch.bool)
            dead[used[used >= 0].long()] = False
            if dead.any():
                with torch.no_grad():
                    z = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1)
                    z = z.reshape(-1, model.cfg.codebook_dim)
                    pick = torch.randint(len(z), (int(dead.sum()),), generator=g)
                    model.quantize.embedding.weight[dead] = F.normalize(z[pick], dim=-1)
        if step % 10 == 0:
            n_used = len(used[used >= 0].unique())
            bar.set_postfix(loss=f"{loss.item():.4f}", codes_used=f"{n_used}/{model.cfg.codebook_size}")
        if state is not None and (step + 1) % save_every == 0 and step + 1 < steps:
            run = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": g.get_state(),
                   "step": step + 1, "settings": settings, "seconds": before + time.time() - t0}
            run["integrity"] = integrity(run)
            atomic_write(state, lambda tmp: torch.save(run, tmp))
    model.eval()
    return before + time.time() - t0


def partial_path(path):
    return str(path).rsplit(".", 1)[0] + ".partial.pt"


def build(path, data_dir="data", steps=12000, batch_size=128, lr=2e-3, codebook_size=256, seed=0, grid=7):
    """Trains the default tokenizer on Fashion-MNIST (grid 7 or 14 codes per side), saves it to
    `path` with its test figures and writes <path>_recon.png (originals above reconstructions).
    Until then the run is kept in <path>.partial.pt, so the same call after a kill continues it."""
    torch.manual_seed(seed)
    train_images, _ = load_fashion_mnist("train", data_dir)
    test_images, _ = load_fashion_mnist("test", data_dir)
    model = VQModel(VQConfig(**PRESETS[GRIDS[grid]], codebook_size=codebook_size))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training a {n_params / 1e6:.2f}M-parameter VQ tokenizer: 28x28 -> {model.cfg.grid_size}x"
          f"{model.cfg.grid_size} codes of {codebook_size}, {steps} steps")
    partial = partial_path(path)
    minutes = train(model, train_images, steps, batch_size, lr, seed, state=partial) / 60
    mse, psnr, usage = evaluate(model, test_images)
    model.codebook_groups(codebook_size // 4)  # VarKD's default partition, cached in the file
    model.fingerprint = weights_fingerprint(model)
    save_tokenizer(model, path, test_mse=mse, test_psnr=psnr, code_usage=usage,
                   train_minutes=minutes, data=fingerprint(train_images))
    Path(partial).unlink(missing_ok=True)
    print(f"trained in {minutes:.1f} min; test MSE {mse:.5f}, PSNR {psnr:.2f} dB, "
          f"{usage:.1%} of codes used; saved {path} (fingerprint {model.fingerprint})")
    recon_path = str(path).rsplit(".", 1)[0] + "_recon.png"
    x = test_images[:64]
    recon = model.decode(model.encode(x)).cpu().numpy()
    rows = np.stack([x.reshape(4, 16, 28, 28, 1), recon.reshape(4, 16, 28, 28, 1)], 1)
    save_grid(rows.reshape(8, 16, 28, 28, 1), recon_path)
    print(f"originals above reconstructions: {recon_path}")
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data", help="Fashion-MNIST folder (default: data, then the "
                   "Debian package's, then download)")
    p.add_argument("--grid", type=int, default=7, choices=sorted(GRIDS), help="codes per image side: 7 (49 codes, "
                   "the shipped tokenizer's) or 14 (196, the long horizon) (default: 7)")
    p.add_argument("--out", help="checkpoint path; an existing file is refused unless --force, since everything "
                   "encoded with it is tied to it (default: out/tokenizer.pt; out/grid14/tokenizer.pt with --grid 14, "
                   "where distill.py --grid 14 looks for it)")
    p.add_argument("--force", action="store_true", help="replace an existing --out (and its _recon.png)")
    p.add_argument("--steps", type=positive_int, default=12000, help="training steps, >= 1 (default: 12000, the "
                   "shipped tokenizer's, ~11 min on 2 CPU cores)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per step, >= 1 (default: 128)")
    p.add_argument("--lr", type=positive, default=2e-3, help="peak Adam learning rate, > 0 (default: 2e-3)")
    p.add_argument("--codebook-size", type=ranged(int, 4, 2 ** 16), default=256, help="number of codes, 4 to 65536 "
                   "(LlamaGen's VQ-16 has 16384; VarKD groups "
                   "them by four) (default: 256)")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed, >= 0 (default: 0)")
    args = p.parse_args(argv)
    args.out = args.out or ("out/tokenizer.pt" if args.grid == 7 else f"out/grid{args.grid}/tokenizer.pt")
    check_output(args.out, "--out", args.force)
    check_output(str(args.out).rsplit(".", 1)[0] + "_recon.png", "--out", args.force, kind="image")
    with output_lock(args.out):
        try:
            build(args.out, args.data_dir, args.steps, args.batch_size, args.lr, args.codebook_size, args.seed,
                  args.grid)
        except KeyboardInterrupt:
            raise SystemExit(f"interrupted: {args.out} is written at the end of training; the run so far is kept in "
                             f"{partial_path(args.out)} (every 500 steps), and the same command continues it") from None


if __name__ == "__main__":
    main()
