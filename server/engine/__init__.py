"""The engine, split the way vLLM splits its own: ``scheduler`` (queue, admission, prefill budget),
``runner`` (prefill chunks and decode steps on the model), ``sampler``, ``detokenizer``
(incremental text and stop strings), ``kv_cache`` (slots and views), ``core`` (the loop)."""

from .core import Engine
from .kv_cache import DecodeView, PrefillView, SlotCache
from .types import Draining, Event, Limits, QueueFull, Request, Row, SamplingParams, Sequence

__all__ = ["Engine", "DecodeView", "PrefillView", "SlotCache", "Draining", "Event", "Limits", "QueueFull",
           "Request", "Row", "SamplingParams", "Sequence"]
