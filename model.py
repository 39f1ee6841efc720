"""
A small GPT (rotary positions, tied head) plus what PMD needs around it:

- `encode` / `decode`: a byte-level tiktoken Encoding built in code (nothing is downloaded);
- `generate`: batched KV-cache sampling: a prompt is prefilled once for its G samples, and each row stops on its own;
- `completion_logits`: logits for known completion tokens after a prefix (student: prompt; teacher: context + prompt).
"""
import contextlib
from dataclasses import dataclass

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# tokenizer: one token per byte, so the vocabulary is 256 and every string round-trips

ENC = tiktoken.Encoding(
    name="pmd-bytes",
    pat_str=r"[\s\S]",  # one byte per piece: no merges ever apply
    mergeable_ranks={bytes([i]): i for i in range(256)},
    special_tokens={},
)
VOCAB_SIZE = 256
PAD = 0  # the NUL byte never occurs in text the task produces; used only for padding
EOS = ord("\n")  # every completion ends with a newline; sampling stops there


def autocast(device):
    """bf16 autocast on CUDA; nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda") else contextlib.nullcontext()


def encode(text):
    return ENC.encode_ordinary(text)


def decode(ids):
    return bytes(ids).decode("utf-8", errors="replace")


# -----------------------------------------------------------------------------
# the model


@dataclass
class GPTConfig:
    block_size: int = 256
    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 128


def rotary_angles(pos, hs):
    """pos (B, T) integer positions -> (cos, sin), each (B, 1, T, hs/2): once per forward, shared by every layer."""
    freqs = 1.0 / (10000 ** (torch.arange(0, hs, 2, device=pos.device, dtype=torch.float32) / hs))
    ang = pos[:, None, :, None].float() * freqs
    return ang.cos(), ang.sin()


def rotary(x, cos, sin):
    """x: (B, nh, T, hs) rotated pairwise by its positions' angles."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, rot, mask, cache):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        q, k = rotary(q, *rot), rotary(k, *rot)
        if cache is not None:  # decoding: append this step's keys and values, attend to all so far
            k, v = cache.update(k, v)
        if mask is None:  # training / scoring: right-padded rows, plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # sampling: left-padded rows, so padding keys are masked out
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        C = cfg.n_embd
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))

    def forward(self, x, rot, mask, cache):
        x = x + self.attn(self.ln1(x), rot, mask, cache)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(VOCAB_SIZE, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.apply(self._init)  # std 0.02 everywhere: the default embedding init with a tied head starts at a huge loss

    def _init(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx, pos=None, mask=None, caches=None, head=True):
        """idx: (B, T) tokens -> logits (B, T, V), or the final hidden states (B, T, C) with head=False.
        pos defaults to 0..T-1 (right-padded rows)."""
        if pos is None:
            pos = torch.arange(idx.size(1), device=idx.device).expand_as(idx)
        rot = rotary_angles(pos, self.cfg.n_embd // self.cfg.n_head)
        x = self.wte(idx)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, rot, mask, None if caches is None else caches[i])
        x = self.ln_f(x)
        return self.head(x) if head else x

    def head(self, x):
        return x @ self.wte.weight.t()  # tied: (..., C) -> (..., V)


def n_params(cfg):
    """The parameter count of GPT(cfg), without building it (settings are checked before any work, and may be huge)."""
    C = cfg.n_embd
    return VOCAB_SIZE * C + cfg.n_layer * (12 * C * C + 9 * C) + 2 * C  # no bias in qkv and proj


# -----------------------------------------------------------------------------
# scoring known completions (student and teacher share this)


def pad_batch(seqs, device):
    """Right-pad lists of token ids into a (B, T) tensor."""
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out.to(device)


def completion_logits(model, prefixes, completions, device):
    """prefixes, completions: B token-id lists each -> the logits (B, L, V) given to each completion token after its
    prefix, and targets (B, L), L the longest completion, -1 (ignored) past a row's end: one mask serves every loss."""
    seqs = [p + c for p, c in zip(prefixes, completions)]
    h = model(pad_batch(seqs, device), head=False)  # (B, T, C)
    L = max(len(c) for c in completions)
    start = torch.tensor([len(p) - 1 for p in prefixes], device=device)  # position predicting completion[0]
    idx = (start[:, None] + torch.arange(L, device=device)).clamp(max=h.size(1) - 1)  # (B, L)
    # the head only where a completion token is predicted: the prefix (a memory context) needs no logits
    out = model.head(h.gather(1, idx[:, :, None].expand(-1, -1, h.size(-1))))  # (B, L, V)
    return out, targets_of(completions, L, device)


def targets_of(completions, L, device):
    """Completion token ids as (B, L) targets, -1 (ignored) past each row's end."""
    targets = torch.full((len(completions), L), -1, dtype=torch.long)
    for i, c in enumerate(completions):
        targets[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    return targets.to(device)


# -----------------------------------------------------------------------------
# batched sampling with a KV cache


class KVCache:
    """Preallocated keys and values of one layer: (B, nh, T_max, hs)."""

    def __init__(self, B, n_head, T_max, hs, device, dtype):
        self.k = torch.zeros(B, n_head, T_max, hs, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.t = 0

    def update(self, k, v):
        T = k.size(2)
        self.k[:, :, self.t : self.t + T] = k
        self.v[:, :, self.t : self.t + T] = v
        self.t += T
        return self.k[:, :, : self.t], self.v[:, :, : self.t]

    def select(self, rows):
        """Keep the given rows, repeats allowed: a prefix computed once serves every row that shares it."""
        self.k, self.v = self.k[rows], self.v[rows]


def left_pad(prompts, device):
    """Left-pad prompts: tokens (B, T), valid (B, T) bool, positions (B, T) counting from each row's first token."""
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), PAD, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, T - len(p) :] = torch.tensor(p, dtype=torch.long)
    valid = idx != PAD
    valid[:, -1] = True  # an empty prompt still has a position to sample from
    pos = (valid.cumsum(1) - 1).clamp(min=0)
    return idx.to(device), valid.to(device), pos.to(device)


def attn_mask(valid, T_q):
    """Boolean mask (B, 1, T_q, T_k) for the last T_q queries over all T_k keys: causal, no padding keys.
    A padding query may see itself, so that no row is fully masked (its output is never used)."""
    T_k = valid.size(1)
    q_pos = torch.arange(T_k - T_q, T_k, device=valid.device)
    causal = torch.arange(T_k, device=valid.device)[None, :] <= q_pos[:, None]  # (T_q, T_k)
    self_ = torch.arange(T_k, device=valid.device)[None, :] == q_pos[:, None]
    return ((causal & valid[:, None, :]) | self_)[:, None]


@torch.no_grad()
def generate(model, prompts, n_samples, max_new_tokens, temperature=1.0, generator=None, use_cache=True):
    """n_samples completions per prompt (token-id lists) -> (completions, logprobs): len(prompts) * n_samples token-id
    lists grouped by prompt, ending with EOS unless cut at max_new_tokens, and each token's untempered log-prob (for the
    losses' ratios). temperature 0 is greedy; use_cache=False recomputes every step (same tokens, for the benchmark)."""
    device = next(model.parameters()).device
    idx, valid, pos = left_pad(prompts, device)
    B, Tp = idx.shape
    T_max = Tp + max_new_tokens
    assert T_max <= model.cfg.block_size, f"prompt ({Tp}) + max_new_tokens ({max_new_tokens}) exceeds block_size"
    caches = new_caches(model, B, T_max) if use_cache else None
    logits = model.head(model(idx, pos, attn_mask(valid, Tp), caches, head=False)[:, -1])  # prefill once: (B, V)
    logits, idx, valid, pos = (t.repeat_interleave(n_samples, 0) for t in (logits, idx, valid, pos))  # one per sample
    if use_cache:
        for c in caches:
            c.select(torch.arange(B, device=device).repeat_interleave(n_samples))
    N = B * n_samples
    out = torch.full((N, max_new_tokens), PAD, dtype=torch.long, device=device)
    out_logp = torch.zeros(N, max_new_tokens, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    check_every = 1 if device.type == "cpu" else 8  # asking if every row is done makes the host wait for the device
    for t in range(max_new_tokens):
        logp = F.log_softmax(logits.float(), -1)  # (N, V)
        if temperature == 0:
            tok = logits.argmax(-1)
        else:  # at temperature 1 the sampled distribution is logp's own
            tempered = logp if temperature == 1 else F.log_softmax(logits.float() / temperature, -1)
            tok = torch.multinomial(tempered.exp(), 1, generator=generator).squeeze(1)
        tok = torch.where(done, PAD, tok)
        out[:, t] = tok
        out_logp[:, t] = logp.gather(1, tok[:, None]).squeeze(1)
        done = done | (tok == EOS)
        if t == max_new_tokens - 1 or ((t + 1) % check_every == 0 and bool(done.all())):
            break
        next_pos = pos[:, -1:] + 1
        idx, pos = torch.cat([idx, tok[:, None]], 1), torch.cat([pos, next_pos], 1)
        valid = torch.cat([valid, torch.ones_like(done)[:, None]], 1)
        if use_cache:  # one query, the newest position: it may see every valid key
            h = model(tok[:, None], next_pos, valid[:, None, None, :], caches, head=False)
        else:
            h = model(idx, pos, attn_mask(valid, idx.size(1)), None, head=False)
        logits = model.head(h[:, -1])  # (N, V)
    rows = out[:, : t + 1].tolist()
    comps = [r[: r.index(EOS) + 1] if EOS in r else r for r in rows]  # a row without EOS was cut at the limit
    return comps, [lp[: len(c)] for lp, c in zip(out_logp.tolist(), comps)]


@torch.no_grad()
def completion_logits_shared(model, prefixes, completions, device):
    """The teacher's completion_logits (no gradient; the same up to float rounding) for rows whose prefixes repeat, as
    a problem's G rollouts do: each distinct prefix runs once and its cached keys and values serve its rows."""
    index = {}  # distinct prefix -> its row in the prefill
    rows = torch.tensor([index.setdefault(tuple(p), len(index)) for p in prefixes], device=device)  # (N,)
    idx, valid, pos = left_pad([list(k) for k in index], device)  # (U, Tp) each
    U, Tp = idx.shape
    L = max(len(c) for c in completions)
    caches = new_caches(model, U, Tp + L)
    h_last = model(idx, pos, attn_mask(valid, Tp), caches, head=False)[:, -1]  # (U, C): predicts each first token
    for c in caches:
        c.select(rows)
    comp = pad_batch(completions, device)[:, : L - 1]  # (N, L-1): the completion tokens that predict the next ones
    if L > 1:
        comp_pos = pos[rows, -1:] + 1 + torch.arange(L - 1, device=device)  # (N, L-1)
        comp_valid = torch.cat([valid[rows], torch.ones_like(comp, dtype=torch.bool)], 1)  # later pads only see pads
        h = torch.cat([h_last[rows, None], model(comp, comp_pos, attn_mask(comp_valid, L - 1), caches, head=False)], 1)
    else:
        h = h_last[rows, None]
    return model.head(h), targets_of(completions, L, device)  # (N, L, V), (N, L)


def new_caches(model, B, T_max):
    """One empty KVCache per layer for B rows of up to T_max tokens."""
    cfg, p = model.cfg, next(model.parameters())
    return [KVCache(B, cfg.n_head, T_max, cfg.n_embd // cfg.n_head, p.device, p.dtype) for _ in range(cfg.n_layer)]
