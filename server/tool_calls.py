"""Tool calls: the tools rendered into the prompt, the reply constrained (``required``, a named
function) or parsed (``auto``) into OpenAI ``tool_calls``.

Two formats, chosen by the model's chat template (as vLLM's ``--tool-call-parser``):
- ``hermes``: templates that render tools themselves and expect ``<tool_call>{"name": ..,
  "arguments": ..}</tool_call>`` blocks (Qwen2.5, Hermes and their fine-tunes). The template gets
  ``tools=``; ``required`` / a named function constrain the reply to such blocks whose JSON follows
  the functions' schemas; ``auto`` leaves it free and parses the blocks out.
- ``generic``: a template without tool support (the demo's SmolLM2). As llama.cpp's server does, the
  tools are described in the system turn and the reply is constrained to a JSON object:
  ``{"tool_call": {"name", "arguments"}}`` (``{"tool_calls": [...]}`` with ``parallel_tool_calls``)
  or, under ``auto``, ``{"response": "..."}`` for a plain answer.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from .engine.grammar import JSON_STYLE, GrammarSpec
from .protocol_tools import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from .structured import LIMITS, LimitError, check_schema

HERMES, GENERIC = "hermes", "generic"
OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)


def family(tok) -> str:
    """The tool-call format the model's chat template speaks."""
    return HERMES if OPEN in (getattr(tok, "chat_template", None) or "") else GENERIC


def call_schema(fn) -> tuple[dict, dict]:
    """A call of ``fn`` as a JSON schema, and the definitions its parameters refer to. The call is
    nested in a larger schema, so the parameters' local ``$defs`` (pydantic writes them for enums and
    nested models) move to that schema's root, renamed per function, and their ``$ref``s with them."""
    params = dict(fn.parameters or {"type": "object"})
    defs = {**params.pop("definitions", {}), **params.pop("$defs", {})}
    rename = {f"#/{k}/{d}": f"#/$defs/{fn.name}__{d}" for k in ("$defs", "definitions") for d in defs}
    params = _reref(params, rename)
    call = {"type": "object", "properties": {"name": {"const": fn.name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}
    return call, {f"{fn.name}__{d}": _reref(v, rename) for d, v in defs.items()}


def _reref(node, rename: dict):
    if isinstance(node, dict):
        return {k: (rename.get(v, v) if k == "$ref" and isinstance(v, str) else _reref(v, rename))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_reref(v, rename) for v in node]
    return node


@dataclass
class ToolPlan:
    """How one request's tools shape its prompt, grammar and reply."""

    family: str
    choice: str  # "auto", "required" or the one function's name
    parallel: bool
    tools: list  # protocol_tools.Tool, the ones callable under ``choice``
    all_tools: list
    spec: GrammarSpec | None = None

    @property
    def holds_text(self) -> bool:
        """Whether a stream must hold the text back until the end (it is JSON to be parsed)."""
        return self.family == GENERIC or self.choice != "auto"

    def grammar(self) -> GrammarSpec | None:
        pairs = [call_schema(t.function) for t in self.tools]
        calls, defs = [c for c, _ in pairs], {k: v for _, d in pairs for k, v in d.items()}
        one = {"anyOf": calls} if len(calls) > 1 else calls[0]
        root = {"$defs": defs} if defs else {}
        if self.family == HERMES:
            if self.choice == "auto":
                return None
            obj = json.dumps({**one, **root, "x-guidance": JSON_STYLE})
            rep = ' ("\\n" call)*' if self.parallel else ""
            return GrammarSpec("lark", f'start: call{rep}\ncall: "{OPEN}\\n" args "\\n{CLOSE}"\nargs: %json {obj}\n')
        if self.parallel:
            body = {"tool_calls": {"type": "array", "items": one, "minItems": 1}}
        else:
            body = {"tool_call": one}
        schema = {"type": "object", "properties": body, "required": list(body), "additionalProperties": False}
        if self.choice == "auto":
            answer = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
                      "additionalProperties": False}
            schema = {"anyOf": [schema, answer]}
        return GrammarSpec("json_schema", {**schema, **root})

    def system_text(self) -> str:
        """The generic format's description of the tools and the reply (a system turn)."""
        fns = [t.function.model_dump(exclude_none=True) for t in self.tools]
        call = '{"name": "<tool name>", "arguments": {<its parameters>}}'
        how = (f'To call tools, reply {{"tool_calls": [{call}, ...]}}' if self.parallel
               else f'To call a tool, reply {{"tool_call": {call}}}')
        if self.choice == "auto":
            how += '; to answer directly, reply {"response": "<your answer>"}'
        return "You can call these tools:\n" + json.dumps(fns) + f"\n\nReply with one JSON object. {how}."

    # ---- the reply ------------------------------------------------------------------------------
    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """``text`` as (content, tool calls), at most one call without ``parallel_tool_calls`` (hermes
        under ``auto`` is not constrained: its later blocks are dropped); unparseable text stays content."""
        content, calls = self._parse(text)
        return content, calls if self.parallel else calls[:1]

    def _parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.family == HERMES:
            found = BLOCK.findall(text)
            calls = [c for c in (_call(b) for b in found) if c is not None]
            if not calls:
                return text, []
            head = text[:text.find(OPEN)].strip()
            return head or None, calls
        try:
            obj = json.loads(text)
        except ValueError:  # cut by max_tokens: the calls completed before the cut still count
            obj = {"tool_calls": _complete_items(text)}
            if not obj["tool_calls"]:
                return text, []
        if isinstance(obj, dict) and isinstance(obj.get("response"), str) and len(obj) == 1:
            return obj["response"], []
        items = obj.get("tool_calls") if isinstance(obj, dict) else None
        if items is None and isinstance(obj, dict) and "tool_call" in obj:
            items = [obj["tool_call"]]
        calls = [c for c in (_call(json.dumps(i)) for i in items or []) if c is not None]
        return (None, calls) if calls else (text, [])


def _complete_items(text: str) -> list:
    """The whole objects of an unfinished ``{"tool_calls": [{...}, {...}, {"na``."""
    head = '{"tool_calls": ['
    if not text.startswith(head):
        return []
    dec, pos, items = json.JSONDecoder(), len(head), []
    while True:
        try:
            item, pos = dec.raw_decode(text, pos)
        except ValueError:
            return items
        items.append(item)
        while pos < len(text) and text[pos] in ", ":
            pos += 1


def _call(block: str) -> ToolCall | None:
    try:
        obj = json.loads(block)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(id="call_" + uuid.uuid4().hex[:24],
                    function=FunctionCall(name=obj["name"], arguments=args if isinstance(args, str) else json.dumps(args)))


def plan(body, tok) -> ToolPlan | None:
    """The request's tool plan, or None when no tool can be called (no tools, or ``tool_choice`` none)."""
    tools = body.tools or []
    choice = body.tool_choice or ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise LimitError("tool_choice needs tools", "tool_choice")
    if len(tools) > LIMITS.max_tools:
        raise LimitError(f"{len(tools)} tools; the limit is {LIMITS.max_tools}", "tools")
    size = sum(len(t.model_dump_json()) for t in tools)
    if size > LIMITS.max_tools_bytes:
        raise LimitError(f"the tools are {size} bytes of JSON; the limit is {LIMITS.max_tools_bytes}", "tools")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise LimitError("two tools have the same name", "tools")
    for t in tools:
        if t.function.parameters is not None:
            check_schema(t.function.parameters, "tools")
    if choice == "none":
        return None
    callable_ = tools
    if not isinstance(choice, str):
        if choice.function.name not in names:
            raise LimitError(f"tool_choice names '{choice.function.name}', which is not in tools", "tool_choice")
        callable_ = [t for t in tools if t.function.name == choice.function.name]
        choice = choice.function.name
    p = ToolPlan(family(tok), choice, body.parallel_tool_calls is not False, callable_, tools)
    p.spec = p.grammar()
    return p


def template_messages(messages, p: ToolPlan | None, fam: str) -> list[dict]:
    """The chat as the template takes it: tool calls' arguments as objects (hermes) or the call JSON
    as the assistant's text (generic), tool results as ``tool`` turns (hermes) or user turns."""
    out = []
    for m in messages:
        d = {"role": m.role, "content": m.text()}
        if m.role == "assistant" and m.tool_calls:
            if fam == HERMES:
                d["tool_calls"] = [{"type": "function", "function": {"name": c.function.name,
                                                                     "arguments": _loads(c.function.arguments)}}
                                   for c in m.tool_calls]
            else:
                calls = [{"name": c.function.name, "arguments": _loads(c.function.arguments)} for c in m.tool_calls]
                d["content"] = json.dumps({"tool_calls": calls})
        elif m.role == "tool" and fam == GENERIC:
            d = {"role": "user", "content": json.dumps({"tool_response": {"tool_call_id": m.tool_call_id,
                                                                           "content": m.text()}})}
        out.append(d)
    if p is not None and fam == GENERIC:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + p.system_text()}
        else:
            out.insert(0, {"role": "system", "content": p.system_text()})
    return out


def _loads(args: str):
    try:
        return json.loads(args)
    except ValueError:
        return args


@dataclass
class ToolStream:
    """One streamed choice under a tool plan: the text it may send now, and the calls at the end."""

    plan: ToolPlan
    text: str = ""
    sent: int = 0  # characters of ``text`` sent as content
    calls: list = field(default_factory=list)

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.plan.holds_text:
            return ""
        at = self.text.find(OPEN, self.sent)
        end = at if at != -1 else _safe_end(self.text, self.sent)
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        """The content still to send and the calls as stream deltas (one each, whole)."""
        content, calls = self.plan.parse(self.text)
        if not calls:
            rest = self.text[self.sent:] if not self.plan.holds_text else (content or "")
            return rest, []
        self.calls = calls
        if self.plan.holds_text:
            rest = content or ""
        else:  # hermes under auto: the text before the first block, less what was sent
            at = self.text.find(OPEN)
            rest = self.text[self.sent:at] if at >= self.sent else ""
        return rest, [DeltaToolCall(index=i, id=c.id, type="function",
                                    function=DeltaFunctionCall(name=c.function.name, arguments=c.function.arguments))
                      for i, c in enumerate(calls)]


def _safe_end(text: str, start: int) -> int:
    """Where content can be sent up to: short of a suffix that may be the start of ``<tool_call>``."""
    for k in range(min(len(OPEN) - 1, len(text) - start), 0, -1):
        if OPEN.startswith(text[-k:]):
            return len(text) - k
    return len(text)
