"""The one fake of the suite: a model without weights, for the manager's own rules (order, bounds, eviction),
named as a fake wherever it is used. Everything else the tests run is real."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from typing import Any

from backends import GenerationOutcome, GenerationParams, Model, PreparedPrompt


class FakeModels:
    """A model factory for ``ModelManager`` that makes ``FakeModel``s, for tests of the manager's own rules
    (order, bounds, eviction) without weights. It keeps what it made and what they did, for the test to read.

    Generations wait at every token for ``gate``, which starts open: clear it to keep requests running.
    """

    def __init__(self, load_seconds: float = 0.0, failing: frozenset[str] = frozenset()) -> None:
        self.load_seconds = load_seconds
        self.failing = failing  # model names whose loads fail
        self.gate = threading.Event()
        self.gate.set()
        self.made: list[FakeModel] = []
        self.started: list[str] = []  # the prompt of each generation, in the order they began

    def __call__(self, spec: Any, options: Any) -> Model:
        model = FakeModel(spec, options, self)
        self.made.append(model)
        return model


class FakeModel(Model):
    """A fake model: no weights, its tokens are the prompt's bytes, and it generates ``x`` per token."""

    backend_name = "fake"
    mandatory_keys = ()

    def __init__(self, spec: Any, options: Any, fakes: FakeModels) -> None:
        super().__init__(spec, options)
        self.fakes = fakes
        self.loaded = False

    @property
    def is_loaded(self) -> bool:
        return self.loaded

    def load(self) -> None:
        time.sleep(self.fakes.load_seconds)
        if self.name in self.fakes.failing:
            from backends import ModelLoadError

            raise ModelLoadError(f"the fake model {self.name} fails to load, as the test asked")
        template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        self.set_templates({"default": template}, bos_token="", eos_token="")
        self.context_size = 4096
        self.loaded = True

    def unload(self) -> None:
        self.loaded = False

    def load_info(self) -> dict[str, Any]:
        return {"model_bytes": 1000, "device": "cpu"}

    def tokenize_prompt(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def generate_tokens(
        self, prompt: PreparedPrompt, params: GenerationParams, cancel: threading.Event, outcome: GenerationOutcome
    ) -> Generator[str, None, None]:
        self.fakes.started.append(prompt.text)
        for _ in range(prompt.max_tokens):
            while not self.fakes.gate.wait(0.01):
                if cancel.is_set():
                    return
            if cancel.is_set():
                return
            outcome.completion_tokens += 1
            yield "x"
