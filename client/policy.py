"""A site's own policy: the privacy it grants and the model it loads, whatever a coordinator asks.

A deployed site receives the federation's configuration from the coordinator with every run. The
recipe in it (rounds, batch size, learning rate, local epochs, adapter) is the federation's to
choose; the privacy of the site's data and the code the site runs are not. :class:`SitePolicy`
holds what the site decides: its DP settings and budget, the least noise it accepts, the clipping
implementations it allows, and the model it loads (never remote code unless it says so).
:func:`apply_policy` checks a coordinator's configuration against the policy (one clear error for
the first setting that asks for less privacy, another model or remote code) and returns the
configuration the site actually trains with. Nothing here imports Flower.

A recipe can still spend privacy (more rounds, larger batches, more local epochs mean a larger
sampling rate or more steps); the site's ledger and budget bound that: a round that would pass the
site's budget is refused before it trains.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from privet.common.config import (
    DEFAULT_MODEL,
    PrivacyConfig,
    PrivetConfig,
    format_validation_error,
)
from privet.common.errors import ConfigError, ModelError, PrivacyError

__all__ = [
    "DEFAULT_MIN_NOISE",
    "SiteModel",
    "SitePolicy",
    "SitePrivacy",
    "apply_policy",
    "check_model_files",
    "model_sha256",
]

ClippingKind = Literal["auto", "flat", "ghost", "bookkeeping"]

#: The least noise multiplier a site accepts unless it says otherwise. Below about 0.5 the
#: privacy of DP-SGD degrades quickly (epsilon in the hundreds for a few hundred steps); the site's
#: own calibrated noise is raised to it (spending less than the target), and a coordinator that
#: fixes a lower noise is refused.
DEFAULT_MIN_NOISE = 0.5


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SitePrivacy(_Strict):
    """The sample-level DP a site grants to its data (its ``[privacy]`` section)."""

    enabled: bool = Field(
        True,
        description="DP-SGD on. False lets this site train without DP (a baseline; its own "
        "decision, never the coordinator's).",
    )
    target_epsilon: float | None = Field(
        8.0,
        gt=0,
        le=1000,
        description="Epsilon this site spends over a run's planned rounds at most; a coordinator "
        "asking for more is refused, one asking for less is followed.",
    )
    noise_multiplier: float | None = Field(
        None,
        gt=0,
        description="A fixed noise multiplier instead of target_epsilon (the coordinator may only "
        "ask for more noise).",
    )
    budget_epsilon: float | None = Field(
        None,
        gt=0,
        description="Hard cap on this site's cumulative epsilon over all runs (default: "
        "target_epsilon); only the site sets it, its ledger keeps it.",
    )
    delta: float = Field(
        1e-5,
        gt=0,
        lt=1,
        description="The delta epsilon is accounted at; a coordinator asking "
        "for a larger delta is refused.",
    )
    max_grad_norm: float = Field(
        1.0, gt=0, description="Per-sample clipping norm this site trains with."
    )
    accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="The accountant this site's ledger keeps epsilon with."
    )
    min_noise_multiplier: float = Field(
        DEFAULT_MIN_NOISE,
        gt=0,
        description="The least noise multiplier this site trains with: a coordinator fixing "
        "less is refused, a calibrated noise below it is raised to it.",
    )
    clipping: tuple[ClippingKind, ...] = Field(
        ("auto", "flat", "ghost", "bookkeeping"),
        min_length=1,
        description="The per-sample clipping implementations this site lets a coordinator pick "
        "(privacy.clipping); all compute the same clipped gradients ('auto': book-keeping on a "
        "CUDA device when it covers every trainable layer, else flat).",
    )

    @model_validator(mode="after")
    def _coherent(self) -> SitePrivacy:
        if not self.enabled:
            return self
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "privacy: give target_epsilon or noise_multiplier (set target_epsilon = none to "
                "fix the noise)"
            )
        if self.noise_multiplier is not None and self.noise_multiplier < self.min_noise_multiplier:
            raise ValueError(
                f"privacy.noise_multiplier = {self.noise_multiplier} is below this site's own "
                f"privacy.min_noise_multiplier = {self.min_noise_multiplier}"
            )
        if (
            self.target_epsilon is not None
            and self.budget_epsilon is not None
            and self.target_epsilon > self.budget_epsilon
        ):
            raise ValueError(
                f"privacy.target_epsilon ({self.target_epsilon}) is above privacy.budget_epsilon "
                f"({self.budget_epsilon})"
            )
        return self

    @property
    def budget(self) -> float | None:
        """The cumulative epsilon this site never passes (``None``: DP off or fixed-noise, no cap)."""
        if not self.enabled:
            return None
        return self.budget_epsilon if self.budget_epsilon is not None else self.target_epsilon


class SiteModel(_Strict):
    """The model a site loads (its ``[model]`` section)."""

    name: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        description="The only model this site loads: the embedded MiniLM, a local folder or a hub "
        "name (a coordinator naming another one is refused).",
    )
    trust_remote_code: bool = Field(
        False,
        description="Let the model's own Python code run on this site (off: a coordinator "
        "asking for it is refused).",
    )
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="Pin the model's files: the sha256 of its folder (model_sha256; a "
        "mismatch names the actual one). A site refuses to load anything else. None: no pin.",
    )


class SitePolicy(_Strict):
    """What a site grants a coordinator: its privacy and the model it loads.

    The defaults are safe: DP on at epsilon 8 (the budget), delta 1e-5, noise multiplier at least
    0.5, the embedded MiniLM and no remote code. Written as TOML with a ``[privacy]`` and a
    ``[model]`` section (``privet client --config``).
    """

    privacy: SitePrivacy = Field(
        default_factory=SitePrivacy, description="The DP this site grants (sample level)."
    )
    model: SiteModel = Field(default_factory=SiteModel, description="The model this site loads.")

    @classmethod
    def from_privacy(cls, privacy: PrivacyConfig, **model: object) -> SitePolicy:
        """A policy from a federation-style ``PrivacyConfig`` (the site's own, e.g. an app's)."""
        return cls(
            privacy=SitePrivacy(
                enabled=privacy.enabled,
                target_epsilon=privacy.target_epsilon,
                noise_multiplier=privacy.noise_multiplier,
                budget_epsilon=privacy.budget_epsilon,
                delta=privacy.delta,
                max_grad_norm=privacy.max_grad_norm,
                accountant=privacy.accountant,
                **(
                    {"min_noise_multiplier": privacy.noise_multiplier}
                    if privacy.noise_multiplier is not None
                    and privacy.noise_multiplier < DEFAULT_MIN_NOISE
                    else {}
                ),
            ),
            model=SiteModel.model_validate(model),
        )

    @classmethod
    def load(cls, path: Path) -> SitePolicy:
        """Read a site's policy from a TOML file (``[privacy]`` and ``[model]``); one-line errors."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the site's policy: {exc}") from None
        for section in data.values():
            if isinstance(section, dict):  # TOML has no null: "none" like the federation's files
                for key, value in list(section.items()):
                    if isinstance(value, str) and value.lower() == "none":
                        section[key] = None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(
                f"{path}: {format_validation_error(exc)}",
                fix="a site's config holds only [privacy] and [model] (see docs/security.md); the "
                "federation's recipe is the coordinator's",
            ) from None


@dataclass(frozen=True)
class _Refusal:
    """One setting a coordinator's run asks for that the site's policy does not grant."""

    setting: str
    asked: object
    own: object
    why: str
    model: bool = False

    def __str__(self) -> str:
        return f"{self.setting} = {self.asked!r}, {self.why} ({self.setting} = {self.own!r} here)"


def _raise_refusals(refusals: list[_Refusal]) -> None:
    """One error naming every setting the run asks for beyond the policy (none: return).

    All of them at once: a coordinator's operator fixes the run in one go, and a site's log says
    everything the run tried (a malicious run usually asks for several things).
    """
    if not refusals:
        return
    kind = ModelError if any(r.model for r in refusals) else PrivacyError
    settings = [r.setting for r in refusals]
    named = settings[0] if len(settings) == 1 else ", ".join(settings[:-1]) + " and " + settings[-1]
    own = f"this site's own {settings[0]}" if len(settings) == 1 else "this site's own settings"
    raise kind(
        f"the coordinator's run asks for {'; '.join(map(str, refusals))}; this site trains "
        "nothing for this run.",
        fix=f"ask the coordinator to change {named}, or change {own} "
        "(privet client --config SITE.toml, or the Participant's policy) if it agrees",
    )


def _privacy_refusals(own: SitePrivacy, asked: PrivacyConfig, floor: float) -> list[_Refusal]:
    """The privacy settings of a DP run that ask for less than the site grants."""
    out: list[_Refusal] = []
    if asked.delta > own.delta:
        out.append(
            _Refusal(
                "privacy.delta", asked.delta, own.delta, "a larger delta than this site grants"
            )
        )
    if (
        asked.target_epsilon is not None
        and own.target_epsilon is not None
        and asked.target_epsilon > own.target_epsilon
    ):
        out.append(
            _Refusal(
                "privacy.target_epsilon",
                asked.target_epsilon,
                own.target_epsilon,
                "a larger epsilon than this site grants",
            )
        )
    asked_budget, budget = asked.effective_budget, own.budget
    if budget is not None and asked_budget is not None and asked_budget > budget:
        out.append(
            _Refusal(
                "privacy.budget_epsilon",
                asked_budget,
                budget,
                "a larger privacy budget than this site grants",
            )
        )
    if asked.noise_multiplier is not None and asked.noise_multiplier < floor:
        out.append(
            _Refusal(
                "privacy.noise_multiplier",
                asked.noise_multiplier,
                floor,
                "less noise than this site accepts (its privacy.min_noise_multiplier)",
            )
        )
    if asked.clipping not in own.clipping and _own_auto(asked.clipping, own.clipping) is None:
        out.append(
            _Refusal(
                "privacy.clipping",
                asked.clipping,
                list(own.clipping),
                "a clipping implementation this site does not allow",
            )
        )
    return out


def _own_auto(asked: str, allowed: tuple[str, ...]) -> str | None:
    """``auto`` asked of a site that does not list it but allows flat: the site runs flat.

    All clipping modes release the same clipped sum, so this is the site's choice of code, not of
    privacy; a site that allows neither ``auto`` nor ``flat`` refuses ``auto``.
    """
    if asked == "auto" and "auto" not in allowed and "flat" in allowed:
        return "flat"
    return None


def apply_policy(cfg: PrivetConfig, policy: SitePolicy) -> tuple[PrivetConfig, float | None]:
    """Check a coordinator's configuration against a site's policy; the configuration to train with.

    Parameters
    ----------
    cfg
        The federation's configuration as the coordinator sent it.
    policy
        The site's policy.

    Returns
    -------
    tuple
        The configuration the site trains with (the coordinator's recipe, the site's privacy,
        delta, accountant, budget, clipping norm and model) and the least noise multiplier the
        site trains with (``None`` when the site trains without DP).

    Raises
    ------
    PrivacyError
        When the run asks for weaker privacy than the policy grants: DP off, a larger delta, a
        larger target or budget epsilon, a fixed noise below the site's floor, a clipping kind the
        site does not allow.
    ModelError
        When the run names another model or asks for remote code the site does not allow.

    Every refused setting is named in the one error (model and privacy alike); it is a
    :class:`ModelError` when a model setting is among them.

    """
    own, asked = policy.privacy, cfg.privacy
    m, am = policy.model, cfg.model
    refused: list[_Refusal] = []
    if am.name != m.name:
        refused.append(
            _Refusal("model.name", am.name, m.name, "another model than this site loads", True)
        )
    if am.trust_remote_code and not m.trust_remote_code:
        refused.append(
            _Refusal(
                "model.trust_remote_code",
                True,
                False,
                "which would run the model's own Python code on this site",
                True,
            )
        )
    model = am.model_copy(update={"name": m.name, "trust_remote_code": m.trust_remote_code})
    if not own.enabled:
        _raise_refusals(refused)
        privacy = asked.model_copy(update={"enabled": False})
        return cfg.model_copy(update={"privacy": privacy, "model": model}), None
    floor = max(own.min_noise_multiplier, own.noise_multiplier or 0.0)
    if not asked.enabled:
        refused.append(
            _Refusal("privacy.enabled", False, True, "training without differential privacy")
        )
    else:
        refused.extend(_privacy_refusals(own, asked, floor))
    _raise_refusals(refused)
    budget = own.budget
    # The stricter of the two: the coordinator may ask for less epsilon or more noise.
    if own.noise_multiplier is not None or asked.noise_multiplier is not None:
        target, sigma = None, max(own.noise_multiplier or 0.0, asked.noise_multiplier or 0.0)
    else:
        assert own.target_epsilon is not None and asked.target_epsilon is not None
        target, sigma = min(own.target_epsilon, asked.target_epsilon), None
    privacy = PrivacyConfig(
        enabled=True,
        target_epsilon=target,
        noise_multiplier=sigma,
        delta=own.delta,
        max_grad_norm=own.max_grad_norm,
        accountant=own.accountant,
        budget_epsilon=budget,
        clipping=_own_auto(asked.clipping, own.clipping) or asked.clipping,
        client_level=asked.client_level,
        secure_aggregation=asked.secure_aggregation,
        secagg=asked.secagg,
    )
    return cfg.model_copy(update={"privacy": privacy, "model": model}), floor


def model_sha256(name: str) -> str:
    """sha256 over a model's files (relative paths and contents, sorted), before anything loads.

    ``name`` is a ``model.name``: the embedded model, a local folder, or a hub name already in the
    local cache (nothing is downloaded).

    Raises
    ------
    ModelError
        When the model's files cannot be found on this machine.

    """
    from privet.common.modeling import resolve_model_path

    source = Path(resolve_model_path(name))
    if not source.is_dir():
        try:
            from huggingface_hub import snapshot_download

            source = Path(snapshot_download(name, local_files_only=True))
        except Exception:  # any failure means: not on this machine
            raise ModelError(
                f"model.name {name!r} is not on this machine, so model.sha256 cannot be checked",
                fix="download the model into a folder and name that folder",
            ) from None
    h = hashlib.sha256()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = path.relative_to(source).as_posix()
        if rel.startswith(".") or "__pycache__" in rel:
            continue
        h.update(rel.encode() + b"\0")
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def check_model_files(model: SiteModel) -> None:
    """Refuse a model whose files are not the ones the site pinned (``model.sha256``)."""
    if model.sha256 is None:
        return
    actual = model_sha256(model.name)
    if actual != model.sha256:
        raise ModelError(
            f"model.name {model.name!r} holds files with sha256 {actual}, not this site's "
            f"model.sha256 {model.sha256}; this site loads nothing else",
            fix="restore the model this site pinned, or set model.sha256 to the new hash if the "
            "site trusts it",
        )
