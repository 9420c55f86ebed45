"""Request and response schemas of ``POST /v1/recommend``.

The request model is built per deployment (:func:`request_model`) because its limits come from the
config and the catalogue size: item ids must lie in 0..n-1, lists and titles are bounded. Every
violation becomes a 422 whose ``field`` names the dotted path (``history.3``, ``k``).

Example body::

    {"history": ["Toy Story (1995)", 50, 181],      # titles or item ids, oldest first
     "recommended": [12, "Heat (1995)"],            # already recommended in this session, in order
     "rewards": [4.0, null],                        # optional: the user's reward for each of those
     "k": 2, "temperature": 0.5, "seed": 7}
"""

# No `from __future__ import annotations`: pydantic must see the limits captured in
# request_model's closure as real objects, not strings.
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictInt, ValidationInfo, WithJsonSchema, field_validator

MAX_SEED = 2**31 - 2
# Rewards only appear in the transcript ("reward=4.00"); anything larger is a client error.
MAX_ABS_REWARD = 1e6


@dataclass(frozen=True)
class RequestLimits:
    num_items: int
    max_history: int
    max_recommended: int
    max_title_chars: int
    max_k: int
    max_temperature: float

    @classmethod
    def from_config(cls, serve_cfg, num_items: int) -> "RequestLimits":
        return cls(
            num_items=num_items,
            max_history=serve_cfg.max_history,
            max_recommended=serve_cfg.max_recommended,
            max_title_chars=serve_cfg.max_title_chars,
            max_k=serve_cfg.max_k,
            max_temperature=serve_cfg.max_temperature,
        )


def check_title(value: str, max_chars: int) -> str:
    """A client-supplied title: non-blank, at most ``max_chars`` characters, valid Unicode (no lone
    surrogates), no control characters other than whitespace."""
    if not value.strip():
        raise ValueError("title is empty")
    if len(value) > max_chars:
        raise ValueError(f"title longer than {max_chars} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("title is not valid Unicode") from None
    if any(unicodedata.category(c) == "Cc" and c not in "\t\n\r" for c in value):
        raise ValueError("title contains control characters")
    return value


def item_ref_type(num_items: int, max_title_chars: int) -> Any:
    """An item given by id (an integer in 0..num_items-1) or by title (a string)."""

    def validate(value: Any) -> Union[int, str]:
        # bool is an int subclass: `true` is not an item id.
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError("expected an item id (integer) or a title (string)")
        if isinstance(value, int):
            if not 0 <= value < num_items:
                raise ValueError(f"item id out of range 0..{num_items - 1}")
            return value
        return check_title(value, max_title_chars)

    schema = {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": num_items - 1},
            {"type": "string", "minLength": 1, "maxLength": max_title_chars},
        ]
    }
    return Annotated[Union[int, str], PlainValidator(validate), WithJsonSchema(schema)]


def request_model(limits: RequestLimits) -> type[BaseModel]:
    """The pydantic model of a recommendation request under ``limits``."""
    ItemRef = item_ref_type(limits.num_items, limits.max_title_chars)
    Reward = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-MAX_ABS_REWARD, le=MAX_ABS_REWARD)]

    class RecommendRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        history: list[ItemRef] = Field(
            max_length=limits.max_history, description="The user's history, oldest first: item ids or titles."
        )
        recommended: list[ItemRef] = Field(
            default_factory=list,
            max_length=limits.max_recommended,
            description="Items already recommended in this session, in order: never recommended again.",
        )
        rewards: Optional[list[Optional[Reward]]] = Field(
            default=None, description="The user's reward for each recommended item (null = unknown)."
        )
        k: StrictInt = Field(default=1, ge=1, le=limits.max_k, description="How many items to recommend.")
        temperature: Optional[float] = Field(
            default=None, strict=True, allow_inf_nan=False, ge=0, le=limits.max_temperature
        )
        seed: Optional[StrictInt] = Field(default=None, ge=0, le=MAX_SEED)

        @field_validator("rewards")
        @classmethod
        def _one_reward_per_item(cls, rewards: Optional[list], info: ValidationInfo) -> Optional[list]:
            recommended = info.data.get("recommended")
            if rewards is not None and recommended is not None and len(rewards) != len(recommended):
                raise ValueError(f"has {len(rewards)} entries for {len(recommended)} recommended items")
            return rewards

    return RecommendRequest


class RecommendationOut(BaseModel):
    item_id: int
    title: str
    raw_output: str = Field(description="The policy's completion for this slot (its last attempt).")
    substituted: bool = Field(description="The item is not the title the model wrote (nearest match).")
    format_error: bool = Field(description="The model's output could not be read as an action.")
    source: Literal["generated", "resampled", "fallback"] = Field(
        description="generated: first sample; resampled: a later sample (the first repeated an item); "
        "fallback: nearest unrecommended item by embedding."
    )


class RecommendResponse(BaseModel):
    recommendations: list[RecommendationOut]


class ErrorResponse(BaseModel):
    error: str
    field: Optional[str] = None
    detail: Optional[list[dict[str, Any]]] = None
