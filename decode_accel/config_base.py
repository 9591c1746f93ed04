"""Base class of every config section: typed, documented, unknown keys rejected."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model that forbids unknown keys and validates on assignment.

    Every field of a subclass carries a ``description`` that states its unit; the README's config
    reference is generated from these descriptions.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
