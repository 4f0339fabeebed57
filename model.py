"""
The GPT: a Llama-style class-conditional transformer over VQ codes, with a KV cache.

Module and parameter names are LlamaGen's (autoregressive/models/gpt.py), so its class-to-image
checkpoints (c2i_B_256.pt, c2i_L_256.pt, ...) load with strict=True:

    model = load_checkpoint("c2i_B_256.pt", preset="B")   # LlamaGen file: no config inside
    model = load_checkpoint("out/teacher.pt")             # ours: the config is inside

The sequence is [class token, code 0, ..., code T-2]; logits[:, t] predicts code t. Decoding
follows gpt-fast: setup_cache(), prefill() the class (and any known codes), then decode(), which
runs a compiled graph for a model its caller passed to compile_decode(model, "compiled").
"""
import contextlib
import shutil
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import check_weights, read_checkpoint, weights_fingerprint


@dataclass
class GPTConfig:
    vocab_size: int = 256  # codebook size
    num_classes: int = 10  # the embedding table has one more row: the null class for CFG
    n_layer: int = 6
    n_head: int = 6
    dim: int = 192
    grid_size: int = 7  # codes per side of the image; T = grid_size**2 codes
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0  # attention, residual (after wo) and FFN (after w2) dropout
    token_dropout: float = 0.0  # on the embedded input sequence
    class_dropout: float = 0.1  # labels replaced by the null class in training, for CFG

    @property
    def block_size(self):
        return self.grid_size**2


# Shapes only; vocab_size, num_classes and grid_size come from the data (or the checkpoint).
PRESETS = {
    # LlamaGen's class-conditional models
    "B": dict(n_layer=12, n_head=12, dim=768, multiple_of=256),
    "L": dict(n_layer=24, n_head=16, dim=1024, multiple_of=256),
    "XL": dict(n_layer=36, n_head=20, dim=1280, multiple_of=256),
    "XXL": dict(n_layer=48, n_head=24, dim=1536, multiple_of=256),
    # the embedded default (Fashion-MNIST on a CPU, shipped in weights/): 1.35M and 0.14M params at
    # 256 codes, 10 classes, 9.7x apart (the paper's L -> B: 3.1x), so that trained to convergence the
    # teacher is still clearly better (a 0.38M student nearly matches it: RESULTS.md)
    "teacher": dict(n_layer=4, n_head=5, dim=160, multiple_of=32),
    "student": dict(n_layer=2, n_head=2, dim=64, multiple_of=32),
    "tiny": dict(n_layer=2, n_head=2, dim=32, multiple_of=32),  # for tests
}


def find_multiple(n, k):
    return n if n % k == 0 else n + k - n % k


def precompute_freqs_cis_2d(grid_size, head_dim, base):
    """LlamaGen's 2D RoPE table, (1 + grid_size**2, head_dim // 2, 2) holding (cos, sin).

    The first half of the rotated pairs turns with the row index, the second half with the
    column index. Row 0 (the class token) is all zeros, which zeroes the class token's q and k:
    odd, but LlamaGen's checkpoints were trained with it.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # (head_dim // 4,)
    angles = torch.outer(torch.arange(grid_size).float(), freqs)  # (grid, head_dim // 4)
    grid = torch.cat(
        [angles[:, None, :].expand(-1, grid_size, -1),  # by row
         angles[None, :, :].expand(grid_size, -1, -1)],  # by column
        dim=-1,
    )  # (grid, grid, head_dim // 2)
    table = torch.stack([grid.cos(), grid.sin()], dim=-1).flatten(0, 1)  # (grid**2, head_dim // 2, 2)
    return torch.cat([torch.zeros(1, half, 2), table])


def apply_rotary_emb(x, freqs_cis):
    # x (B, S, H, head_dim), freqs_cis (S or B, S, head_dim // 2, 2); rotates adjacent pairs, in fp32
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, S, H, head_dim // 2, 2)
    freqs_cis = freqs_cis if freqs_cis.dim() == 4 else freqs_cis[None]  # (1 or B, S, head_dim // 2, 2)
    cos, sin = freqs_cis[:, :, None, :, 0], freqs_cis[:, :, None, :, 1]
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # in fp32 whatever the input dtype, as LlamaGen
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class KVCache(nn.Module):
    """Keys and values of every sequence position written so far, for one layer (gpt-fast)."""

    def __init__(self, batch_size, n_head, seq_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_head, seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos, k, v):
        # k, v (B, H, S, head_dim) for positions pos (S,), or (B, S) with a row per sequence; a batch
        # smaller than the cache's is fine
        B = k.shape[0]
        if pos.dim() == 1:
            self.k_cache[:B, :, pos] = k
            self.v_cache[:B, :, pos] = v
        else:
            rows = torch.arange(B, device=pos.device)[:, None]
            self.k_cache[rows, :, pos] = k.transpose(1, 2)  # the indexed view is (B, S, H, head_dim)
            self.v_cache[rows, :, pos] = v.transpose(1, 2)
        return self.k_cache[:B], self.v_cache[:B]  # (B, H, 1 + T, head_dim)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.dim // config.n_head
        self.wqkv = nn.Linear(config.dim, 3 * config.dim, bias=False)  # [q | k | v], LlamaGen's fused layout
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache = None  # a KVCache while decoding, see GPT.setup_cache

    def forward(self, x, freqs_cis, pos=None, mask=None):
        # x (B, S, C) at sequence positions pos (S,); pos None = the whole sequence from 0, no cache
        B, S, C = x.shape
        q, k, v = self.wqkv(x).view(B, S, 3, self.n_head, self.head_dim).unbind(2)  # each (B, S, H, hd)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, hd)
        dropout_p = self.dropout if self.training else 0.0
        if pos is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            k, v = self.kv_cache.update(pos, k, v)  # (B, H, 1 + T, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, S, C)))


class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = int(2 * 4 * config.dim / 3)  # SwiGLU keeps the params of a 4x MLP (Llama)
        if config.ffn_dim_multiplier is not None:
            hidden = int(config.ffn_dim_multiplier * hidden)
        hidden = find_multiple(hidden, config.multiple_of)
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, freqs_cis, pos=None, mask=None):
        h = x + self.attention(self.attention_norm(x), freqs_cis, pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.decode_mode = "eager"  # compile_decode() sets it; decode() reads it
        # LlamaGen's LabelEmbedder holds its table as .embedding_table; the last row is the null class
        table = nn.Embedding(config.num_classes + 1, config.dim)
        self.cls_embedding = nn.ModuleDict({"embedding_table": table})
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.token_dropout = nn.Dropout(config.token_dropout)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # not saved: LlamaGen files carry their own copy, which load_checkpoint drops.
        # Under .to(bfloat16) this table is cast too; use autocast for bf16 to keep it fp32.
        head_dim = config.dim // config.n_head
        assert head_dim % 4 == 0, "2D RoPE splits each head in two halves of rotated pairs"
        freqs_cis = precompute_freqs_cis_2d(config.grid_size, head_dim, config.rope_base)
        self.register_buffer("freqs_cis", freqs_cis, persistent=False)  # (1 + T, head_dim // 2, 2)

        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.output.weight)  # LlamaGen starts from uniform predictions

    def _transformer(self, h, pos=None):
        # h (B, S, C): the embedded inputs at sequence positions pos (S,) or (B, S); None: 0..S-1, no cache
        S = h.shape[1]
        h = self.token_dropout(h)
        if pos is None:
            freqs_cis, mask = self.freqs_cis[:S], None
        else:
            if self.layers[0].attention.kv_cache is None:
                raise RuntimeError("prefill/decode need a KV cache: call model.setup_cache(batch_size) first")
            freqs_cis = self.freqs_cis[pos]  # (S or B, S, head_dim // 2, 2)
            # every cache slot is attended to, masked: a query sees the keys at or before its position
            # that its sequence has written. Slots beyond it (stale after a speculative rollback) and
            # slots not written (ZipAR's rows decoded ahead of the row above, the rest of a shorter
            # prefix) are invisible. The shapes stay those of the whole cache, so one compiled graph
            # serves every position.
            written = self.written[:h.shape[0]]  # (B, 1 + T)
            rows = pos.expand(h.shape[0], S)  # (B, S): the positions of each sequence
            written.scatter_(1, rows, True)
            key_pos = torch.arange(written.shape[1], device=h.device)
            mask = ((key_pos <= rows[..., None]) & written[:, None, :])[:, None]  # (B, 1, S, 1 + T)
        for layer in self.layers:
            h = layer(h, freqs_cis, pos, mask)
        return self.output(self.norm(h)).float()  # (B, S, V)

    def _embed(self, labels, codes):
        # labels (B,), codes (B, k) -> (B, 1 + k, C): the class token then the codes
        cls = self.cls_embedding["embedding_table"](labels)[:, None]
        return torch.cat([cls, self.tok_embeddings(codes)], dim=1)

    def forward(self, codes, labels):
        """codes (B, T) long, labels (B,) long -> logits (B, T, V); logits[:, t] predicts codes[:, t]."""
        return self._transformer(self._embed(labels, codes[:, :-1]))

    def drop_labels(self, labels, generator=None):
        """In training, each label becomes the null class with probability class_dropout, so that
        one model is also the unconditional model of classifier-free guidance. The training loop
        calls it once per batch: a teacher and its student then see the same labels."""
        if not self.training or self.config.class_dropout == 0:
            return labels
        dropped = torch.rand(labels.shape, device=labels.device, generator=generator) < self.config.class_dropout
        return torch.where(dropped, self.config.num_classes, labels)

    def setup_cache(self, batch_size, dtype=None):
        """Installs an empty KV cache for up to batch_size sequences (again to resize it), in the
        autocast dtype when called under autocast (bf16 sampling on GPUs), else the weights'."""
        c, weight = self.config, self.output.weight
        device = weight.device.type
        if dtype is None:
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch_size, c.n_head, 1 + c.block_size, c.dim // c.n_head,
                                               dtype, weight.device)
        # a buffer, not a plain attribute: CUDA graphs replay only mutations of the model's own buffers
        self.register_buffer("written", torch.zeros(batch_size, 1 + c.block_size, dtype=torch.bool,
                                                    device=weight.device), persistent=False)  # (B, 1 + T)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.kv_cache = None

    def prefill(self, labels, codes, lengths=None):
        """labels (B,), codes (B, k), k >= 0 -> logits (B, k + 1, V); logits[:, i] predicts code i.

        Writes sequence positions 0..k (class token, then the codes) into the cache and forgets
        anything written after them. lengths (B,): sequence b keeps only its first lengths[b] codes
        (prefixes of different lengths in one call; its logits up to code lengths[b] are exact).
        """
        self.written.zero_()
        logits = self._transformer(self._embed(labels, codes), torch.arange(codes.shape[1] + 1, device=labels.device))
        if lengths is not None:
            key_pos = torch.arange(self.written.shape[1], device=labels.device)
            self.forget(key_pos[None, :] > lengths[:, None])
        return logits

    def forget(self, slots):
        """slots (B, 1 + T) bool: makes those cache positions invisible until written again (a
        stand-in query of ZipAR's, the rest of a shorter prefix)."""
        self.written[:len(slots)] &= ~slots

    def decode(self, codes, start):
        """codes (B, L) are codes start..start+L-1 -> logits (B, L, V); logits[:, i] predicts code start+i+1.

        Writes sequence positions start+1..start+L (position 0 is the class token). `start` may also
        be a LongTensor of code indices, (L,) or one row per sequence (B, L), not necessarily
        contiguous (ZipAR's parallel decoding): each code then attends to the positions before its own
        that its sequence has written.
        """
        if isinstance(start, int):
            start = torch.arange(start, start + codes.shape[1], device=codes.device)
        if self.decode_mode == "compiled":
            # fresh strides (a slice of a (B, T) grid would compile a graph of its own); CUDA graphs
            # reuse their output buffers at the next call: hand out a copy
            step = compiled_step(codes.device.type)
            return step(self, codes.clone(memory_format=torch.contiguous_format), start + 1).clone()
        return _decode_step(self, codes, start + 1)


def _decode_step(model, codes, pos):
    return model._transformer(model.tok_embeddings(codes), pos)


# The decode step compiled, gpt-fast's way. At a few codes per call, an eager step is nearly all
# per-operation overhead (some 15 small kernels per layer, each launched from Python); compiled, a
# layer's operations fuse and run from generated code (CPUs: inductor with its C++ wrapper; GPUs:
# CUDA graphs, "reduce-overhead"). The shapes are static (the whole cache is attended to, masked;
# positions are a tensor), so one graph is compiled per (model shapes, batch, codes per call) and
# serves every position and every model of those shapes, the weights being inputs of the graph.
# Each compilation costs seconds to tens of seconds (cached on disk for the next run): on a GPU it
# pays at once, on a CPU only for long sampling (bench.py --decode), hence "auto".
_COMPILED = {}  # device type -> the compiled step, built on first use and shared by every model


def compiled_step(device_type):
    if device_type not in _COMPILED:
        # speculative sampling decodes 1 to gamma + 1 codes per call and ZipAR a few rows at once: a
        # graph each, per model shape and batch; more than the default limit of 8 recompilations
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        kwargs = dict(mode="reduce-overhead") if device_type == "cuda" else dict(options={"cpp_wrapper": True})
        _COMPILED[device_type] = torch.compile(_decode_step, fullgraph=True, dynamic=False, **kwargs)
    return _COMPILED[device_type]


def compile_decode(model, mode="compiled"):
    """The decode step of `model` from now on (sampling, rollouts, speculative sampling, evaluation):
    "compiled", "eager" (as written), or "auto" (compiled on GPUs only), for the device its weights are
    on now (call it after .to(device)). Returns the model. Outputs agree with eager within fp32
    rounding (the same codes under greedy decoding)."""
    device_type = next(model.parameters()).device.type
    compiled = mode == "compiled" or (mode == "auto" and device_type == "cuda")
    if compiled and device_type == "cpu" and not shutil.which("g++"):  # inductor's default compiler
        raise SystemExit("--decode compiled needs a C++ compiler on CPUs and g++ is not on the PATH: install it "
                         "(apt-get install g++) or pass --decode eager")
    model.decode_mode = "compiled" if compiled else "eager"
    return model


def add_decode_flag(parser):
    parser.add_argument("--decode", choices=["auto", "compiled", "eager"], default="auto",
                        help="the decode step of sampling and rollouts: torch.compile'd (gpt-fast's way), eager, "
                        "or auto = compiled on GPUs only, where it pays at once; on CPUs each shape's compilation "
                        "takes seconds and pays off for long sampling only (default: auto)")


def autocast(device_type, bf16=None):
    """bf16 autocast on GPUs (training, sampling and rollouts, as LlamaGen; weights stay fp32), fp32 on
    CPUs, where bf16 buys no speed here; bf16=True forces it (the CPU tests run this path)."""
    bf16 = device_type == "cuda" if bf16 is None else bf16
    return torch.autocast(device_type, torch.bfloat16) if bf16 else contextlib.nullcontext()


def load_checkpoint(path, preset=None, grid_size=None, tokenizer=None, ckpt=None):
    """A GPT in eval mode on the CPU, from one of our checkpoints or a LlamaGen c2i one, with
    .fingerprint, the fingerprint of its weights (checks.read_checkpoint verified the recorded one).

    Ours hold {"model": state_dict, "config": GPTConfig fields, ...}. LlamaGen's hold {"model":
    state_dict} (a bare state dict is accepted too) and need `preset`; their vocabulary and class
    count are read from the embedding shapes and grid_size defaults to 16 (256 px, 16x downsampling).
    tokenizer: the fingerprint of the tokenizer the caller decodes with; one of our checkpoints
    trained on another is refused. ckpt: the file as checks.read_checkpoint already returned it (not
    read and verified twice).
    """
    if preset is not None and preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    ckpt = ckpt or read_checkpoint(path, "GPT checkpoint", "pass a checkpoint written by distill.py (or LlamaGen's c2i)")
    if isinstance(ckpt.get("config"), dict) and set(ckpt["config"]) - {f.name for f in fields(GPTConfig)}:
        raise SystemExit(f"{path} is not a GPT checkpoint (a tokenizer's or another model's config): pass it where "
                         f"that file belongs, e.g. --tokenizer, and a checkpoint of distill.py here")
    made_with = ckpt.get("fingerprints", {}).get("tokenizer") if isinstance(ckpt.get("fingerprints"), dict) else None
    if tokenizer is not None and made_with not in (None, tokenizer):
        raise SystemExit(f"{path} was trained on tokenizer {made_with}, not on this one ({tokenizer}): pass the "
                         f"--tokenizer it was trained with")
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit(f"{path} holds no state dict: pass a GPT checkpoint")
    # LlamaGen's files may carry the RoPE table and cache buffers; they are rebuilt here, not loaded
    dropped = ("freqs_cis", "kv_cache", "causal_mask")
    state = {k: v for k, v in state.items() if not any(s in k for s in dropped)}

    if "config" in ckpt:
        config = GPTConfig(**ckpt["config"])
        if preset is not None:
            differs = [f"{k} {getattr(config, k)} (preset: {v})"
                       for k, v in PRESETS[preset].items() if getattr(config, k) != v]
            if differs:
                raise SystemExit(f"checkpoint {path} is not preset {preset}: {', '.join(differs)}; "
                                 f"drop the preset, the checkpoint's own config is used")
        if grid_size is not None and grid_size != config.grid_size:
            raise SystemExit(f"checkpoint {path} was trained on a {config.grid_size}x{config.grid_size} "
                             f"grid of codes, not {grid_size}x{grid_size}: pass the tokenizer and image size it "
                             f"was trained with")
    else:
        if preset is None:
            raise SystemExit(f"checkpoint {path} has no config (a LlamaGen file?): pass the preset it "
                             f"was trained with, one of {', '.join(PRESETS)}")
        if "tok_embeddings.weight" not in state or "cls_embedding.embedding_table.weight" not in state:
            raise SystemExit(f"checkpoint {path} has no tok_embeddings or cls_embedding weights: pass "
                             f"a class-conditional GPT checkpoint (LlamaGen c2i or ours)")
        config = GPTConfig(
            **PRESETS[preset],
            vocab_size=state["tok_embeddings.weight"].shape[0],
            num_classes=state["cls_embedding.embedding_table.weight"].shape[0] - 1,
            grid_size=grid_size or 16,
        )

    model = GPT(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
                   for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        raise SystemExit(
            f"checkpoint {path} does not fit {'preset ' + preset if preset else 'its config'}: "
            f"missing keys {missing[:4]}, unexpected keys {unexpected[:4]}, wrong shapes {wrong_shape[:4]}; "
            f"pass the preset it was trained with"
        )
    check_weights(path, ckpt, state)
    model.load_state_dict(state, strict=True)
    model.fingerprint = ckpt.get("fingerprint") or weights_fingerprint(model.state_dict())
    return model.eval()
