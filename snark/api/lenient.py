"""The base of every request model: unknown fields are ignored, as OpenAI-compatible servers do, so
clients that send newer harmless options keep working."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
