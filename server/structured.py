"""Structured outputs on the web side: a request's ``response_format`` (or tool plan) as a grammar
spec, its bounds checked before anything compiles, compiled off the engine thread.

Bounds (docs/server.md, "Structured outputs and tools"): a schema's JSON text, its nesting depth,
an ``enum``'s length, the number of tools. Each is a 400 that names the limit; a feature the grammar
engine does not implement is a 400 that names it (llguidance's message)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .engine.grammar import Grammar, GrammarError, Grammars, GrammarSpec
from .protocol_tools import ResponseFormat


@dataclass(frozen=True)
class SchemaLimits:
    max_schema_bytes: int = 64 * 1024  # one schema's JSON text
    max_depth: int = 24  # nesting of objects and arrays inside a schema
    max_enum: int = 1024  # values of one enum
    max_nodes: int = 4096  # sub-schemas (objects in the schema's JSON) in one schema
    max_tools: int = 64  # functions in ``tools``
    max_tools_bytes: int = 256 * 1024  # all the tools' JSON together


LIMITS = SchemaLimits()


class LimitError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def check_schema(schema, param: str, limits: SchemaLimits = LIMITS) -> None:
    """Size, depth, enum length and node count of ``schema``; a ``LimitError`` naming the bound."""
    if not isinstance(schema, dict):
        raise LimitError("a JSON schema must be a JSON object", param)
    size = len(json.dumps(schema, separators=(",", ":")))
    if size > limits.max_schema_bytes:
        raise LimitError(f"the schema is {size} bytes of JSON; the limit is {limits.max_schema_bytes}", param)
    nodes = 0
    stack = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limits.max_depth:
            raise LimitError(f"the schema nests deeper than {limits.max_depth} levels", param)
        if isinstance(node, dict):
            nodes += 1
            if nodes > limits.max_nodes:
                raise LimitError(f"the schema has more than {limits.max_nodes} sub-schemas", param)
            enum = node.get("enum")
            if isinstance(enum, list) and len(enum) > limits.max_enum:
                raise LimitError(f"an enum has {len(enum)} values; the limit is {limits.max_enum}", param)
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list)))
        else:
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))


def response_spec(fmt: ResponseFormat | None) -> GrammarSpec | None:
    """The grammar ``response_format`` asks for (None for text)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec("json_object")
    schema = fmt.json_schema.schema_
    if schema is None:  # OpenAI allows a json_schema format without a schema: any JSON object
        return GrammarSpec("json_object")
    check_schema(schema, "response_format")
    return GrammarSpec("json_schema", schema)


def _lower_priority() -> None:
    """The compiling thread yields the CPU to the engine's threads (Linux: a thread's own nice)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: compile at normal priority
        pass


# one thread, niced: a large schema's compile never takes a core from decoding streams
COMPILER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="constellation-grammar",
                              initializer=_lower_priority)


async def compile_spec(grammars: Grammars, spec: GrammarSpec | None, param: str) -> Grammar | None:
    """Compile on the grammar thread (llguidance releases the GIL; the thread runs niced), so the
    engine and other requests go on; an uncompilable grammar is a ``LimitError`` naming ``param``."""
    if spec is None:
        return None
    try:
        return await asyncio.get_running_loop().run_in_executor(COMPILER, grammars.compile, spec)
    except GrammarError as e:
        raise LimitError(f"{param}: the grammar engine cannot use this schema: {e}", param) from None
