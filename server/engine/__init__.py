"""The engine, split the way vLLM v1 splits its own: ``scheduler`` (queue, admission by KV memory,
preemption, the step plan and its prefill budget), ``runner`` (prefill chunks and decode steps on the
model), ``sampler`` (every sequence of a step in one pass), ``detokenizer`` (incremental text and stop
strings), ``kv_pool``/``kv_cache`` (slots of a few capacities in one budget, and the views the model
writes through), ``catalogs`` (catalog swaps), ``heap`` (what the garbage collector need not walk
again), ``core`` (the input queue and the loop)."""

from .core import Engine
from .kv_cache import DecodeView, PrefillView, SlotCache
from .kv_pool import KVPool
from .types import Draining, Event, Limits, QueueFull, Request, Row, SamplingParams, Sequence

__all__ = ["Engine", "DecodeView", "PrefillView", "SlotCache", "KVPool", "Draining", "Event", "Limits",
           "QueueFull", "Request", "Row", "SamplingParams", "Sequence"]
