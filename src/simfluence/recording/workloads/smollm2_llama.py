"""The trainable top of SmolLM2-135M-Instruct (the ``smollm2-polarity`` workload's model).

SmolLM2-135M-Instruct has the Llama architecture: 30 layers, hidden 576, 9 query / 3 key-value
heads, tied embeddings. `SmolLM2Top` re-implements its top decoder layers and the final RMSNorm
in plain tensor ops (vmap-safe); the top layer computes its query, output and MLP only at the
answer position (keys/values at all positions), which gives the same loss at a fraction of the
cost. The (tied) output embedding is frozen and held as a non-persistent buffer.
`top_state_dict` takes its weights from a Hugging Face ``LlamaForCausalLM`` state dict. The data,
the frozen lower layers and the task live in `simfluence.recording.workloads.smollm2_polarity`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

N_LAYERS = 30
TRAINED_LAYERS = 2
HIDDEN = 576
HEADS = 9
KV_HEADS = 3
HEAD_DIM = 64
INTERMEDIATE = 1536
RMS_EPS = 9.999999747378752e-06
ROPE_THETA = 100000.0


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Llama RMSNorm over the last dimension."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS))


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (Hugging Face ``rotate_half`` layout).

    ``x (..., P, 64)`` with ``positions`` broadcastable to ``(..., P)`` (float).
    """
    exponents = torch.arange(0, HEAD_DIM, 2, dtype=torch.float32, device=x.device) / HEAD_DIM
    inv_freq = 1.0 / (ROPE_THETA**exponents)
    freqs = positions[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    half = HEAD_DIM // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * emb.cos() + rotated * emb.sin()


class LlamaBlock(nn.Module):
    """One Llama decoder layer in plain tensor ops (no dropout, no cache).

    ``forward(h (n, L, 576)) -> (n, L, 576)`` with causal attention over positions ``0..L-1``;
    ``forward_last(h (n, L, 576), last (n,) long) -> (n, 576)``: the layer's output at position
    ``last`` only (attending to positions ``<= last``).
    """

    HF_NAMES: ClassVar[dict[str, str]] = {
        "q_proj": "self_attn.q_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.o_proj",
        "gate_proj": "mlp.gate_proj",
        "up_proj": "mlp.up_proj",
        "down_proj": "mlp.down_proj",
        "input_norm": "input_layernorm",
        "post_norm": "post_attention_layernorm",
    }

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)
        self.gate_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.down_proj = nn.Linear(INTERMEDIATE, HIDDEN, bias=False)
        self.input_norm = nn.Module()
        self.input_norm.weight = nn.Parameter(torch.ones(HIDDEN))
        self.post_norm = nn.Module()
        self.post_norm.weight = nn.Parameter(torch.ones(HIDDEN))

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        x = rms_norm(h, self.post_norm.weight)
        return h + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    def _keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (n, L, 576)`` -> keys, values ``(n, 9, L, 64)`` (key/value heads repeated)."""
        n, length, _ = x.shape
        positions = torch.arange(length, dtype=torch.float32, device=x.device)
        k = self.k_proj(x).reshape(n, length, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v_proj(x).reshape(n, length, KV_HEADS, HEAD_DIM).transpose(1, 2)
        k = rope(k, positions)
        rep = HEADS // KV_HEADS
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        return k, v

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, length, _ = h.shape
        x = rms_norm(h, self.input_norm.weight)
        k, v = self._keys_values(x)
        positions = torch.arange(length, dtype=torch.float32, device=h.device)
        q = rope(self.q_proj(x).reshape(n, length, HEADS, HEAD_DIM).transpose(1, 2), positions)
        scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)
        causal = torch.ones(length, length, dtype=torch.bool, device=h.device).tril()
        scores = scores.masked_fill(~causal, -1e9)
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, length, HIDDEN)
        return self._mlp(h + self.o_proj(context))

    def forward_last(self, h: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        n, length, _ = h.shape
        x = rms_norm(h, self.input_norm.weight)
        k, v = self._keys_values(x)
        index = last.reshape(n, 1, 1).expand(n, 1, HIDDEN)
        h_last = h.gather(1, index).squeeze(1)  # (n, 576)
        x_last = x.gather(1, index)  # (n, 1, 576)
        q = self.q_proj(x_last).reshape(n, 1, HEADS, HEAD_DIM).transpose(1, 2)  # (n, 9, 1, 64)
        q = rope(q, last.to(torch.float32).reshape(n, 1, 1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)  # (n, 9, 1, L)
        positions = torch.arange(length, device=h.device).reshape(1, 1, 1, length)
        visible = positions <= last.reshape(n, 1, 1, 1)
        scores = scores.masked_fill(~visible, -1e9)
        context = (scores.softmax(-1) @ v).reshape(n, HIDDEN)
        return self._mlp(h_last + self.o_proj(context))


class SmolLM2Top(nn.Module):
    """The trainable top of SmolLM2: decoder layers + final norm; frozen tied output embedding.

    ``forward(hidden (n, L, 576), last (n,) long) -> logits (n, 49152)`` at position ``last``.
    """

    def __init__(self, lm_head: torch.Tensor, n_layers: int = TRAINED_LAYERS) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LlamaBlock() for _ in range(n_layers))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(HIDDEN))
        self.register_buffer("lm_head", lm_head, persistent=False)

    def forward(self, hidden: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            hidden = layer(hidden)
        out = self.layers[-1].forward_last(hidden, last)
        return rms_norm(out, self.norm.weight) @ self.lm_head.T


def top_state_dict(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """`SmolLM2Top` parameters from a Hugging Face LlamaForCausalLM state dict."""
    out = {"norm.weight": state["model.norm.weight"].clone()}
    first = N_LAYERS - n_layers
    for j in range(n_layers):
        for ours, theirs in LlamaBlock.HF_NAMES.items():
            out[f"layers.{j}.{ours}.weight"] = state[f"model.layers.{first + j}.{theirs}.weight"]
    return {k: v.detach().clone() for k, v in out.items()}
