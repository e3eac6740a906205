"""The constellation config file (TOML), validated with pydantic; errors name the file and key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from composer.modes import MODES
from composer.policies import POLICIES


class ConfigError(ValueError):
    """The config file is missing, not TOML, has an invalid or unknown key, or names a folder or file
    that is not there."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GeneralistConfig(_Strict):
    path: Path = Field(description="HF folder: config.json, *.safetensors, tokenizer")


class IndexConfig(_Strict):
    path: Path = Field(description="folder where the index is stored")
    probes: Path = Field(description='JSON {"domains": {"medical": ["text", ...], ...}}')
    basis: Literal["symmetric", "gram_schmidt"] = "symmetric"
    noise_fraction: float = Field(0.0, ge=0.0, le=1.0)
    seed: int = 0
    max_tokens: int = Field(256, ge=1, le=32768, description="probe tokens fingerprinted (truncation)")
    batch_size: int = Field(8, ge=1, le=1024)
    calibrate: bool = Field(True, description="calibrate the weighting's sharpness and the per-domain strengths "
                            "on held-out index probes at build (loads the specialists; docs/weightings.md)")


class CompositionConfig(_Strict):
    top_k: int = Field(3, ge=1)
    layers: Literal["auto"] | int = Field(
        "auto", description='"auto": every decoder layer a specialist changes; an integer L: the last L layers')
    policy: str = "residual"
    signature: Literal["generalist", "trunk", "full"] = "generalist"
    mode: str = "constellation"
    task_arithmetic_lambda: float = Field(0.5, ge=-10, le=10)

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v):
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f'must be "auto" or an integer >= 1, got {_toml_type(v)}')

    @field_validator("policy", "mode")
    @classmethod
    def _registered(cls, v: str, info) -> str:
        registry = POLICIES if info.field_name == "policy" else MODES
        if v not in registry:
            raise ValueError(f"unknown {info.field_name} '{v}' (choose from {', '.join(registry)})")
        return v


def check_buckets(v: list[int]) -> list[int]:
    """Row buckets of a captured decode step, sorted and distinct (``[runtime].compile_buckets``,
    ``serve --compile-buckets``, ``Engine.capture``); ValueError unless 1-1024 rows each."""
    if not v or any(b < 1 or b > 1024 for b in v):
        raise ValueError(f"compile_buckets are row counts from 1 to 1024, got {list(v)}")
    return sorted(set(v))


class RuntimeConfig(_Strict):
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    weights: Literal["bf16", "int8", "int4"] = Field(
        "bf16", description="the generalist's matrices: bf16 = full precision, held in [runtime].dtype; int8 "
        "(per output channel) or int4 (groups of int4_group inputs) = quantized at load, the embedding and "
        "output head in int8, adapters on top in [runtime].dtype (docs/precision.md)")
    int4_group: Literal[32, 64, 128] = Field(32, description="inputs per int4 scale and zero (weights = int4)")
    packed_weights: bool = Field(True, description="serve: hold the generalist's matrices a second time in "
                                 "oneDNN's prepacked layout on a CPU (faster matmuls, one more copy in memory)")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="serve: capture the decode step as one compiled graph per row bucket (inductor on a "
        "CPU, CUDA graphs on CUDA), built in the background while decoding runs eagerly; auto = on for CUDA, and on a CPU for float32, "
        "quantized, or bf16 weights where the CPU has native bf16 (AVX512-BF16, AMX): where it was measured "
        "faster (docs/benchmarks.md)")
    compile_buckets: list[int] = Field([1, 2, 4, 8, 16], min_length=1, max_length=16, description="serve: row "
                                       "counts a captured decode step is compiled for (a step pads its rows up "
                                       "to the next one; more rows than the largest: compile_above)")

    compile_above: Literal["auto", "on", "off"] = Field(
        "auto", description="serve: also capture one graph for every row count above the largest bucket (the "
        "rows' count a dynamic size, nothing padded), built after the buckets; auto = on a CPU (on CUDA a "
        "graph would record for each row count)")

    @field_validator("compile_buckets")
    @classmethod
    def _buckets(cls, v: list[int]) -> list[int]:
        return check_buckets(v)

    def compiles_above(self, device) -> bool:
        """Whether a captured step also covers the rows above the largest bucket on ``device``."""
        if self.compile_above != "auto":
            return self.compile_above == "on"
        return device.type == "cpu"

    def compiles(self, device, dtype) -> bool:
        """Whether ``serve`` captures the decode step for weights of ``dtype`` on ``device``."""
        if self.compile != "auto":
            return self.compile == "on"
        import torch

        from .models import cpu_has_native_bf16

        if device.type == "cuda" or self.weights != "bf16":
            return True
        return device.type == "cpu" and (dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_native_bf16()))


class CatalogConfig(_Strict):
    version: int = Field(0, ge=0, description="bumped by every `constellation specialist` change")
    models_root: Path | None = Field(None, description="the admin API adds specialists from under this folder only")
    keep: int = Field(3, ge=1, le=100, description="catalog snapshots kept in .catalog/ (the newest)")


class ConstellationConfig(_Strict):
    generalist: GeneralistConfig
    specialists: dict[str, Path] = Field(min_length=1, description="domain = a full model folder or a PEFT "
                                         "LoRA adapter folder (adapter_config.json)")
    index: IndexConfig
    composition: CompositionConfig = CompositionConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    catalog: CatalogConfig = CatalogConfig()
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("specialists")
    @classmethod
    def _names(cls, v: dict[str, Path]) -> dict[str, Path]:
        for name in v:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"domain name '{name}' must be letters, digits, '-' or '_'")
        return v

    @property
    def weights(self) -> dict:
        """The generalist's weights format as an index records it."""
        w = self.runtime.weights
        return {"format": w, "group": self.runtime.int4_group} if w == "int4" else {"format": w}

    def with_weights(self, fmt: str, group: int | None = None) -> "ConstellationConfig":
        """This config serving the generalist's weights in ``fmt`` (int4: in groups of ``group``)."""
        update = {"weights": fmt} | ({"int4_group": group} if fmt == "int4" and group else {})
        return self.model_copy(update={"runtime": self.runtime.model_copy(update=update)})

    @property
    def index_path(self) -> Path:
        """The index for the weights served: ``[index].path`` for bf16 weights, the sibling folder
        ``<path>-int8`` / ``<path>-int4`` for quantized ones (fingerprints move with the weights)."""
        p, w = self.index.path, self.runtime.weights
        return p if w == "bf16" else p.with_name(f"{p.name}-{w}")

    def resolved(self, base: Path) -> "ConstellationConfig":
        def r(p: Path) -> Path:
            p = p.expanduser()
            return p if p.is_absolute() else (base / p).resolve()

        return self.model_copy(update={
            "generalist": self.generalist.model_copy(update={"path": r(self.generalist.path)}),
            "specialists": {k: r(p) for k, p in self.specialists.items()},
            "index": self.index.model_copy(update={"path": r(self.index.path), "probes": r(self.index.probes)}),
            "catalog": self.catalog.model_copy(update={
                "models_root": None if self.catalog.models_root is None else r(self.catalog.models_root)}),
        })


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc]
    if not parts:
        return "(top level)"
    if len(parts) == 1:
        return f"[{parts[0]}]"
    return f"[{parts[0]}]." + ".".join(parts[1:])


# what a key must be, by pydantic error type, in TOML's words
_EXPECTED = {"path_type": "a path (a string)", "string_type": "a string", "int_type": "an integer",
             "int_parsing": "an integer", "int_from_float": "an integer", "float_type": "a number",
             "float_parsing": "a number", "bool_type": "true or false", "bool_parsing": "true or false",
             "dict_type": "a table", "model_type": "a table", "model_attributes_type": "a table"}


def _toml_type(v) -> str:
    """A TOML value's type as the file's author knows it ("an integer", not ``<class 'int'>``)."""
    if isinstance(v, bool):
        return f"a boolean ({str(v).lower()})"
    if isinstance(v, (int, float)):
        return f"{'an integer' if isinstance(v, int) else 'a float'} ({v})"
    if isinstance(v, str):
        return f"a string ({v!r})"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return "a date/time" if hasattr(v, "isoformat") else type(v).__name__


def _problem(e: dict) -> str:
    if e["type"] == "extra_forbidden":
        return "unknown key (typo?)"
    if e["type"] == "missing":
        return "required key is missing"
    if e["type"] in _EXPECTED:
        return f"must be {_EXPECTED[e['type']]}, got {_toml_type(e.get('input'))}"
    got = e.get("input")
    said = isinstance(got, (dict, list)) or "got " in e["msg"] or repr(got) in e["msg"]
    return e["msg"] + ("" if said else f" (got {got!r})")


def format_validation(err: ValidationError, source: str) -> str:
    """One line: ``FILE: [section].key: problem; [section].key: problem``. A config is two levels
    deep, so a longer location is a union member's tag: only the first problem per key is kept."""
    seen: dict[tuple, str] = {}
    for e in err.errors():
        seen.setdefault(tuple(e["loc"][:2]), _problem(e))
    return f"{source}: " + "; ".join(f"{_loc(loc)}: {msg}" for loc, msg in seen.items())


def check_paths(cfg: ConstellationConfig, specialists: bool = True) -> None:
    """Refuse, before loading anything, a folder or file the config names that is not there,
    naming the config file and the key: the generalist, the specialists (``specialists=False``:
    not needed, as when building the index) and the probe file the index is checked against."""
    wanted = [("[generalist].path", cfg.generalist.path, "folder")]
    if specialists:
        wanted += [(f"[specialists].{d}", p, "folder") for d, p in cfg.specialists.items()]
    wanted.append(("[index].probes", cfg.index.probes, "file"))
    for key, path, kind in wanted:
        if not (path.is_dir() if kind == "folder" else path.is_file()):
            what = "does not exist" if not path.exists() else f"is not a {kind}"
            raise ConfigError(f"{cfg.source}: {key}: {kind} {path} {what}")


def check_top_k(cfg: ConstellationConfig) -> None:
    """An explicit ``[composition].top_k`` larger than the number of specialists is refused (the
    default, 3, is clamped by the top-K selection)."""
    k, n = cfg.composition.top_k, len(cfg.specialists)
    if "top_k" in cfg.composition.model_fields_set and k > n:
        raise ConfigError(f"{cfg.source}: [composition].top_k: {k} exceeds the {n} specialist(s) "
                          f"({', '.join(cfg.specialists)})")


def load_config(path: str | Path) -> ConstellationConfig:
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    try:
        cfg = ConstellationConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation(e, str(path))) from None
    cfg = cfg.resolved(path.parent)
    cfg.source = path
    return cfg
