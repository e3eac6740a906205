"""Per-architecture facts: hyperparameters, tensor names and each tensor's role.

A role says how a tensor touches the residual stream, which is what the broadcast policies need
(DESIGN §4). It is declared per architecture, never guessed from shapes:

- ``read``:  a matrix whose *input* is the residual stream (q/k/v, gate/up; GPT-2 c_attn, c_fc)
- ``write``: a matrix whose *output* is the residual stream (o_proj, down_proj; GPT-2 c_proj)
- ``dvec``:  a d-sized vector living in the residual space (norm weights/biases, output biases)
- ``other``: any other vector (q/k/v biases, gate/up biases, GPT-2 c_attn/c_fc biases)

A layout says how a matrix is stored: ``linear`` is torch's ``[out, in]``; ``conv1d`` is GPT-2's
transposed ``[in, out]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable


class ArchitectureError(ValueError):
    """The model folder holds an architecture or configuration we cannot run."""


@dataclass(frozen=True)
class TensorRole:
    role: str  # read | write | dvec | other
    layout: str  # linear | conv1d | vector

    def d_axis(self) -> int | None:
        """Storage axis that carries the residual dimension under the role (None: no such axis)."""
        if self.layout == "vector":
            return 0 if self.role == "dvec" else None
        in_axis, out_axis = (1, 0) if self.layout == "linear" else (0, 1)
        if self.role == "read":
            return in_axis
        if self.role == "write":
            return out_axis
        return None


@dataclass(frozen=True)
class ModelConfig:
    """The hyperparameters the functional model code needs, read from a HF ``config.json``."""

    family: str  # llama | gpt2
    architecture: str
    vocab_size: int
    d: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    norm_eps: float
    max_positions: int
    tie_embeddings: bool
    activation: str
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Arch:
    name: str
    family: str
    layer_prefix: str  # format string with {i}
    roles: dict[str, TensorRole]  # layer-relative tensor name -> role
    embed: str
    final_norm: tuple[str, ...]  # weight (and bias) of the final norm
    lm_head: str
    read_config: Callable[[dict[str, Any], str], ModelConfig]
    extra_globals: tuple[str, ...] = field(default=())  # e.g. GPT-2 position embeddings
    # modules with the same input whose weights a dense layer may hold as one matrix (model.fuse)
    fused: tuple[tuple[str, ...], ...] = field(default=())

    def layer_name(self, i: int, suffix: str) -> str:
        return self.layer_prefix.format(i=i) + suffix

    def split_layer_name(self, name: str, n_layers: int) -> tuple[int, str] | None:
        """``model.layers.3.mlp.up_proj.weight`` -> ``(3, "mlp.up_proj.weight")``; None if global."""
        head, _, _ = self.layer_prefix.partition("{i}")
        if not name.startswith(head):
            return None
        rest = name[len(head):]
        idx, _, suffix = rest.partition(".")
        if not idx.isdigit() or int(idx) >= n_layers:
            return None
        return int(idx), suffix

    def role(self, suffix: str) -> TensorRole:
        try:
            return self.roles[suffix]
        except KeyError:
            raise ArchitectureError(
                f"{self.name}: tensor '{suffix}' in a decoder layer has no declared role; "
                "this checkpoint has a layer structure Constellation does not know"
            ) from None


def _eos(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope(cfg: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    params = cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or None
    rtype = params.get("rope_type") or params.get("type")
    if rtype and rtype != "default":
        scaling = dict(params)
    if scaling is not None:
        rtype = scaling.get("rope_type") or scaling.get("type")
        if rtype in (None, "default"):
            scaling = None
        elif rtype not in ("linear", "llama3"):
            raise ArchitectureError(
                f"{source}: rope scaling type '{rtype}' is not supported (supported: default, "
                "linear, llama3)"
            )
    return theta, scaling


def _read_llama(cfg: dict[str, Any], source: str) -> ModelConfig:
    d = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        raise ArchitectureError(f"{source}: sliding-window attention is not supported")
    act = cfg.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ArchitectureError(f"{source}: activation '{act}' is not supported")
    theta, scaling = _rope(cfg, source)
    return ModelConfig(
        family="llama",
        architecture=cfg["architectures"][0],
        vocab_size=int(cfg["vocab_size"]),
        d=d,
        n_layers=int(cfg["num_hidden_layers"]),
        n_heads=heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or d // heads),
        d_ff=int(cfg["intermediate_size"]),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_positions=int(cfg.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        activation=act,
        rope_theta=theta,
        rope_scaling=scaling,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos(cfg.get("eos_token_id")),
    )


def _read_gpt2(cfg: dict[str, Any], source: str) -> ModelConfig:
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
        raise ArchitectureError(
            f"{source}: GPT-2 options scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn "
            "are not supported"
        )
    if cfg.get("scale_attn_weights") is False:
        raise ArchitectureError(f"{source}: GPT-2 with scale_attn_weights=false is not supported")
    d = int(cfg["n_embd"])
    heads = int(cfg["n_head"])
    act = cfg.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ArchitectureError(f"{source}: activation '{act}' is not supported")
    return ModelConfig(
        family="gpt2",
        architecture=cfg["architectures"][0],
        vocab_size=int(cfg["vocab_size"]),
        d=d,
        n_layers=int(cfg["n_layer"]),
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=d // heads,
        d_ff=int(cfg.get("n_inner") or 4 * d),
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        max_positions=int(cfg.get("n_positions", 1024)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        activation=act,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos(cfg.get("eos_token_id")),
    )


ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")

_LIN_R, _LIN_W = TensorRole("read", "linear"), TensorRole("write", "linear")
_DVEC, _OTHER = TensorRole("dvec", "vector"), TensorRole("other", "vector")

LLAMA_ROLES = {
    "input_layernorm.weight": _DVEC,
    "post_attention_layernorm.weight": _DVEC,
    "self_attn.q_proj.weight": _LIN_R,
    "self_attn.k_proj.weight": _LIN_R,
    "self_attn.v_proj.weight": _LIN_R,
    "self_attn.q_proj.bias": _OTHER,  # Qwen2, Llama attention_bias
    "self_attn.k_proj.bias": _OTHER,
    "self_attn.v_proj.bias": _OTHER,
    "self_attn.o_proj.weight": _LIN_W,
    "self_attn.o_proj.bias": _DVEC,  # output bias lives in the residual space
    "mlp.gate_proj.weight": _LIN_R,
    "mlp.up_proj.weight": _LIN_R,
    "mlp.down_proj.weight": _LIN_W,
    "mlp.gate_proj.bias": _OTHER,  # Llama mlp_bias
    "mlp.up_proj.bias": _OTHER,
    "mlp.down_proj.bias": _DVEC,
}

# Llama-family projections that read one input: held fused (one matmul) in dense layers.
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")

_CONV_R, _CONV_W = TensorRole("read", "conv1d"), TensorRole("write", "conv1d")
GPT2_ROLES = {
    "ln_1.weight": _DVEC,
    "ln_1.bias": _DVEC,
    "ln_2.weight": _DVEC,
    "ln_2.bias": _DVEC,
    "attn.c_attn.weight": _CONV_R,
    "attn.c_attn.bias": _OTHER,
    "attn.c_proj.weight": _CONV_W,
    "attn.c_proj.bias": _DVEC,
    "mlp.c_fc.weight": _CONV_R,
    "mlp.c_fc.bias": _OTHER,
    "mlp.c_proj.weight": _CONV_W,
    "mlp.c_proj.bias": _DVEC,
}


def _llama_arch(name: str) -> Arch:
    return Arch(
        name=name,
        family="llama",
        layer_prefix="model.layers.{i}.",
        roles=LLAMA_ROLES,
        embed="model.embed_tokens.weight",
        final_norm=("model.norm.weight",),
        lm_head="lm_head.weight",
        read_config=_read_llama,
        fused=(QKV, GATE_UP),
    )


ARCHITECTURES: dict[str, Arch] = {
    name: _llama_arch(name)
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
}
ARCHITECTURES["GPT2LMHeadModel"] = Arch(
    name="GPT2LMHeadModel",
    family="gpt2",
    layer_prefix="transformer.h.{i}.",
    roles=GPT2_ROLES,
    embed="transformer.wte.weight",
    final_norm=("transformer.ln_f.weight", "transformer.ln_f.bias"),
    lm_head="lm_head.weight",
    read_config=_read_gpt2,
    extra_globals=("transformer.wpe.weight",),
)


def resolve(cfg: dict[str, Any], source: str) -> tuple[Arch, ModelConfig]:
    """Pick the architecture of a HF ``config.json`` dict; refuse unknown ones by class name."""
    archs = cfg.get("architectures") or []
    if not archs:
        raise ArchitectureError(f"{source}: config.json has no 'architectures' entry")
    name = archs[0]
    if name not in ARCHITECTURES:
        raise ArchitectureError(
            f"{source}: unsupported architecture class '{name}' "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    arch = ARCHITECTURES[name]
    try:
        mc = arch.read_config(cfg, source)
    except KeyError as e:
        raise ArchitectureError(f"{source}: config.json lacks required key {e}") from None
    if mc.n_heads * mc.head_dim != mc.d and mc.family == "gpt2":
        raise ArchitectureError(f"{source}: n_embd is not divisible by n_head")
    if mc.n_heads % mc.n_kv_heads:
        raise ArchitectureError(f"{source}: num_attention_heads must be a multiple of kv heads")
    return arch, mc


def rope_inv_freq(mc: ModelConfig) -> "Any":
    """Inverse frequencies of the rotary embedding, with linear or llama3 scaling."""
    import torch

    dim = mc.head_dim
    inv = 1.0 / (mc.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    sc = mc.rope_scaling
    if sc is None:
        return inv.float()
    rtype = sc.get("rope_type") or sc.get("type")
    if rtype == "linear":
        return (inv / float(sc["factor"])).float()
    # llama3
    factor = float(sc["factor"])
    low = float(sc.get("low_freq_factor", 1.0))
    high = float(sc.get("high_freq_factor", 4.0))
    old_ctx = float(sc.get("original_max_position_embeddings", 8192))
    low_wl, high_wl = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > low_wl, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return torch.where(medium, smoothed, out).float()
