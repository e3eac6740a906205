"""``constellation specialist extract``: a PEFT LoRA adapter from a full fine-tune.

For every decoder-layer linear weight (roles ``read``/``write``) that differs between the full
fine-tune ``F`` and the generalist ``G``, the update ``dW = W_F - W_G`` (torch's ``[out, in]``
convention; GPT-2's Conv1D ``[in, out]`` is transposed first) is factored by a truncated SVD in
float64, ``dW ~= U_r S_r V_r^T``, and split symmetrically::

    B = U_r * sqrt(S_r)      [out, r]   (PEFT's lora_B.weight)
    A = sqrt(S_r) * V_r^T    [r, in]    (PEFT's lora_A.weight)

The symmetric split gives both factors the same scale (better for fp16/bf16 storage and for
further training than putting all of ``S`` into ``B``); ``B @ A`` is the same either way. Every
module gets ``lora_alpha = r`` so PEFT's scaling ``alpha / r`` is exactly 1. By Eckart-Young the
relative Frobenius error of rank ``r`` is ``sqrt(sum_{i>=r} s_i^2 / sum_i s_i^2)``.

What a LoRA update cannot express is carried whole, the way PEFT itself saves it:

- a changed bias of a LoRA-targeted linear: ``bias = "lora_only"`` (PEFT stores the targeted
  layers' biases under ``<module>.base_layer.bias``; PEFT loads them into the base layer, so they
  stay in place when the adapter is disabled, as for any adapter trained with that setting);
- any other changed tensor inside a decoder layer (norm weights/biases, the bias of a linear whose
  weight did not change): its module goes to ``modules_to_save`` and is saved whole.

Changed tensors outside the decoder layers (embeddings, final norm, lm_head) cannot be carried by
a per-layer adapter: the extraction refuses and names them.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from composer.arch import resolve
from composer.weights import WeightsError, comparable_config, normalize_names, read_config, safetensor_files
from .models import load_tokenizer

PEFT_PREFIX = "base_model.model."
ENERGY_ROUNDOFF = 1e-12  # --energy 1.0 may drop at most this fraction of the energy (float64 round-off)


class ExtractError(ValueError):
    """The extraction cannot be done as asked (mismatched folders, unrepresentable changes, bad options)."""


@dataclass
class ModuleResult:
    """One module of the adapter: a LoRA factorization or a module saved whole."""

    module: str  # PEFT module path, e.g. model.layers.4.self_attn.q_proj
    kind: str  # "lora" | "dense" (modules_to_save)
    shape: tuple[int, ...]  # lora: (out, in); dense: the module's first tensor's shape
    rank: int | None = None
    full_rank: int | None = None  # min(out, in)
    energy: float | None = None  # fraction of the squared singular values kept
    rel_error: float = 0.0  # ||dW - B A||_F / ||dW||_F with the factors as stored
    delta_norm: float = 0.0  # ||dW||_F
    bias: bool = False  # lora module whose (changed) bias is saved whole
    nbytes: int = 0  # bytes of this module's tensors in the adapter


@dataclass
class Extraction:
    full: Path
    base: Path
    out: Path
    architecture: str
    modules: list[ModuleResult]
    tensors: dict[str, torch.Tensor]  # PEFT state-dict keys -> tensors as written
    config: dict
    adapter_bytes: int
    delta_bytes: int  # bytes of every changed tensor of the full fine-tune, as stored
    tied_lm_head: bool
    heldout: dict | None = None
    merged: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # canonical name -> new tensor

    @property
    def overall_rel_error(self) -> float:
        num = sum((m.rel_error * m.delta_norm) ** 2 for m in self.modules if m.kind == "lora")
        den = sum(m.delta_norm ** 2 for m in self.modules if m.kind == "lora")
        return math.sqrt(num / den) if den else 0.0


# ---- reading two folders tensor by tensor ------------------------------------------------------
class _Checkpoint:
    """Lazy access to a model folder's safetensors by canonical (arch-normalized) name."""

    def __init__(self, folder: Path, arch, stack: contextlib.ExitStack):
        self.folder = folder
        self.where: dict[str, tuple[object, str]] = {}
        for f in safetensor_files(folder):
            try:
                sf = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
                keys = list(sf.keys())
            except Exception as e:  # safetensors raises several types for truncated/corrupt files
                raise WeightsError(f"{f}: cannot read safetensors file ({e})") from None
            for k in keys:
                self.where[k] = (sf, k)
        canon = normalize_names({k: k for k in self.where}, arch)
        self.where = {c: self.where[k] for c, k in canon.items()}

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> torch.Tensor:
        sf, key = self.where[name]
        try:
            return sf.get_tensor(key)
        except Exception as e:
            raise WeightsError(f"{self.folder}: cannot read tensor {key} ({e})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        sf, key = self.where[name]
        return tuple(sf.get_slice(key).get_shape())


# ---- options and inputs -------------------------------------------------------------------------
def check_options(rank: int | None, energy: float | None, max_tokens: int) -> None:
    if (rank is None) == (energy is None):
        raise ExtractError("give exactly one of --rank R or --energy E")
    if rank is not None and rank < 1:
        raise ExtractError(f"--rank must be at least 1 (got {rank})")
    if energy is not None and not (0.0 < energy <= 1.0):
        raise ExtractError(f"--energy must be in (0, 1] (got {energy})")
    if max_tokens < 1:
        raise ExtractError(f"--max-tokens must be at least 1 (got {max_tokens})")


def check_out(out: Path, force: bool, folders: tuple[Path, ...]) -> None:
    """Refuse an existing --out without --force, and any --out that would replace an input."""
    res = out.resolve()
    for f in folders:
        fr = f.resolve()
        if res == fr or res in fr.parents:
            raise ExtractError(f"{out}: the adapter folder must not be (or contain) the input folder {f}")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ExtractError(f"{out}: exists and is not a folder; choose another --out")
        if not force:
            raise ExtractError(f"{out}: already exists; pass --force to replace it")


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def check_same_model(full: Path, base: Path):
    """Both folders hold the same architecture and config.json (ignoring bookkeeping keys)."""
    fcfg, bcfg = read_config(full), read_config(base)
    barch, bmc = resolve(bcfg, str(base / "config.json"))
    farch, _ = resolve(fcfg, str(full / "config.json"))
    if farch.name != barch.name:
        raise ExtractError(f"{full / 'config.json'}: architecture {farch.name} differs from the base's "
                           f"{barch.name} ({base / 'config.json'}); extract needs a fine-tune of the base")
    f, b = comparable_config(fcfg), comparable_config(bcfg)
    diffs = sorted(k for k in set(f) | set(b) if f.get(k) != b.get(k))
    if diffs:
        shown = ", ".join(f"{k}: {_short(f.get(k))} vs {_short(b.get(k))}" for k in diffs[:4])
        more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
        raise ExtractError(f"{full / 'config.json'}: does not match the base's {base / 'config.json'}: "
                           f"{shown}{more}")
    return barch, bmc


# ---- the factorization --------------------------------------------------------------------------
def choose_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """``rank`` capped at ``len(s)``, or the smallest rank whose squared singular values reach
    ``energy`` of the total (``energy = 1.0`` drops only float64 round-off, <= 1e-12 of the energy)."""
    n = int(s.numel())
    if rank is not None:
        return max(1, min(rank, n))
    e = s.double() ** 2
    cum = torch.cumsum(e, 0)
    total = float(cum[-1])
    if total == 0.0:
        return 1
    target = min(energy, 1.0 - ENERGY_ROUNDOFF) * total
    r = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype)).item()) + 1
    return max(1, min(r, n))


def factorize(delta: torch.Tensor, rank: int | None, energy: float | None, dtype: torch.dtype):
    """``delta [out, in]`` -> ``(B [out, r], A [r, in])`` stored as ``dtype``, the rank, the kept energy
    and the relative Frobenius error of the stored factors."""
    d = delta.double()
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    r = choose_rank(S, rank, energy)
    root = S[:r].sqrt()
    B = (U[:, :r] * root).to(dtype).contiguous()
    A = (root[:, None] * Vh[:r]).to(dtype).contiguous()
    e = S ** 2
    kept = float(e[:r].sum() / e.sum()) if float(e.sum()) > 0 else 1.0
    norm = float(torch.linalg.matrix_norm(d))
    err = float(torch.linalg.matrix_norm(d - B.double() @ A.double())) / norm if norm > 0 else 0.0
    return B, A, r, kept, err, norm


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def extract(
    full: str | Path,
    base: str | Path,
    out: str | Path,
    rank: int | None = None,
    energy: float | None = None,
    heldout: str | Path | None = None,
    max_tokens: int = 256,
    force: bool = False,
    quiet: bool = False,
) -> Extraction:
    """Extract the adapter, evaluate it on ``heldout`` if given, and write ``out`` atomically."""
    from .extract_report import adapter_config, evaluate, read_heldout, write_adapter

    full, base, out = Path(full), Path(base), Path(out)
    check_options(rank, energy, max_tokens)
    for f in (full, base):
        if not f.is_dir():
            raise WeightsError(f"{f}: model folder does not exist")
    check_out(out, force, (full, base))
    arch, mc = check_same_model(full, base)
    texts = read_heldout(Path(heldout)) if heldout is not None else None
    tok = None
    if texts is not None:
        tok = load_tokenizer(base)
    with contextlib.ExitStack() as stack:
        fc, bc = _Checkpoint(full, arch, stack), _Checkpoint(base, arch, stack)
        fnames, changed, delta_bytes = compare_checkpoints(fc, bc, arch, mc)
        targets, dense, lora_bias = classify_changes(full, arch, mc, fnames, changed)
        results, tensors, merged = build_modules(fc, bc, arch, mc, fnames, changed, targets, dense, lora_bias,
                                                 rank, energy, measure=texts is not None, quiet=quiet)

    config = adapter_config(base, arch, results, dense, lora_bias)
    ex = Extraction(full, base, out, arch.name, results, tensors, config,
                    sum(_nbytes(t) for t in tensors.values()), delta_bytes, mc.tie_embeddings, merged=merged)
    if texts is not None:
        ex.heldout = evaluate(ex, tok, texts, max_tokens)
    write_adapter(ex, rank, energy, force)
    return ex


def compare_checkpoints(fc: _Checkpoint, bc: _Checkpoint, arch, mc) -> tuple[set[str], list[str], int]:
    """The fine-tune's tensor names, the changed decoder-layer tensors among them (sorted) and the
    bytes of every changed tensor; refuses mismatched names or shapes, changes outside the decoder
    layers, and no change at all."""
    full, base = fc.folder, bc.folder
    fnames, bnames = fc.names(), bc.names()
    if mc.tie_embeddings:  # a tied head may or may not be stored; it is the embedding either way
        fnames.discard(arch.lm_head)
        bnames.discard(arch.lm_head)
    if fnames != bnames:
        only_f, only_b = sorted(fnames - bnames)[:3], sorted(bnames - fnames)[:3]
        raise ExtractError(f"{full}: tensor names differ from the base's ({base}): only in the fine-tune "
                           f"{only_f}, only in the base {only_b}")
    changed, glob, delta_bytes = [], [], 0
    for name in sorted(fnames):
        if fc.shape(name) != bc.shape(name):
            raise ExtractError(f"{full}: tensor {name} has shape {fc.shape(name)}, the base's "
                               f"{bc.shape(name)}")
        ft, bt = fc.get(name), bc.get(name)
        if torch.equal(ft, bt) if ft.dtype == bt.dtype else torch.equal(ft.double(), bt.double()):
            continue
        delta_bytes += _nbytes(ft)
        (changed if arch.split_layer_name(name, mc.n_layers) is not None else glob).append(name)
    if glob:
        shown = ", ".join(glob[:4]) + (f" (and {len(glob) - 4} more)" if len(glob) > 4 else "")
        raise ExtractError(
            f"{full}: tensors outside the decoder layers differ from the base: {shown}; a per-layer LoRA "
            "adapter cannot carry them (embeddings, final norm and lm_head must equal the base's), so "
            "nothing was written")
    if not changed:
        raise ExtractError(f"{full}: every tensor equals the base's ({base}); there is nothing to extract")
    return fnames, changed, delta_bytes


def classify_changes(full: Path, arch, mc, fnames: set[str], changed: list[str]):
    """Split the changed tensors into LoRA targets (module -> changed read/write weight), modules
    saved whole (module -> all its tensors) and whether changed biases of targets go whole."""
    targets: dict[str, str] = {}  # module path -> canonical weight name
    vectors: list[str] = []
    for name in changed:
        _, suffix = arch.split_layer_name(name, mc.n_layers)
        role = arch.roles.get(suffix)
        if role is None:
            raise ExtractError(f"{full}: tensor {name} differs from the base but has no role in "
                               f"{arch.name}'s layer structure; it cannot be put in an adapter")
        if role.role in ("read", "write"):
            targets[name.rsplit(".", 1)[0]] = name
        else:
            vectors.append(name)
    if not targets:
        raise ExtractError(f"{full}: no decoder-layer linear weight differs from the base (only "
                           f"{', '.join(vectors[:3])}...); a LoRA adapter needs at least one")
    lora_bias = False
    dense: dict[str, list[str]] = {}  # module -> its tensors (saved whole)
    for name in vectors:
        owner, param = name.rsplit(".", 1)
        if owner in targets and param == "bias":
            lora_bias = True
        else:
            dense.setdefault(owner, [])
    for owner in dense:
        dense[owner] = sorted(n for n in fnames if n.rsplit(".", 1)[0] == owner)
    return targets, dense, lora_bias


def build_modules(fc, bc, arch, mc, fnames, changed, targets, dense, lora_bias, rank, energy, measure, quiet):
    """Factor every target and collect every whole-saved module, in forward order, with a progress bar.
    Returns the module results, the adapter tensors (PEFT keys) and, if ``measure``, the densely merged
    tensors (canonical names) for the held-out loss."""
    from tqdm import tqdm

    tensors: dict[str, torch.Tensor] = {}
    merged: dict[str, torch.Tensor] = {}
    results: list[ModuleResult] = []
    order = sorted([*targets, *dense], key=lambda m: _module_order(arch, mc, m))
    with tqdm(total=len(order), desc="extracting", unit="module", file=sys.stderr, disable=quiet,
              dynamic_ncols=True) as bar:
        for module in order:
            if module in targets:
                res = _lora_module(fc, bc, arch, mc, module, targets[module], rank, energy, tensors,
                                   merged if measure else None)
                bname = module + ".bias"
                if lora_bias and bname in fnames:  # PEFT saves every targeted layer's bias then
                    bias = fc.get(bname)
                    tensors[f"{PEFT_PREFIX}{module}.base_layer.bias"] = bias.contiguous()
                    res.nbytes += _nbytes(bias)
                    res.bias = bname in changed
                    if measure:
                        merged[bname] = bias.float()
            else:
                res = ModuleResult(module, "dense", fc.shape(dense[module][0]))
                for n in dense[module]:
                    t = fc.get(n).contiguous()
                    tensors[f"{PEFT_PREFIX}{n}"] = t
                    res.nbytes += _nbytes(t)
                    if measure:
                        merged[n] = t.float()
            results.append(res)
            bar.update(1)
    return results, tensors, merged


def _lora_module(fc, bc, arch, mc, module, wname, rank, energy, tensors, merged) -> ModuleResult:
    """Factor one changed weight into ``tensors``; if ``merged`` is given, also put ``W_G + B A`` there."""
    layout = arch.roles[arch.split_layer_name(wname, mc.n_layers)[1]].layout
    wf, wg = fc.get(wname), bc.get(wname)
    delta = wf.double() - wg.double()
    if layout == "conv1d":
        delta = delta.T
    B, A, r, kept, err, norm = factorize(delta, rank, energy, wf.dtype)
    tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = A
    tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = B
    if merged is not None:  # the dense merge, only to measure the held-out loss
        bd = B.double() @ A.double()
        merged[wname] = (wg.double() + (bd.T if layout == "conv1d" else bd)).float()
    return ModuleResult(module, "lora", tuple(delta.shape), r, min(delta.shape), kept, err, norm,
                        nbytes=_nbytes(A) + _nbytes(B))


FORWARD_ORDER = {  # a decoder block's modules in the order the forward pass uses them (for the table)
    "llama": ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "gpt2": ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"),
}


def _module_order(arch, mc, module: str):
    """Sort key: layer index, then the module's place in the forward pass."""
    i, suffix = arch.split_layer_name(module, mc.n_layers)
    names = FORWARD_ORDER.get(arch.family, ())
    return i, names.index(suffix) if suffix in names else len(names), module

