"""Serving every server's promoted LoRA adapter from one base text model in this process.

Which adapter each server serves is `generators.lora.GuildAdapters`.

- ``AdapterSet``: the adapters loaded into one base model. The first adapter wraps the
  model in a peft ``PeftModel``; others are added as named adapters (``load_adapter``) and
  picked per batch with ``set_adapter``; requests without one run with the adapters
  disabled. Least recently used adapters are unloaded beyond ``max_loaded``. An adapter's
  name is derived from its folder, and a version folder is written once and never
  changed, so a folder always means the same weights.
- ``AdapterTextGenerator``: ``TextGenerator`` plus the ``adapter`` request parameter. Only
  requests for the same adapter share a batch (``batch_key``). It is the exact change the
  text generator needs; it can be used as is in the registry's text factory, or folded
  into ``generators/text.py``.

A job keeps the adapter it was submitted with: rolling back while it waits does not change
it (the old folder still exists; version folders are never deleted while promoted).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any

from generators.base import Feed, GeneratorError, Request, Result
from generators.lora import adapter_name, check_adapter
from generators.text import TextGenerator
from generators.text_batch import Row, StreamDecoder


class AdapterSet:
    """The LoRA adapters loaded into one base model; used on the text lane's thread."""

    def __init__(self, max_loaded: int = 8) -> None:
        self.max_loaded = max(1, max_loaded)
        self._lock = threading.Lock()
        self._base: Any = None
        self._peft: Any = None
        self._loaded: OrderedDict[str, str] = OrderedDict()  # name → folder, least recently used first

    @property
    def loaded(self) -> list[str]:
        """Folders of the loaded adapters, least recently used first."""
        return list(self._loaded.values())

    def reset(self) -> None:
        """Forget everything (the base model was unloaded)."""
        with self._lock:
            self._base, self._peft = None, None
            self._loaded.clear()

    @contextmanager
    def activate(self, model: Any, adapter: str | None) -> Iterator[Any]:
        """Yield the model to run: ``model`` with ``adapter`` applied, or with none (base)."""
        with self._lock:
            if self._base is not model:  # a fresh base model: nothing of it is wrapped yet
                self._base, self._peft = model, None
                self._loaded.clear()
            if adapter is None:
                if self._peft is None:
                    yield model
                else:
                    with self._peft.disable_adapter():
                        yield self._peft
                return
            name = self._ensure(model, adapter)
            self._peft.set_adapter(name)
            yield self._peft

    def _ensure(self, model: Any, adapter: str) -> str:
        from peft import PeftModel

        name = adapter_name(adapter)
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return name
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(model, adapter, adapter_name=name, is_trainable=False)
            else:
                self._peft.load_adapter(adapter, adapter_name=name, is_trainable=False)
        except (OSError, ValueError) as exc:
            raise GeneratorError(f"cannot load the adapter at {adapter}: {exc}") from None
        self._peft.eval()
        self._loaded[name] = adapter
        while len(self._loaded) > self.max_loaded:
            old, _ = self._loaded.popitem(last=False)
            self._peft.set_adapter(name)  # never delete the active adapter
            self._peft.delete_adapter(old)
        return name


class AdapterTextGenerator(TextGenerator):
    """A text generator whose requests may name a LoRA adapter folder (``params["adapter"]``)."""

    def __init__(self, *args: Any, max_adapters: int = 8, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.adapters = AdapterSet(max_adapters)

    def check(self, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
        adapter = params.get("adapter")
        checked = super().check(prompt, {k: v for k, v in params.items() if k != "adapter"})
        if adapter:
            checked["adapter"] = check_adapter(str(adapter))
        return checked

    def batch_key(self, request: Request) -> Hashable:
        # One batch runs one adapter: only requests for the same adapter (or none) share it.
        return (self.model_name, request.params.get("adapter"))

    def serve(self, requests: list[Request], feed: Feed) -> None:
        # Requests that join later have the same batch key, hence the same adapter.
        if self.model is None:
            self.load()
        base = self.model
        with self.adapters.activate(base, requests[0].params.get("adapter")) as active:
            self.model = active
            try:
                super().serve(requests, feed)
            finally:
                self.model = base

    def _result(self, row: Row, stream: StreamDecoder) -> Result:
        result = super()._result(row, stream)
        result.metadata["adapter"] = row.request.params.get("adapter")
        return result

    def unload(self) -> None:
        super().unload()
        self.adapters.reset()
