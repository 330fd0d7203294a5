"""A Llama-family decoder, read from a local checkpoint and run layer by layer.

The engine does not call the Hugging Face modules: it reads the checkpoint's
weights (safetensors, only the layers an explorer owns) and runs the layer
math itself over its own static KV buffers, so a segment of layers is a plain
tensor function. The math follows transformers' Llama / Qwen2 / Qwen3 /
Mistral code (RMSNorm in fp32, rotary tables from the model's own rotary
class, GQA, optional q/k norms and biases), so outputs match `generate`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from dexserve.contract.model_card import ModelCard, ModelLoadError
from dexserve.engine.adapters import ADAPTER_FILE, AdapterTensors, read_adapter_file, weight_files  # noqa: F401
# (ADAPTER_FILE re-exported for older imports: the adapter format's home is dexserve.engine.adapters)


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    eps: float
    act: str
    qk_norm: bool
    sliding_window: int | None

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelDims":
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        window = None
        if cfg.get("model_type") == "mistral" or cfg.get("use_sliding_window"):
            window = cfg.get("sliding_window")
        return cls(hidden=hidden, heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or hidden // heads), layers=int(cfg["num_hidden_layers"]),
                   vocab=int(cfg["vocab_size"]), eps=float(cfg.get("rms_norm_eps", 1e-6)),
                   act=str(cfg.get("hidden_act", "silu")), qk_norm=cfg.get("model_type") == "qwen3",
                   sliding_window=int(window) if window else None)


@dataclass
class LayerWeights:
    """One decoder layer. q/k/v and gate/up projections are stored fused (one
    matmul each instead of three and two): fewer kernels per step."""

    input_norm: torch.Tensor
    qkv: torch.Tensor              # [q; k; v] rows
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor          # [gate; up] rows
    down: torch.Tensor
    qkv_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


def _fuse(weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = torch.cat(weights, dim=0).contiguous()
    if all(b is None for b in biases):
        return w, None
    return w, torch.cat([b if b is not None else torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
                         for x, b in zip(weights, biases)])


@dataclass
class Weights:
    """The weights one process needs: some layers, plus embedding and/or head."""

    dims: ModelDims
    layers: dict[int, LayerWeights]
    embed: torch.Tensor | None
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    adapters: dict[int, AdapterTensors] = field(default_factory=dict)  # depth -> (A or U, None or V, b)


class _SafetensorsIndex:
    """Tensor name -> file, over a single file or a sharded checkpoint."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._open = safe_open
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: path / f for name, f in weight_map.items()}
        else:
            self.files = {}
            for f in weight_files(path):
                with safe_open(f, framework="pt") as h:
                    for name in h.keys():
                        self.files[name] = f

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise ModelLoadError(f"checkpoint is missing tensor {name!r}")
        with self._open(self.files[name], framework="pt") as h:
            return h.get_tensor(name)


def load_weights(card: ModelCard, layers: range, need_embed: bool, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", adapters: str | Path | None = None) -> Weights:
    """Read only the tensors for `layers` (and the embedding when asked; the
    final norm and head are always read: every explorer reads out), plus the
    boundary adapters of the file `adapters` (already checked against the
    model and the grid by `adapters.resolve_adapters`; None = no adapters)."""
    dims = ModelDims.from_config(card.config)
    idx = _SafetensorsIndex(card.path)

    def t(name: str) -> torch.Tensor:
        return idx.get(name).to(device=device, dtype=dtype)

    def opt(name: str) -> torch.Tensor | None:
        return t(name) if idx.has(name) else None

    out: dict[int, LayerWeights] = {}
    for i in layers:
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        qkv, qkv_bias = _fuse([t(a + f"{n}_proj.weight") for n in "qkv"], [opt(a + f"{n}_proj.bias") for n in "qkv"])
        gate_up, gate_up_bias = _fuse([t(m + "gate_proj.weight"), t(m + "up_proj.weight")],
                                      [opt(m + "gate_proj.bias"), opt(m + "up_proj.bias")])
        out[i] = LayerWeights(
            input_norm=t(p + "input_layernorm.weight"), post_norm=t(p + "post_attention_layernorm.weight"),
            qkv=qkv, qkv_bias=qkv_bias, o=t(a + "o_proj.weight"), o_bias=opt(a + "o_proj.bias"),
            gate_up=gate_up, gate_up_bias=gate_up_bias, down=t(m + "down_proj.weight"), down_bias=opt(m + "down_proj.bias"),
            q_norm=opt(a + "q_norm.weight"), k_norm=opt(a + "k_norm.weight"))
    if dims.qk_norm and any(lw.q_norm is None for lw in out.values()):
        raise ModelLoadError(f"{card.path}: qwen3 checkpoint without q_norm/k_norm weights")
    embed_name = "model.embed_tokens.weight"
    tied = card.config.get("tie_word_embeddings", False) or not idx.has("lm_head.weight")
    embed = t(embed_name) if (need_embed or tied) else None
    lm_head = embed if tied else t("lm_head.weight")
    if not need_embed and tied:
        embed = None
    return Weights(dims=dims, layers=out, embed=embed, final_norm=t("model.norm.weight"), lm_head=lm_head,
                   adapters=read_adapter_file(Path(adapters), dims.hidden, dims.layers, dtype, device) if adapters else {})


def rotary_tables(card: ModelCard, positions: int, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [positions, head_dim] from the model family's own rotary class,
    so every rope variant transformers knows (llama3, yarn, ...) is exact."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig
    import importlib

    config = AutoConfig.from_pretrained(card.path, local_files_only=True)
    module = importlib.import_module(f"transformers.models.{card.model_type}.modeling_{card.model_type}")
    cls_name = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}[card.model_type]
    rotary = getattr(module, f"{cls_name}RotaryEmbedding")(config=config)
    pos = torch.arange(positions)[None, :]
    dummy = torch.zeros(1, positions, 1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(dummy, pos)
    return cos[0].to(device=device, dtype=dtype), sin[0].to(device=device, dtype=dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, b)


def row_dots(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """`linear` written as one dot product per output: a compiled CPU step turns it
    into one vectorized multiply-reduce over each weight row, which for one row
    reads the weights at cache speed where BLAS's small-M path does not (the
    weight matmuls of a token 2.2x faster here: `dex bench --hf`, row
    "matmul-floor"). With several rows BLAS is the faster (inductor then loops
    the rows outside the weights, or recomputes the fused input per output), so
    only one-row steps use it. Eager, it would materialize [rows, out, in]:
    compiled steps only."""
    y = (x.unsqueeze(-2) * w).sum(-1)
    return y if b is None else y + b


Linear = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "relu": F.relu}


def shared_attention(q: torch.Tensor, kv: torch.Tensor, k_base: int, v_base: int, keys: torch.Tensor,
                     mask: torch.Tensor, dims: ModelDims) -> torch.Tensor:
    """Attention of rows that share one slice of keys (a prompt chunk: one request's
    consecutive positions): the slice `keys` [S] is gathered once, not per row, and
    every row's query heads of a KV head go through one matmul; `mask` [W, S] says
    which keys each row sees. q [W, heads, head_dim] -> [W, heads * head_dim]."""
    rows, group, d = q.shape[0], dims.heads // dims.kv_heads, dims.head_dim
    k = kv[keys + k_base].transpose(0, 1)                      # [kv_heads, S, d]
    v = kv[keys + v_base].transpose(0, 1)
    qh = q.view(rows, dims.kv_heads, group, d).permute(1, 0, 2, 3).reshape(dims.kv_heads, rows * group, d)
    scores = torch.matmul(qh, k.transpose(-1, -2)) * (d ** -0.5)
    scores = scores.view(dims.kv_heads, rows, group, -1).masked_fill(~mask[None, :, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype).view(dims.kv_heads, rows * group, -1)
    attn = torch.matmul(probs, v).view(dims.kv_heads, rows, group, d)
    return attn.permute(1, 0, 2, 3).reshape(rows, dims.heads * d)


def layer_forward(x: torch.Tensor, lw: LayerWeights, dims: ModelDims, cos: torch.Tensor, sin: torch.Tensor,
                  kv: torch.Tensor, k_base: int, v_base: int, kv_row: torch.Tensor, keys: torch.Tensor,
                  mask: torch.Tensor, lin: Linear = linear) -> torch.Tensor:
    """One decoder layer for W single-token rows. `kv` [rows, kv_heads, head_dim]
    holds this layer's K buffer from row `k_base` and its V buffer from `v_base`
    (one tensor for all layers, mutated in place: not a view, so a compiled step
    scatters into it instead of copying it). Writes each row's K/V at `kv_row`
    of the layer's buffers, then attends over the buffer rows `keys` [W, S] it
    may see (`mask` [W, S], True = visible), or over one slice `keys` [S] all
    rows share (a prompt chunk, `shared_attention`). Shapes are static: W rows, S
    gathered keys per row. `lin` computes the weight projections (`linear` or
    `row_dots`)."""
    rows = x.shape[0]
    h = rms_norm(x, lw.input_norm, dims.eps)
    nq, nkv = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    q, k, v = lin(h, lw.qkv, lw.qkv_bias).split((nq, nkv, nkv), dim=-1)
    q = q.reshape(rows, dims.heads, dims.head_dim)
    k = k.reshape(rows, dims.kv_heads, dims.head_dim)
    v = v.reshape(rows, dims.kv_heads, dims.head_dim)
    if lw.q_norm is not None:
        q = rms_norm(q, lw.q_norm, dims.eps)
        k = rms_norm(k, lw.k_norm, dims.eps)
    c, s = cos[:, None, :], sin[:, None, :]
    q = q * c + rotate_half(q) * s
    k = k * c + rotate_half(k) * s
    kv.index_copy_(0, torch.cat([kv_row + k_base, kv_row + v_base]), torch.cat([k, v]))
    group = dims.heads // dims.kv_heads
    if keys.dim() == 1:
        attn = shared_attention(q, kv, k_base, v_base, keys, mask, dims)
    else:
        qg = q.view(rows, dims.kv_heads, group, dims.head_dim)
        # [W, kv_heads, S, head_dim]: each row's own keys, so a batched matmul per row
        k_rows = kv[keys + k_base].transpose(1, 2)
        v_rows = kv[keys + v_base].transpose(1, 2)
        scores = torch.matmul(qg, k_rows.transpose(-1, -2)) * (dims.head_dim ** -0.5)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        attn = torch.matmul(probs, v_rows).reshape(rows, dims.heads * dims.head_dim)
    x = x + lin(attn, lw.o, lw.o_bias)
    h = rms_norm(x, lw.post_norm, dims.eps)
    gate, up = lin(h, lw.gate_up, lw.gate_up_bias).chunk(2, dim=-1)
    return x + lin(ACTIVATIONS[dims.act](gate) * up, lw.down, lw.down_bias)
