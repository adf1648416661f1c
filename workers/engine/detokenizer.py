"""Incremental detokenisation and stop sequences: the text a stream emits, token by token.

`tokenizers`' DecodeStream holds back bytes until they form whole UTF-8 characters. `StopFilter` then
holds back any tail that could still become a stop sequence, and cuts the text where one completes.
Emitted deltas therefore concatenate to the final text, which never contains a stop sequence.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    """Token ids in, complete-character text deltas out."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Text completed by this token ('' while a character is still partial)."""
        return self.stream.step(self.tokenizer, token) or ""


class StopFilter:
    """Withholds text that may be the start of a stop sequence; detects a completed one."""

    def __init__(self, stop: tuple[str, ...] = ()):
        self.stop = stop
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, delta: str) -> str:
        """Add generated text; return what can be emitted now. Sets `stopped` when a stop sequence appears."""
        self.text += delta
        if not self.stop:
            return self._emit_until(len(self.text))
        longest = max(len(s) for s in self.stop)
        search_from = max(0, self.emitted - longest + 1)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            return self._emit_until(len(self.text))
        return self._emit_until(len(self.text) - self._possible_stop_prefix())

    def flush(self) -> str:
        """At the end of generation: everything still held back (it cannot become a stop now)."""
        return self._emit_until(len(self.text))

    def _possible_stop_prefix(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop sequence."""
        best = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:size]):
                    best = size
                    break
        return best

    def _emit_until(self, end: int) -> str:
        end = max(end, self.emitted)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
