"""The in-context prompt: an instruction, k solved examples, then the query.

An example is rendered exactly as a query followed by its verbalizer and the separator,
so the model sees the query in the same form as the solved examples before it, and the
text a label is scored on ("Label:" + " fresh") is the text the examples showed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from core.errors import UnlearnError


@dataclass(frozen=True)
class PromptTemplate:
    instruction: str = "Classify each text. Possible labels: {labels}.\n\n"  # {labels}: verbalizers, comma-separated
    query: str = "Text: {text}\nLabel:"  # must contain {text} once
    separator: str = "\n\n"  # after each solved example

    def __post_init__(self) -> None:
        if self.query.count("{text}") != 1:
            raise UnlearnError("prompt template field 'query' must contain {text} exactly once")
        for name, value in (("instruction", self.instruction), ("query", self.query)):
            try:
                value.format(text="", labels="")
            except (KeyError, IndexError, ValueError) as exc:
                raise UnlearnError(f"prompt template field {name!r}: bad placeholder ({exc}); "
                                   "use {text} / {labels}, double other braces") from None

    def render_instruction(self, verbalizers: Sequence[str]) -> str:
        return self.instruction.format(labels=", ".join(v.strip() for v in verbalizers))

    def render_query(self, text: str) -> str:
        return self.query.format(text=text)

    def render_example(self, text: str, verbalizer: str) -> str:
        return self.render_query(text) + verbalizer + self.separator
