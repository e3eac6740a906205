"""``POST /explain``, ``GET /index`` and ``GET /v1/models``: what the server composes, and from what
(the model ids: ``server.model_names``)."""

from __future__ import annotations

import asyncio

import torch

from composer.modes import CompositionError
from index_store.store import diagnostics_doc, recommendation_note, residual_note
from .protocol import ExplainRequest, ModelCard, ModelList, now
from .model_names import ServedName
from .serving import APIError, OpenAIServing, draining_error


class ServingExplain(OpenAIServing):
    """The composition a prompt gets, without generating: the same functions generation runs."""

    def __init__(self, engine, tok, limits, model_name: str, catalog):
        super().__init__(engine, tok, limits, model_name)
        self.catalog = catalog  # server.live_catalog.LiveCatalog: the current manifest and version
        self.created = now()

    def card(self, name: ServedName) -> ModelCard:
        return ModelCard(id=name.id, object="model", created=self.created, owned_by="constellation",
                         parent=name.parent, max_model_len=self.max_positions, catalog_version=self.catalog.version,
                         mode=name.mode, specialist=name.specialist)

    def models(self) -> ModelList:
        """``GET /v1/models``: the constellation, each mode, each specialist of the catalog served now."""
        return ModelList(object="list", data=[self.card(n) for n in self.names().values()])

    def model(self, model_id: str) -> ModelCard:
        """``GET /v1/models/{id}`` (404 for a name this server does not answer to)."""
        return self.card(self.check_model(model_id))

    def index(self) -> dict:
        """The index diagnostics (as ``constellation index inspect --json``) and the catalog, for the
        playground's second tab."""
        doc = diagnostics_doc(self.catalog.manifest)
        doc["catalog_version"] = self.catalog.version
        doc["specialists"] = self.catalog.listing()
        doc["default_mode"] = self.c.settings.default_mode  # the mode a request without composition.mode gets
        doc["recommendation_note"] = recommendation_note(doc, doc["default_mode"])
        doc["residual_note"] = residual_note(doc["basis"])
        return doc

    def explain_prompt(self, body: ExplainRequest) -> tuple[list[int], list[int] | None]:
        """Token ids of the prompt or the templated messages, and the chat's fingerprint mask."""
        return (self.text_prompt(body.prompt), None) if body.prompt is not None else self.chat_prompt(body.messages)

    async def explain(self, body: ExplainRequest) -> dict:
        """The composition document for one prompt (the index diagnostics are ``GET /index``'s, not repeated).

        Every refusal the caller can fix is a 400 naming the parameter: a bad composition (checked
        before any work, and again as a ``CompositionError`` from planning, should one get past the
        checks), or a prompt that is empty or longer than the server or the model's positions allow.
        """
        name = self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of 'prompt' or 'messages'", param="prompt")
        comp = self.check_composition(body.composition, name)
        ids, fmask = self.explain_prompt(body)
        param = "prompt" if body.prompt is not None else "messages"
        limit, hint = self.prompt_limit()
        if not ids or len(ids) > limit:
            raise APIError(400, f"the prompt has {len(ids)} tokens; /explain accepts 1..{limit} ({hint})",
                           param=param, code="context_length_exceeded" if ids else None)
        if self.engine.draining:
            raise draining_error()
        engine = self.engine

        def work():
            c = engine.c  # the catalog current when the work runs
            t = torch.tensor([ids], dtype=torch.long, device=c.g.device)
            fm = None if fmask is None else torch.tensor([fmask], device=c.g.device)
            gp = c.generalist_pass(t, torch.ones_like(t), fingerprint_mask=fm)
            plan = engine.plan_for(c, gp, comp)
            doc = c.explain(gp, plan, node_weights=body.include_node_weights)
            doc["catalog_version"] = self.catalog.version
            return doc

        try:
            return await asyncio.get_running_loop().run_in_executor(None, engine.call, work)
        except CompositionError as e:
            raise APIError(400, str(e), param=e.param or "composition") from None
