"""Output cleaning that gives the same text streamed or not.

Raw generated text goes through, in order: truncation at the first stop
string (the stop string itself is dropped, as OpenAI does), clembench's
``output_split_prefix`` (keep what follows its last occurrence, only when it
occurs) and ``eos_to_cull`` (every match removed, as clembench's
``re.sub``). ``OutputCleaner`` applies this incrementally: it emits only text
that no later token can change, holding back a possible stop-string prefix or
a possible ``eos_to_cull`` match at the end. So the concatenated deltas always
equal ``clean_output(raw)`` for the whole raw text.
"""

from __future__ import annotations

from collections.abc import Sequence

import regex  # the "regex" module: partial matching, which the standard "re" lacks


def clean_output(
    raw: str, *, stop: Sequence[str] = (), eos_to_cull: str | None = None, output_split_prefix: str | None = None
) -> str:
    """The cleaned text of a complete raw output."""
    cleaner = OutputCleaner(stop=stop, eos_to_cull=eos_to_cull, output_split_prefix=output_split_prefix)
    return cleaner.feed(raw) + cleaner.finish()


class OutputCleaner:
    def __init__(
        self, *, stop: Sequence[str] = (), eos_to_cull: str | None = None, output_split_prefix: str | None = None
    ) -> None:
        self._stop = tuple(s for s in stop if s)
        # re-compatible syntax; "regex" with VERSION0 behaves as "re" does.
        self._cull = regex.compile(eos_to_cull, flags=regex.VERSION0) if eos_to_cull else None
        self._split_prefix = output_split_prefix or None
        self._raw = ""
        self._emitted = 0  # characters of cleaned text already handed out
        self._safe = 0  # raw characters that no later text can change the cleaning of
        self.stopped = False  # a stop string was found: generation should end

    @property
    def raw(self) -> str:
        """Raw text so far, cut at a stop string once one was seen."""
        return self._raw

    def feed(self, piece: str) -> str:
        """Add raw text; return the cleaned text that is now final."""
        if self.stopped or not piece:
            return ""
        scan_from = max(0, len(self._raw) - max((len(s) for s in self._stop), default=0))
        self._raw += piece
        cut = self._first_stop(scan_from)
        if cut is not None:
            self._raw = self._raw[:cut]
            self.stopped = True
            return self.finish()
        if self._split_prefix is not None:
            # rsplit needs the whole output: a later occurrence would move the cut.
            return ""
        self._safe = max(self._safe, min(self._stop_holdback(), self._cull_holdback()))
        return self._emit(self._raw[: self._safe])

    def finish(self) -> str:
        """The rest of the cleaned text, once generation has ended."""
        text = self._raw
        if self._split_prefix is not None and self._split_prefix in text:
            text = text.rsplit(self._split_prefix, 1)[1]
        return self._emit(text)

    def _emit(self, raw_part: str) -> str:
        cleaned = self._cull.sub("", raw_part) if self._cull else raw_part
        delta = cleaned[self._emitted :]
        self._emitted = max(self._emitted, len(cleaned))
        return delta

    def _first_stop(self, scan_from: int) -> int | None:
        hits = [i for i in (self._raw.find(s, scan_from) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_holdback(self) -> int:
        """Raw length minus the longest tail that could still grow into a stop string."""
        end = len(self._raw)
        for stop in self._stop:
            for size in range(min(len(stop) - 1, end), 0, -1):
                if self._raw.endswith(stop[:size]):
                    end = min(end, len(self._raw) - size)
                    break
        return end

    def _cull_holdback(self) -> int:
        """Where the earliest eos_to_cull match that more text could change begins."""
        if self._cull is None:
            return len(self._raw)
        for match in self._cull.finditer(self._raw, partial=True):
            # A partial match, or a complete one touching the end (greedy or "$"), may still change.
            if match.partial or match.end() == len(self._raw):
                if match.start() == match.end() == len(self._raw):
                    break  # an empty match at the very end holds nothing back
                return int(match.start())
        return len(self._raw)
