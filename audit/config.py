"""What an audit sweeps, and how much data and training each part gets."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator, model_validator

from fedsea_shared import defaults

# Cheapest first; "vocab" checks the probe's candidates in context (audit.attacks.vocabulary_matching);
# "mlp" and "seq" are the learned inverters of audit.attacks.
ATTACKS = ("embedding", "probe", "vocab", "mlp", "seq")
# Defenses measured next to plain noise (audit.defense); none changes what is leaked at a
# given noise, each changes what that noise costs.
DEFENSES = ("clean-prefix", "adapted-tail")


class AuditConfig(BaseModel):
    """What to sweep and how much data and training each part gets."""

    model: str = defaults.MODEL
    heads: list[int] = Field(default=[1, 2, 4], description="head depths; 0 = the embedding layer (a reference, not a servable split)")
    tail: int = defaults.TAIL
    noises: list[float] = Field(default=[0.0, 0.1, 0.3, 1.0, 3.0], description="noise scales relative to per-token RMS")
    attacks: list[str] = list(ATTACKS)
    window: int = Field(45, ge=32, description="content tokens per attacker/victim window (room for a canary)")
    attacker_windows: int = Field(512, ge=8, description="BBC windows the attacker trains on")
    victim_windows: int = Field(64, ge=2, description="chitchat windows, each with a planted name and number")
    utility_windows: int = Field(16, ge=1, description="held-out chitchat windows for perplexity")
    utility_window: int = Field(61, ge=4)
    inverter_steps: int = Field(100, ge=1, description="training steps of a learned inverter at the lowest noise")
    inverter_warm_steps: int = Field(40, ge=0, description="further steps at each higher noise, continuing from the previous level")
    defenses: list[str] = Field(default=["clean-prefix"], description=f"any of {DEFENSES}")
    defense_windows: int = Field(128, ge=1, description="chitchat windows the edge adapts its tail on (adapted-tail)")
    defense_epochs: int = Field(2, ge=1)
    seed: int = 0

    @field_validator("noises")
    @classmethod
    def _noises(cls, v: list[float]) -> list[float]:
        if not v or any(n < 0 for n in v):
            raise ValueError("noise levels must be a non-empty list of values >= 0")
        return sorted(set(v))

    @field_validator("attacks")
    @classmethod
    def _attacks(cls, v: list[str]) -> list[str]:
        unknown = set(v) - set(ATTACKS)
        if not v or unknown:
            raise ValueError(f"unknown attacks {sorted(unknown)}; choose from {list(ATTACKS)}")
        return v

    @field_validator("defenses")
    @classmethod
    def _defenses(cls, v: list[str]) -> list[str]:
        unknown = set(v) - set(DEFENSES)
        if unknown:
            raise ValueError(f"unknown defenses {sorted(unknown)}; choose from {list(DEFENSES)}")
        return v

    @model_validator(mode="after")
    def _heads(self):
        if not self.heads or any(h < 0 for h in self.heads) or self.tail < 1:
            raise ValueError("heads must be a non-empty list of depths >= 0 and tail >= 1")
        self.heads = sorted(set(self.heads))
        return self
