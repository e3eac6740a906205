"""Incremental detokenization and stop strings: text per step costs O(new tokens).

The window trick vLLM and TGI use: decode only the tokens from ``prefix`` on, twice — without and
with the newest tokens — and emit the difference once it no longer ends in an incomplete UTF-8
character. The window then slides forward, so no step decodes the whole sequence.

Stop strings are searched only in the text that could newly contain one, and a tail that could be
the start of a stop string is held back until it is decided.
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tok = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens whose text is in ``text``
        self.text = ""  # decoded so far (before stop-string cut)
        self.emitted = 0  # characters of ``text`` already returned
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, token: int | None, final: bool = False) -> str:
        """Append ``token`` (None: nothing new) and return the text that may be sent now.

        ``final``: the sequence ends here, so pending bytes and held-back text are released.
        After a stop string is found, ``stopped`` is set and the text before it is all that is sent.
        """
        if self.stopped:
            return ""
        if token is not None:
            self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final)

    def _release(self, final: bool) -> str:
        upto = len(self.text)
        if self.stop:
            longest = max(len(s) for s in self.stop)
            start = max(0, self.emitted - longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i != -1]
            if hits:
                upto = min(hits)
                self.stopped = True
            elif not final:
                upto -= self._held()
        upto = max(upto, self.emitted)
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out

    def _held(self) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return hold
