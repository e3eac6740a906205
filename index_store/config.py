"""The constellation config file (TOML), validated with pydantic; errors name the file and key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from composer.modes import MODES
from composer.policies import POLICIES


class ConfigError(ValueError):
    """The config file is missing, not TOML, or has an invalid or unknown key."""


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


class CompositionConfig(_Strict):
    top_k: int = Field(3, ge=1)
    layers: Literal["auto"] | int = Field(
        "auto", description='"auto": every decoder layer a specialist changes; an integer L: the last L layers')
    policy: str = "residual"
    signature: Literal["generalist", "trunk", "full"] = "generalist"
    mode: str = "constellation"
    task_arithmetic_lambda: float = Field(0.5, ge=-10, le=10)

    @field_validator("layers")
    @classmethod
    def _layers(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError('must be "auto" or an integer >= 1')
        return v

    @field_validator("policy", "mode")
    @classmethod
    def _registered(cls, v: str, info) -> str:
        registry = POLICIES if info.field_name == "policy" else MODES
        if v not in registry:
            raise ValueError(f"unknown {info.field_name} '{v}' (choose from {', '.join(registry)})")
        return v


class RuntimeConfig(_Strict):
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class ConstellationConfig(_Strict):
    generalist: GeneralistConfig
    specialists: dict[str, Path] = Field(min_length=1, description="domain = a full model folder or a PEFT "
                                         "LoRA adapter folder (adapter_config.json)")
    index: IndexConfig
    composition: CompositionConfig = CompositionConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("specialists")
    @classmethod
    def _names(cls, v: dict[str, Path]) -> dict[str, Path]:
        for name in v:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"domain name '{name}' must be letters, digits, '-' or '_'")
        return v

    def resolved(self, base: Path) -> "ConstellationConfig":
        def r(p: Path) -> Path:
            p = p.expanduser()
            return p if p.is_absolute() else (base / p).resolve()

        return self.model_copy(update={
            "generalist": self.generalist.model_copy(update={"path": r(self.generalist.path)}),
            "specialists": {k: r(p) for k, p in self.specialists.items()},
            "index": self.index.model_copy(update={"path": r(self.index.path), "probes": r(self.index.probes)}),
        })


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc]
    if not parts:
        return "(top level)"
    if len(parts) == 1:
        return f"[{parts[0]}]"
    return f"[{parts[0]}]." + ".".join(parts[1:])


def format_validation(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid constellation config:"]
    for e in err.errors():
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (typo?)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        got = e.get("input")
        shown = f" (got {got!r})" if e["type"] not in ("missing", "extra_forbidden") and not isinstance(got, dict) else ""
        lines.append(f"  {_loc(e['loc'])}: {msg}{shown}")
    return "\n".join(lines)


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
