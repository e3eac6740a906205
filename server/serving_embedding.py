"""``POST /v1/embeddings``: each input's fingerprint, the vector the index projects a prompt from;
and vLLM's ``POST /tokenize`` and ``POST /detokenize``.

An embedding is the generalist's final-norm hidden state averaged over the input's tokens (the
prompt's fingerprint, as every request's planning computes it), L2-normalised: ``d`` floats (the
generalist's hidden size), unit length, and its dot product with each basis vector of the index is
that domain's alpha (what ``/explain`` reports for the same prompt). It does not depend on the mode
or the specialist a model name picks. The work runs on the engine thread, a batch of inputs at a
time (at most ``--prefill-chunk`` padded tokens each), so decoding streams go on in between.
"""

from __future__ import annotations

import asyncio
import base64
import sys
from array import array

from .engine.embedding import fingerprints
from .protocol_embedding import (DetokenizeRequest, DetokenizeResponse, Embedding, EmbeddingRequest,
                                 EmbeddingResponse, EmbeddingUsage, TokenizeRequest, TokenizeResponse)
from .serving import APIError, OpenAIServing, draining_error

MAX_INPUTS = 2048  # inputs per embeddings request (OpenAI's own bound); docs/server.md


def encode(vector: bytes, fmt: str) -> list[float] | str:
    """Little-endian float32 bytes as OpenAI's ``encoding_format`` asks: a list of floats, or base64."""
    if fmt == "base64":
        return base64.b64encode(vector).decode("ascii")
    values = array("f", vector)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


class ServingEmbedding(OpenAIServing):
    async def create_embedding(self, body: EmbeddingRequest) -> EmbeddingResponse:
        self.check_model(body.model)
        inputs = body.input
        if len(inputs) > MAX_INPUTS:
            raise APIError(400, f"input has {len(inputs)} items; this server embeds at most {MAX_INPUTS} per "
                           "request", param="input")
        d = self.c.d
        if body.dimensions is not None and body.dimensions != d:
            raise APIError(400, f"dimensions={body.dimensions}: this server's embeddings are the {d}-dimensional "
                           f"prompt fingerprint, which cannot be shortened; omit dimensions or send {d}",
                           param="dimensions")
        prompts = [self.input_ids(x, i if len(inputs) > 1 else None) for i, x in enumerate(inputs)]
        if self.engine.draining:
            raise draining_error()
        vectors = await self.embed(prompts)
        n = sum(len(p) for p in prompts)
        return EmbeddingResponse(object="list", model=self.shown_model,
                                 data=[Embedding(object="embedding", embedding=encode(v, body.encoding_format), index=i)
                                       for i, v in enumerate(vectors)],
                                 usage=EmbeddingUsage(prompt_tokens=n, total_tokens=n))

    def input_ids(self, item: str | list[int], index: int | None) -> list[int]:
        """One input's token ids (a string as ``/v1/completions`` tokenizes a prompt), checked."""
        where = "input" if index is None else f"input[{index}]"
        vocab = self.c.g.mc.vocab_size
        if isinstance(item, str):
            ids = self.tok(item, add_special_tokens=True)["input_ids"]
        elif any(not 0 <= t < vocab for t in item):
            raise APIError(400, f"{where}: token ids must be in [0, {vocab})", param="input")
        else:
            ids = item
        limit = min(self.limits.max_prompt_tokens, self.max_positions)
        if not ids or len(ids) > limit:
            raise APIError(400, f"{where} has {len(ids)} tokens; an input must have 1..{limit}", param="input",
                           code="context_length_exceeded" if ids else None)
        return ids

    async def embed(self, prompts: list[list[int]]) -> list[bytes]:
        """The fingerprints, computed on the engine thread in batches of similar length."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        budget = self.limits.prefill_chunk_max
        batches: list[list[int]] = [[]]
        for i in order:  # ascending length: the newest is the longest, the padded width
            if batches[-1] and (len(batches[-1]) + 1) * len(prompts[i]) > budget:
                batches.append([])
            batches[-1].append(i)
        out: list[bytes] = [b""] * len(prompts)
        loop, engine = asyncio.get_running_loop(), self.engine
        for batch in batches:
            rows = await loop.run_in_executor(
                None, engine.call, lambda b=batch: fingerprints(engine.c, [prompts[i] for i in b]))
            for i, row in zip(batch, rows):
                out[i] = row
        return out

    # ---- vLLM's tokenizer routes ---------------------------------------------------------------
    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of 'prompt' or 'messages'", param="prompt")
        if body.messages is not None:
            if body.add_special_tokens:
                raise APIError(400, "add_special_tokens applies to 'prompt'; 'messages' are tokenized as "
                               "/v1/chat/completions templates them", param="add_special_tokens")
            ids, _ = self.chat_prompt(body.messages)
        else:
            ids = self.tok(body.prompt, add_special_tokens=body.add_special_tokens is not False)["input_ids"]
        strs = self.tok.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.max_positions, tokens=ids, token_strs=strs)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(body.model)
        vocab = self.c.g.mc.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
        return DetokenizeResponse(prompt=self.tok.decode(body.tokens))
