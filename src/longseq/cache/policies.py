"""Cache policies: which tokens a bounded KV cache keeps (the KV cache as a bounded multi-state RNN).

A policy is a small immutable description -- ``budget`` tokens per layer and an eviction rule -- that
the per-layer :class:`~longseq.cache.kv.KVCache` consults. Nothing here knows about models: any model
whose attention layers call :meth:`KVCache.attend` (a Transformer, or the attention layers of a hybrid)
can be bounded by any policy.

Semantics shared by every bounded policy (Oren et al. 2024, "Transformers are Multi-State RNNs"):
between tokens a layer keeps at most ``budget`` tokens. A new token is first added (so it attends over
the ``<= budget`` kept tokens plus itself), and if that makes ``budget + 1`` tokens, exactly one is
evicted -- possibly the new token itself. This is applied after *every* token, prompts included.

=========================  ==========================================================================
spec                       policy
=========================  ==========================================================================
``full``                   :class:`Full`: keep everything
``window:B``               :class:`Window`: the ``B`` most recent tokens
``sink:B[:sinks=4]``       :class:`Sink`: the first ``sinks`` tokens + the most recent (StreamingLLM)
``h2o:B[:recent=B//2]``    :class:`H2O`: heavy hitters by accumulated attention + a recent window
``tova:B``                 :class:`TOVA`: evict the lowest head-averaged attention of the current query
``tova:B:per_head``        :class:`TOVA` with ``per_head=True`` (TOVA-head); alias ``tova_head:B``
=========================  ==========================================================================

Ties in a score are broken towards evicting the oldest token (smallest position), so every decision is
a deterministic function of the scores and positions.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ..ops.decode_block.reference import KEY_ACCUMULATED, KEY_ATTENTION, KEY_POSITION


def select_evictions(
    scores: Tensor, n_evict: int = 1, positions: Tensor | None = None, candidates: Tensor | None = None
) -> Tensor:
    """Indices of the ``n_evict`` lowest-scoring entries along the last axis, lowest first.

    Args:
        scores: ``[..., S]`` eviction scores (float or integer); lower is evicted first.
        n_evict: how many to evict (``<=`` the number of candidates).
        positions: ``[..., S]`` original positions; ties in ``scores`` evict the smaller position first
            (default: the index).
        candidates: ``[..., S]`` bool, which entries may be evicted (default: all).
    Returns:
        ``[..., n_evict]`` int64 indices into the last axis.

    TOVA's worked example: ``select_evictions(tensor([.3, .1, .25, .05, .3]), 2)`` -> ``[3, 1]``.
    """
    if positions is None:
        positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)
    big = float("inf") if scores.dtype.is_floating_point else torch.iinfo(scores.dtype).max
    if candidates is not None:
        scores = scores.masked_fill(~candidates, big)
    if n_evict == 1:
        # Two reductions instead of a sort: the minimum, then the oldest among the entries that reach it.
        # No host sync and fixed shapes, so the single-token decode step stays graph-capturable.
        lowest = scores == scores.amin(-1, keepdim=True)
        if candidates is not None:
            lowest = lowest & candidates
        return positions.masked_fill(~lowest, torch.iinfo(positions.dtype).max).argmin(-1, keepdim=True)
    # Lexicographic (score, position) order via two stable sorts.
    by_pos = torch.sort(positions, dim=-1, stable=True).indices
    by_score = torch.sort(scores.gather(-1, by_pos), dim=-1, stable=True).indices
    return by_pos.gather(-1, by_score)[..., :n_evict]


class EvictionRule(NamedTuple):
    """How a bounded policy picks its victim: the lowest ``key`` (a ``longseq.ops.decode_block.KEY_*``: the
    position, i.e. the oldest; the current query's head-averaged attention; or that attention accumulated
    over every query since the token came) among the kept positions in ``[sinks, current - recent]`` (no
    upper bound when ``recent`` is None), oldest first on ties. The built-in policies declare one, and every
    path derives from it: :meth:`BoundedPolicy.select_victim`, the eviction replay of a prefill, and the
    fused eviction kernel of a static cache's decode step."""

    key: int
    sinks: int = 0
    recent: int | None = None


def select_by_rule(rule: EvictionRule, positions: Tensor, current: Tensor, keys: Tensor) -> Tensor:
    """``[B, G, 1]`` the slot ``rule`` evicts, given the slots' ``positions`` ``[B, G, C]`` (``-1``: empty),
    the new token's position ``current`` ``[B, 1, 1]`` and the key per slot ``keys`` ``[B, G, C]``."""
    candidates = positions >= rule.sinks  # also excludes the empty slots
    if rule.recent is not None:
        candidates = candidates & (positions <= current - rule.recent)
    return select_evictions(keys, 1, positions, candidates)


@dataclass(frozen=True)
class CachePolicy:
    """Base class of cache policies. Subclasses define ``budget`` (tokens kept per layer; None: unbounded).

    The hooks below are what :class:`~longseq.cache.kv.KVCache` asks of a policy; a bounded policy
    implements :meth:`select_victim`.
    """

    name: ClassVar[str] = ""
    budget: ClassVar[int | None]

    @property
    def eviction_rule(self) -> EvictionRule | None:
        """The policy's victim rule when it is an :class:`EvictionRule` (every built-in bounded policy); the
        properties below and :meth:`select_victim` derive from it. None: a policy of one's own overrides
        them and :meth:`select_victim` instead (and keeps the PyTorch paths)."""
        return None

    @property
    def needs_attention_weights(self) -> bool:
        """True when the policy scores tokens by the attention rows of the current query."""
        rule = self.eviction_rule
        return rule is not None and rule.key != KEY_POSITION

    @property
    def accumulates_scores(self) -> bool:
        """True when the policy keeps a running score per kept token (H2O's accumulated attention)."""
        rule = self.eviction_rule
        return rule is not None and rule.key == KEY_ACCUMULATED

    @property
    def replay_recent(self) -> int | None:
        """``r`` when the policy evicts, among the kept tokens older than the ``r`` newest positions, the
        one with the lowest current (or, with ``accumulates_scores``, accumulated) head-averaged
        attention, oldest first on ties -- the rule the eviction-replay kernel runs
        (:mod:`longseq.ops.eviction_replay`). None for any other rule."""
        rule = self.eviction_rule
        if rule is None or rule.key == KEY_POSITION or rule.sinks:
            return None
        return rule.recent or 0

    @property
    def per_head(self) -> bool:
        """True when every kv head evicts independently (kept positions ``[B, H_kv, n]``)."""
        return False

    @property
    def band(self) -> tuple[int, int] | None:
        """``(window, sinks)`` when the kept set depends on positions only: token ``p`` then sees the
        positions ``[p - window, p]`` and ``[0, sinks)``, so a whole chunk can be processed at once."""
        return None

    def select_victim(self, positions: Tensor, current: Tensor, scores: Tensor | None) -> Tensor:
        """The slot to evict from a cache holding ``budget + 1`` tokens.

        Args:
            positions: ``[B, G, C]`` original position per slot (``G`` = 1, or ``H_kv`` per-head).
            current: ``[B, 1, 1]`` position of the token just added.
            scores: ``[B, G, C]`` head-averaged attention of the current query (TOVA), accumulated
                attention (H2O), or None for policies that need no weights.
        Returns:
            ``[B, G, 1]`` slot indices.
        """
        rule = self.eviction_rule
        if rule is None:
            raise NotImplementedError(f"{type(self).__name__} does not evict")
        if rule.key != KEY_POSITION and scores is None:
            raise ValueError(f"{type(self).__name__} scores tokens by attention: select_victim needs scores")
        return select_by_rule(rule, positions, current, positions if rule.key == KEY_POSITION else scores)

    @property
    def spec(self) -> str:
        """The short spec :func:`parse_policy` turns back into this policy (e.g. ``"tova:512"``)."""
        if self.budget is None:
            return self.name
        parts = [self.name, str(self.budget)]
        for f in dataclasses.fields(self):
            if f.name == "budget":
                continue
            value = getattr(self, f.name)
            if value == self._default(f.name):
                continue
            parts.append(
                f.name if value is True else f"{f.name}={int(value) if isinstance(value, bool) else value}"
            )
        return ":".join(parts)

    def _default(self, field: str) -> Any:
        return next(f.default for f in dataclasses.fields(self) if f.name == field)

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True)
class Full(CachePolicy):
    """Keep every token: the ordinary, unbounded KV cache."""

    name: ClassVar[str] = "full"
    budget: ClassVar[None] = None


@dataclass(frozen=True)
class BoundedPolicy(CachePolicy):
    """A policy that keeps at most ``budget`` tokens per layer (``budget >= 1``)."""

    budget: int  # type: ignore[misc]  # a field here, a class constant on Full

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(
                f"{type(self).__name__}: budget must be an integer >= 1; got budget={self.budget!r}"
            )
        self._check_option_types()

    def _check_option_types(self) -> None:
        """Each option has its annotated type (an integer option any integer but a bool, stored as ``int``),
        so a wrong one fails here, not at the first eviction or in a spec that cannot be parsed back."""
        for f in dataclasses.fields(self):
            value, text = getattr(self, f.name), str(f.type)
            if f.name == "budget" or (value is None and "None" in text):
                continue
            if "bool" in text:
                if not isinstance(value, bool):
                    raise ValueError(f"{type(self).__name__}: {f.name} must be True or False; got {f.name}={value!r}")
            elif "int" in text:
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise ValueError(f"{type(self).__name__}: {f.name} must be an integer; got {f.name}={value!r}")
                object.__setattr__(self, f.name, int(value))


@dataclass(frozen=True)
class Window(BoundedPolicy):
    """Keep the ``budget`` most recent tokens (sliding-window attention over a ring of tokens)."""

    name: ClassVar[str] = "window"

    @property
    def band(self) -> tuple[int, int]:
        return self.budget, 0

    @property
    def eviction_rule(self) -> EvictionRule:
        return EvictionRule(KEY_POSITION)  # the oldest


@dataclass(frozen=True)
class Sink(BoundedPolicy):
    """StreamingLLM (Xiao et al. 2023): the first ``sinks`` tokens (attention sinks) + the latest."""

    name: ClassVar[str] = "sink"
    sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.sinks < self.budget:
            raise ValueError(f"Sink: need 0 <= sinks < budget; got sinks={self.sinks}, budget={self.budget}")

    @property
    def band(self) -> tuple[int, int]:
        return self.budget - self.sinks, self.sinks

    @property
    def eviction_rule(self) -> EvictionRule:
        return EvictionRule(KEY_POSITION, sinks=self.sinks)  # the oldest after the sinks


@dataclass(frozen=True)
class H2O(BoundedPolicy):
    """Heavy-Hitter Oracle (Zhang et al. 2023): the ``recent`` most recent tokens are always kept; among
    the others, the token with the lowest *accumulated* attention is evicted.

    A token's accumulated score is the sum, over every query that has attended to it (itself and all later
    tokens while it was kept), of the attention weight it received averaged over the layer's query heads.
    It is one decision per layer, like TOVA (the H2O paper evicts per head; the layer-wise variant is the
    one the TOVA paper compares against). ``recent`` defaults to ``budget // 2``; ``recent = budget`` is a
    sliding window, ``recent = 0`` pure heavy hitters.
    """

    name: ClassVar[str] = "h2o"
    recent: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.recent is None:
            object.__setattr__(self, "recent", self.budget // 2)
        if not 0 <= self.recent <= self.budget:
            raise ValueError(
                f"H2O: need 0 <= recent <= budget; got recent={self.recent}, budget={self.budget}"
            )

    def _default(self, field: str) -> Any:
        return self.budget // 2 if field == "recent" else super()._default(field)

    @property
    def eviction_rule(self) -> EvictionRule:
        # The `recent` most recent positions (the current token included) are protected.
        return EvictionRule(KEY_ACCUMULATED, recent=self.recent)


@dataclass(frozen=True)
class TOVA(BoundedPolicy):
    """Token Omission Via Attention (Oren et al. 2024): evict the token with the lowest attention weight
    from the current query, averaged over the query heads of the layer -- one decision per layer.

    ``per_head=True`` is TOVA-head: each kv head evicts on its own, scored by the query heads of its group,
    so different heads keep different positions (``kept_positions`` is then ``[B, H_kv, n]``).
    """

    name: ClassVar[str] = "tova"
    per_head: bool = False  # type: ignore[assignment]  # a field here, a property on the base

    @property
    def eviction_rule(self) -> EvictionRule:
        return EvictionRule(KEY_ATTENTION)  # every kept token is a candidate


# name -> policy class; bounded policies register here so ``parse_policy`` and the CLI know them.
POLICIES: dict[str, type[CachePolicy]] = {
    "full": Full,
    "window": Window,
    "sink": Sink,
    "h2o": H2O,
    "tova": TOVA,
}
# Convenience names: alias -> (registered name, fixed options).
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {"tova_head": ("tova", {"per_head": True})}


def _coerce_option(policy: str, key: str, value: str, annotation: Any) -> Any:
    text = str(annotation)
    if "bool" in text:
        if value in {"true", "1", "yes"}:
            return True
        if value in {"false", "0", "no"}:
            return False
    elif "int" in text:
        if value.lstrip("-").isdigit():
            return int(value)
    raise ValueError(f"policy {policy!r}: option {key}={value!r} is not a valid {text}")


def parse_policy(spec: str, budget: int | None = None, *, budgets_from: str | None = None) -> CachePolicy:
    """A policy from a short spec: ``"full"`` or ``"<name>:<budget>[:<option>[=<value>]]..."``.

    Examples: ``"tova:512"``, ``"tova:512:per_head"``, ``"tova_head:512"``, ``"sink:512:sinks=8"``,
    ``"h2o:512:recent=128"``, ``"window:64"``. ``budget`` fills in a spec written without one
    (``parse_policy("sink:sinks=8", budget=64)``); it is ignored for ``full``. ``budgets_from`` names where a
    grid's budgets come from (a sweep's ``--budgets``): a spec carrying its own budget is then refused, since the
    grid would label the cell by its budget while the policy kept the spec's. Unknown names or options and bad
    values raise ``ValueError``.
    """
    if not isinstance(spec, str):
        raise TypeError(f"a cache policy spec is a string such as 'tova:512'; got {type(spec).__name__}")
    parts = [p.strip() for p in spec.strip().lower().split(":")]
    name, rest = parts[0], parts[1:]
    options: dict[str, Any] = {}
    if name in ALIASES:
        name, fixed = ALIASES[name]
        options.update(fixed)
    if name not in POLICIES:
        raise ValueError(
            f"unknown cache policy {name!r} in {spec!r}; choose one of {sorted(POLICIES) + sorted(ALIASES)}"
        )
    cls = POLICIES[name]
    if cls is Full:
        if rest:
            raise ValueError(f"policy 'full' takes no budget or options; got {spec!r}")
        return Full()
    if rest and rest[0].lstrip("-").isdigit():
        spec_budget: int | None = int(rest[0])
        rest = rest[1:]
        if budgets_from is not None:
            bare = ":".join([parts[0], *rest])
            raise ValueError(f"policy {spec!r} carries its own budget ({spec_budget}), but the budgets come from "
                             f"{budgets_from}: write {bare!r} and put {spec_budget} in {budgets_from}")
    else:
        spec_budget = budget
    if spec_budget is None:
        raise ValueError(f"policy spec {spec!r} needs an integer budget, e.g. '{name}:512'")
    fields = {f.name: f.type for f in dataclasses.fields(cls) if f.name != "budget"}
    for part in rest:
        key, eq, value = part.partition("=")
        if key not in fields:
            raise ValueError(
                f"policy {name!r} has no option {key!r} (in {spec!r}); options: {sorted(fields)}"
            )
        options[key] = _coerce_option(name, key, value if eq else "true", fields[key])
    return cls(spec_budget, **options)


def parse_budget(spec: int | str) -> int | str:
    """A budget: tokens kept per layer (an int >= 1), or ``"ctx/K"``: the context length divided by K
    (the benchmarks' ``tova:ctx/8``, a task's ``--budgets ctx/8``; :func:`resolve_budget` makes it a number)."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1:
            raise ValueError(f"a cache budget must be >= 1; got {spec}")
        return spec
    text = str(spec).strip().lower().replace(" ", "")
    if text.lstrip("-").isdigit():
        return parse_budget(int(text))
    match = re.fullmatch(r"ctx/(\d+)", text)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"a budget is an integer >= 1 or a fraction of the context such as 'ctx/8'; got {spec!r}")
    return f"ctx/{int(match.group(1))}"


def fit_budget(policy: CachePolicy, max_tokens: int) -> CachePolicy:
    """``policy`` with its budget lowered to ``max_tokens`` when a sequence of at most that many tokens can never
    fill it: such a policy never evicts, so only the memory a static cache allocates (``budget + 1`` slots)
    changes. Options that must stay below the budget follow it (they never act without an eviction)."""
    if not isinstance(policy, BoundedPolicy) or policy.budget <= max_tokens:
        return policy
    budget = max(max_tokens, policy.sinks + 1) if isinstance(policy, Sink) else max_tokens
    changes: dict[str, Any] = {"budget": budget}
    if isinstance(policy, H2O):
        changes["recent"] = min(policy.recent, budget)
    try:
        return dataclasses.replace(policy, **changes)
    except (TypeError, ValueError):  # a user policy with other constraints: keep it as it is
        return policy


def resolve_budget(budget: int | str, length: int) -> int:
    """Tokens kept per layer for a prompt of ``length`` tokens."""
    budget = parse_budget(budget)
    return budget if isinstance(budget, int) else max(1, length // int(budget.split("/")[1]))
