"""Constrained decoding: a sequence's grammar as a token mask in the batched sampler.

Grammars are compiled by llguidance (the engine llama.cpp's server and vLLM use; chosen over
xgrammar by measurement, docs/benchmarks.md: 8x faster compiles, masks of the same cost) from a
JSON schema, "any JSON object", or a Lark grammar (the tool-call formats). ``Grammars`` compiles
once per spec (an LRU cache keyed by the spec's canonical JSON) on the caller's thread, never the
engine's; each sequence then gets its own copy of the compiled matcher (``Grammar.matcher``).

On the engine thread, per step: ``masks`` fills one bit mask per constrained row (llguidance, a few
microseconds a row) and ``apply`` sets every disallowed token's score to -inf; after sampling, the
core feeds the chosen token to the row's matcher and finishes the sequence when the grammar is done.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

# JSON as people and models write it (json.dumps' separators), not arbitrary whitespace: a small
# model left free to add whitespace can emit it until max_tokens.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}


class GrammarError(ValueError):
    """A grammar llguidance cannot compile (an unsupported schema feature, a bad pattern): the
    message names what."""


@dataclass(frozen=True)
class GrammarSpec:
    """What to constrain to: ``kind`` "json_schema" (``value`` a schema dict), "json_object"
    (``value`` None) or "lark" (``value`` a Lark grammar, which may embed ``%json{...}``)."""

    kind: str
    value: object = None

    @property
    def key(self) -> str:
        return json.dumps([self.kind, self.value], sort_keys=True, separators=(",", ":"))


class Grammar:
    """A compiled grammar: each sequence decodes with its own copy of the matcher."""

    def __init__(self, spec: GrammarSpec, template):
        self.spec, self._template = spec, template

    def matcher(self):
        return self._template.deep_copy()


class Grammars:
    """Compiles and caches grammars for one tokenizer. Thread-safe; call it off the engine thread."""

    def __init__(self, tok, vocab_size: int, eos_ids: set[int], cache_size: int = 256, on_compile=lambda: None):
        self.tok, self.vocab_size, self.eos_ids, self.on_compile = tok, vocab_size, sorted(eos_ids), on_compile
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self._lltok = None
        self.compiled = 0  # grammars compiled (cache misses), for tests and metrics

    @property
    def lltokenizer(self):
        """llguidance's view of the vocabulary (built once, ~0.4 s for 49k tokens)."""
        with self._lock:
            if self._lltok is None:
                import llguidance.hf

                try:
                    self._lltok = llguidance.hf.from_tokenizer(self.tok, n_vocab=self.vocab_size,
                                                               eos_token=self.eos_ids)
                except Exception as e:  # e.g. a slow (Python) tokenizer: llguidance reads fast ones only
                    raise GrammarError(f"structured outputs and tools need a fast (tokenizers) tokenizer whose "
                                       f"vocabulary fits the model's {self.vocab_size} outputs: {e}") from None
            return self._lltok

    def compile(self, spec: GrammarSpec) -> Grammar:
        key = spec.key
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        g = Grammar(spec, self._build(spec))
        with self._lock:
            self._cache[key] = g
            self.compiled += 1
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self.on_compile()
        return g

    def _build(self, spec: GrammarSpec):
        import llguidance

        M = llguidance.LLMatcher
        lltok = self.lltokenizer
        try:
            if spec.kind == "json_schema":
                grammar = M.grammar_from_json_schema(spec.value, defaults=JSON_STYLE)
            elif spec.kind == "json_object":
                grammar = M.grammar_from_json_schema({"type": "object"}, defaults=JSON_STYLE)
            elif spec.kind == "lark":
                grammar = M.grammar_from_lark(spec.value)
            else:
                raise GrammarError(f"unknown grammar kind {spec.kind!r}")
        except GrammarError:
            raise
        except Exception as e:  # llguidance's schema front end raises on what it cannot read
            raise GrammarError(str(e)) from None
        m = M(lltok, grammar, log_level=0)
        if m.is_error():
            raise GrammarError(_clean(m.get_error()))
        return m


def _clean(msg: str) -> str:
    msg = msg.strip()
    return msg if len(msg) <= 400 else msg[:400] + "..."


# ---- on the engine thread -----------------------------------------------------------------------
def masks(matchers: list, vocab: int) -> torch.Tensor | None:
    """Allowed tokens ``[S, vocab]`` (bool) of the rows with a matcher (the others all True), or
    None when no row is constrained."""
    rows = [s for s, m in enumerate(matchers) if m is not None and not m.is_stopped()]
    if not rows:
        return None
    words = (vocab + 31) // 32
    bits = np.full((len(matchers), words), -1, dtype=np.int32)
    for s in rows:
        v = bits[s]
        matchers[s].unsafe_compute_mask_ptr(v.ctypes.data, v.nbytes)
    allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    return torch.from_numpy(allowed.view(np.bool_))


def apply(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """``scores`` with the disallowed tokens at -inf (a new tensor; ``scores`` itself is kept)."""
    if allowed is None:
        return scores
    V = scores.shape[1]
    if allowed.shape[1] < V:  # the model's output width beyond the tokenizer's vocabulary
        allowed = torch.cat([allowed, allowed.new_zeros(allowed.shape[0], V - allowed.shape[1])], 1)
    return torch.where(allowed[:, :V].to(scores.device), scores, float("-inf"))


def advance(matcher, token: int) -> bool:
    """Feed the chosen token to the matcher; True when the grammar is complete (the sequence stops)."""
    if not matcher.is_stopped():
        matcher.consume_token(token)
    return matcher.is_stopped()
