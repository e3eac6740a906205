"""Request and response models of ``POST /v1/embeddings`` (OpenAI's shape) and ``POST /tokenize``,
``POST /detokenize`` (vLLM's), apart from ``protocol`` (completions and chat)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .protocol import ChatMessage


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # a string, a list of strings, token ids, or a list of token-id lists (OpenAI's four forms);
    # validated into a list of inputs, each a string or a list of token ids
    input: Any
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)  # only the fingerprint's own (it is not truncatable)
    user: str | None = None  # accepted, no effect (as on the other routes)

    @field_validator("input")
    @classmethod
    def _inputs(cls, v) -> list[str | list[int]]:
        def ids(x) -> bool:
            return isinstance(x, list) and all(type(t) is int for t in x)

        if isinstance(v, str):
            return [v]
        if not isinstance(v, list) or not v:
            raise ValueError("a string, a list of strings, a list of token ids or a list of token-id lists (not empty)")
        if ids(v):
            return [v]
        for i, x in enumerate(v):
            if not (isinstance(x, str) or ids(x)):
                raise ValueError(f"item {i} is neither a string nor a list of token ids")
        return v


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # base64: the float32 values' little-endian bytes
    index: int


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize``: a ``prompt`` as ``/v1/completions`` tokenizes it, or ``messages`` as
    ``/v1/chat/completions`` does (the chat template with its generation prompt)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None  # prompt: default true; messages: the chat template writes its own
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
