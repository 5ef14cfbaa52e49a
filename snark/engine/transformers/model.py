"""Qwen2.5-VL's language model over one flat batch of tokens on the paged KV cache.

A step's tokens from every row are one ``[tokens, hidden]`` batch: a decode token for each running
row and prefill chunks of prompts, side by side with no padding. Projections, norms and the MLP run
on the whole batch at once; only attention looks at rows, through ``AttentionPlan``:

* decode rows (one new token each) attend in groups of rows of similar length, each group one
  batched call over its rows' blocks (padding within a group is bounded: ``group_by_length``);
* a prefill chunk attends causally to its row's cached tokens and to itself;
* with flash-attn on CUDA, one ``flash_attn_varlen_func`` call over the block tables does both;
  decode-only steps use its paged decode kernel (``flash_attn_with_kvcache``), which CUDA graphs capture.

The weights are the Hugging Face model's own (q/k/v and gate/up fused into one matrix each); the
vision tower stays transformers' module. On CPU every linear layer runs through oneDNN with its
weight packed once at load (``PackedLinear``): about 2-3x PyTorch's default float32 GEMM on this
workload's shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from snark.engine.transformers.kv_cache import KVCache

log = logging.getLogger(__name__)

DECODE_GROUP_WASTE = 2  # a decode group's longest row is at most this many times its shortest
MERGE_MIN_CHUNK = 256  # a prefill chunk at least this long, after cached tokens, attends in two merged parts


def onednn_available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight packed for oneDNN once (CPU), instead of at every call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)
        self.bias = bias.detach() if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), self.packed, self.bias, "none", [], "")
        return out.view(*shape[:-1], self.out_features)


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, *, packed: bool) -> nn.Module:
    if packed:
        return PackedLinear(weight, bias)
    linear = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    linear.weight.data = weight.detach()
    if bias is not None:
        linear.bias.data = bias.detach()
    return linear


class PatchLinear(nn.Module):
    """The vision tower's patch embedding, a ``Conv3d`` whose stride equals its kernel: one matrix
    multiply over flattened patches (``[patches, channels, t, p, p]`` in, ``[patches, embed, 1, 1, 1]``
    out, as the convolution gives)."""

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        self.linear = PackedLinear(conv.weight.reshape(conv.out_channels, -1), conv.bias)
        self.weight = conv.weight.detach()  # transformers reads its dtype (3 MB at the 7B's size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.reshape(x.shape[0], -1))[:, :, None, None, None]


def pack_linears(module: nn.Module) -> int:
    """Swap every ``nn.Linear`` inside ``module`` (the vision tower) for a ``PackedLinear``, and a
    patch-sized ``Conv3d`` for a ``PatchLinear``."""
    swapped = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child.weight, child.bias))
            swapped += 1
        elif isinstance(child, nn.Conv3d) and child.kernel_size == child.stride and child.padding == (0, 0, 0):
            setattr(module, name, PatchLinear(child))
            swapped += 1
        else:
            swapped += pack_linears(child)
    return swapped


def group_by_length(lengths: Sequence[int], *, waste: int = DECODE_GROUP_WASTE) -> list[list[int]]:
    """Indices of ``lengths`` in groups, longest first, where no group's longest is more than
    ``waste`` times its shortest: a batched attention call pads each row to its group's longest."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for index in order:
        if groups and lengths[groups[-1][0]] <= waste * max(lengths[index], 1):
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


@dataclass
class DecodeGroup:
    """Rows that each feed one token, as flat tokens ``[start, end)``: their block tables padded
    with the null block ``[rows, blocks]`` and which slots they see ``[rows, 1, 1, slots]``."""

    start: int
    end: int
    tables: torch.Tensor
    mask: torch.Tensor


@dataclass
class PrefillChunk:
    """One row's chunk, flat tokens ``[start, end)``, after ``context`` tokens already cached."""

    start: int
    end: int
    context: int
    tables: torch.Tensor | None  # [1, blocks] covering context + chunk; None: no context (plain causal)

    @property
    def context_tables(self) -> torch.Tensor:
        """``tables`` of a chunk after cached context (the only chunks that read the cache)."""
        if self.tables is None:
            raise RuntimeError("a chunk without cached context has no block tables")
        return self.tables

    @cached_property
    def mask(self) -> torch.Tensor:
        """``[1, 1, chunk, context + chunk]`` bool, built once a step, for the layers that need it."""
        length = self.context + self.end - self.start
        device = self.context_tables.device
        queries = torch.arange(self.context, length, device=device)[:, None]
        return (torch.arange(length, device=device)[None, :] <= queries)[None, None]


@dataclass
class PagedDecode:
    """A decode-only step for flash-attn's paged decode kernel (what CUDA graphs capture): every row
    feeds one token; ``lengths`` [rows] int32 counts its tokens, the new one included, and ``tables``
    [rows, blocks] int32 are its block tables padded with the null block."""

    tables: torch.Tensor
    lengths: torch.Tensor


@dataclass
class AttentionPlan:
    slots: torch.Tensor  # [tokens] long: where each token's key and value go
    decode: list[DecodeGroup] = field(default_factory=list)
    prefill: list[PrefillChunk] = field(default_factory=list)
    flash: dict | None = None  # flash-attn's varlen arguments, when it is the backend
    paged_decode: PagedDecode | None = None  # a decode-only step on flash-attn's kvcache kernel


class FlatLanguageModel:
    """The text decoder of a loaded ``Qwen2_5_VLForConditionalGeneration``, run on flat batches."""

    def __init__(self, hf_model, *, packed: bool) -> None:
        text = hf_model.model.language_model
        config = hf_model.config.text_config
        self.num_heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.embed_tokens = text.embed_tokens
        self.layers = []
        for layer in text.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            qkv_b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            self.layers.append(
                _Layer(
                    input_norm=(layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                    qkv=make_linear(qkv_w, qkv_b, packed=packed),
                    o=make_linear(attn.o_proj.weight, None, packed=packed),
                    post_norm=(layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
                    gate_up=make_linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), None, packed=packed),
                    down=make_linear(mlp.down_proj.weight, None, packed=packed),
                )
            )
        self.norm = (text.norm.weight, text.norm.variance_epsilon)
        self.lm_head = make_linear(hf_model.lm_head.weight, None, packed=packed)
        rotary = text.rotary_emb
        self.inv_freq = rotary.inv_freq.float()  # [head_dim / 2]
        self.mrope_section = list(rotary.mrope_section)
        self.scaling = float(rotary.attention_scaling)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.kv_heads * self.head_dim

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` [3, tokens] (M-RoPE time/height/width) -> cos, sin [tokens, 1, head_dim]."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)  # [3, tokens, head_dim / 2]
        freqs = torch.cat([part[i % 3] for i, part in enumerate(freqs.split(self.mrope_section, dim=-1))], dim=-1)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)

    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, plan: AttentionPlan, cache: KVCache
    ) -> torch.Tensor:
        """``embeds`` [tokens, hidden] -> the final hidden states [tokens, hidden] (normed)."""
        cos, sin = self.rope(positions, embeds.dtype)
        hidden = embeds
        tokens = hidden.shape[0]
        for index, layer in enumerate(self.layers):
            residual = hidden
            qkv = layer.qkv(_rms_norm(hidden, *layer.input_norm))
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = _rotate(q.view(tokens, self.num_heads, self.head_dim), cos, sin)
            k = _rotate(k.view(tokens, self.kv_heads, self.head_dim), cos, sin)
            v = v.reshape(tokens, self.kv_heads, self.head_dim)
            cache.write(index, plan.slots, k, v)
            attended = self._attend(index, q, k, v, plan, cache)  # [tokens, heads * head_dim]
            hidden = residual + layer.o(attended)
            residual = hidden
            gate, up = layer.gate_up(_rms_norm(hidden, *layer.post_norm)).chunk(2, dim=-1)
            hidden = residual + layer.down(F.silu(gate) * up)
        return _rms_norm(hidden, *self.norm)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def _attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, cache: KVCache
    ) -> torch.Tensor:
        tokens = q.shape[0]
        if plan.paged_decode is not None:
            from flash_attn import flash_attn_with_kvcache

            out = flash_attn_with_kvcache(
                q[:, None],
                cache.keys[layer],
                cache.values[layer],
                cache_seqlens=plan.paged_decode.lengths,
                block_table=plan.paged_decode.tables,
                causal=True,
            )  # [rows, 1, heads, head_dim]
            return out.reshape(tokens, -1)
        if plan.flash is not None:
            from flash_attn import flash_attn_varlen_func

            out = flash_attn_varlen_func(
                q,
                cache.keys[layer],
                cache.values[layer],
                causal=True,
                block_table=plan.flash["tables"],
                cu_seqlens_q=plan.flash["cu_q"],
                cu_seqlens_k=plan.flash["cu_k"],
                max_seqlen_q=plan.flash["max_q"],
                max_seqlen_k=plan.flash["max_k"],
            )
            return out.reshape(tokens, -1)
        out = q.new_empty(tokens, self.num_heads, self.head_dim)
        group = self.num_heads // self.kv_heads
        for g in plan.decode:
            keys, values = cache.gather(layer, g.tables)  # [rows, kv_heads, slots, head_dim]
            # A row's query heads that share a KV head become that head's queries: [rows, kv_heads, group, head_dim].
            queries = q[g.start : g.end].view(-1, self.kv_heads, group, self.head_dim)
            result = F.scaled_dot_product_attention(queries, keys, values, attn_mask=g.mask)
            out[g.start : g.end] = result.reshape(-1, self.num_heads, self.head_dim)
        for p in plan.prefill:
            queries = q[p.start : p.end].transpose(0, 1)[None]  # [1, heads, chunk, head_dim]
            if not p.context:  # nothing cached before the chunk: its own keys, causal
                keys, values = k[p.start : p.end].transpose(0, 1)[None], v[p.start : p.end].transpose(0, 1)[None]
                result = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, enable_gqa=True)
            elif q.device.type == "cpu" and p.end - p.start >= MERGE_MIN_CHUNK:
                result = self._attend_after_context(layer, queries, k[p.start : p.end], v[p.start : p.end], p, cache)
            else:
                keys, values = cache.gather(layer, p.context_tables)
                length = p.context + p.end - p.start
                result = F.scaled_dot_product_attention(
                    queries, keys[:, :, :length], values[:, :, :length], attn_mask=p.mask, enable_gqa=True
                )
            out[p.start : p.end] = result[0].transpose(0, 1)
        return out.view(tokens, -1)

    def _attend_after_context(
        self, layer: int, queries: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: PrefillChunk, cache: KVCache
    ) -> torch.Tensor:
        """A chunk's attention over the tokens cached before it and over itself, as two unmasked /
        plain-causal flash calls merged by their log-sum-exp: on CPU, PyTorch's masked attention
        is the slow path (about 1.6x at a 1024-token chunk after 2048 cached tokens).
        ``queries`` [1, heads, chunk, head_dim]; ``k``, ``v`` [chunk, kv_heads, head_dim]."""
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        group, chunk = self.num_heads // self.kv_heads, queries.shape[2]
        keys, values = cache.gather(layer, p.context_tables)
        # Every cached token is visible to every query: the group's queries fold into one KV head's.
        folded = queries.reshape(1, self.kv_heads, group * chunk, self.head_dim)
        old, old_lse = flash(folded, keys[:, :, : p.context], values[:, :, : p.context])
        old, old_lse = old.reshape(queries.shape), old_lse.reshape(1, self.num_heads, chunk)
        own_keys = k.transpose(0, 1).repeat_interleave(group, dim=0)[None]  # [1, heads, chunk, head_dim]
        own_values = v.transpose(0, 1).repeat_interleave(group, dim=0)[None]
        new, new_lse = flash(queries, own_keys, own_values, is_causal=True)
        top = torch.maximum(old_lse, new_lse)
        w_old, w_new = (old_lse - top).exp()[..., None], (new_lse - top).exp()[..., None]
        return (old * w_old + new * w_new) / (w_old + w_new)


@dataclass
class _Layer:
    input_norm: tuple[torch.Tensor, float]
    qkv: nn.Module
    o: nn.Module
    post_norm: tuple[torch.Tensor, float]
    gate_up: nn.Module
    down: nn.Module


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2's RMSNorm (in float32, as transformers computes it)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on ``x`` [tokens, heads, head_dim] (transformers' ``rotate_half`` form)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
