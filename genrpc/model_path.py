"""Where a model lives: a Hugging Face folder, a hub id, or a GGUF file."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models",
                             "SmolLM2-135M-Instruct")


@dataclass(frozen=True)
class ModelSource:
    """Arguments for `from_pretrained`: a folder or hub id, and a GGUF file inside it when there is one."""

    name_or_path: str
    gguf_file: str | None = None

    @classmethod
    def parse(cls, model: str) -> "ModelSource":
        if model.endswith(".gguf"):
            if not os.path.isfile(model):
                raise FileNotFoundError(f"--model {model!r}: no such GGUF file")
            return cls(os.path.dirname(os.path.abspath(model)), os.path.basename(model))
        return cls(model)

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    @property
    def display_name(self) -> str:
        return os.path.basename(self.gguf_file or self.name_or_path.rstrip("/")) or self.name_or_path
