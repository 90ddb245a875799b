"""Named, versioned prompt templates (configs/prompts/ID-vN.yaml)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

PROMPTS = Path(__file__).resolve().parent.parent / "configs" / "prompts"


class PromptTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Template name, stored with every caption.")
    version: int = Field(ge=1, description="Bumped whenever the text changes.")
    kind: str = Field(description="Caption kind it writes: descriptive or short.")
    text: str = Field(description="The instruction for chat models.")
    hint: str = Field("", description="Appended when alt-text hints are on; {alt} is replaced.")
    prefix: str = Field("", description="Text prefix for captioners without a chat template (BLIP).")

    @property
    def ref(self) -> str:
        return f"{self.id}@{self.version}"

    def render(self, alt: str | None, use_hint: bool) -> str:
        if use_hint and self.hint and alt and alt.strip():
            return f"{self.text} {self.hint.format(alt=alt.strip()[:300])}"
        return self.text


def load_prompt(name: str) -> PromptTemplate:
    """A template by name (``descriptive-v1``, looked up in configs/prompts/), by path or by
    URL (``s3://bucket/prompts/mine-v1.yaml``)."""
    from pipeline import storage

    path = storage.path(name)
    if not path.suffix:
        path = PROMPTS / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PROMPTS.glob("*.yaml")))
        raise FileNotFoundError(f"prompt template {name!r} not found (known: {known})")
    return PromptTemplate.model_validate(yaml.safe_load(path.read_text()))
