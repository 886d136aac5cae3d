"""Known content: what decides about an image before the guard model is asked.

In order, for an image under a policy:

1. a **block** bank's match (`service.core.banks`): a known-bad image is blocked, whatever any
   reviewer or earlier verdict said of a copy of it;
2. a reviewer's standing decision about this image under this policy
   (`service.core.human_decisions`), sticky over model verdicts until withdrawn;
3. an **allow** bank's match: a known-safe asset;
4. an earlier verdict about the same image (same sha256, or, when configured, a PDQ
   near-duplicate) under the same policy id, policy version and model (`service.core.reuse`);
5. the model, asked once for identical images judged at the same time (single flight).

A **review** bank's match decides nothing by itself: the model still judges the image (the
reviewer wants its rationale), and the verdict goes to review. Reuse is an optimisation: a store
that fails answers "not known", and the event goes to the model.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from pydantic import ValidationError

from service.core.banks import BankMatch, Banks
from service.core.decisions import Action, Decision
from service.core.hashing import Pdq
from service.core.human_decisions import HumanDecisions
from service.core.images import DecodedImage
from service.core.judgements import Judgement, ModelIdentity
from service.core.pdq_index import PdqIndex
from service.core.policies import Policy
from service.core.reuse import ReuseKey, VerdictStore
from service.core.reviews import ReviewDecision
from service.core.verdicts import Match, ModelInfo, Verdict
from service.ops.metrics import Metrics


@dataclass
class KnownContent:
    """Banks, reviewers' decisions and reusable verdicts, consulted before the model."""

    metrics: Metrics
    banks: Banks | None = None
    decisions: HumanDecisions | None = None
    store: VerdictStore | None = None
    near: NearDuplicates | None = None
    _flights: dict[tuple[str, str, str], asyncio.Future[tuple[Judgement, str] | None]] = field(
        default_factory=dict
    )

    def before_reuse(
        self, policy: Policy, image: DecodedImage, bank: BankMatch | None
    ) -> Judgement | None:
        """A block bank, then a reviewer's decision, then an allow bank: each decides alone."""
        if bank is not None and bank.spec.action == "block":
            return self._by_bank(policy, bank)
        if self.decisions is not None:
            decision = self.decisions.decision_for(image.sha256, policy.id)
            if decision is not None:
                return _by_reviewer(policy, decision)
        if bank is not None and bank.spec.action == "allow":
            return self._by_bank(policy, bank)
        return None

    def match_bank(self, image: DecodedImage) -> BankMatch | None:
        """The bank entry the image matches (CPU: run it off the event loop)."""
        if self.banks is None:
            return None
        return self.banks.match(image.sha256, image.md5, image.pdq)

    async def reused(
        self, policy: Policy, image: DecodedImage, model: ModelIdentity | None
    ) -> Judgement | None:
        """An earlier verdict's judgement for the same image, policy version and model."""
        if self.store is None or model is None:
            return None
        found = await self._stored(_key(image.sha256, policy, model))
        kind, distance = "sha256", 0
        if found is None and self.near is not None and image.pdq is not None:
            near = self.near.nearest(image.pdq)
            if near is not None and near[0] != image.sha256:
                found = await self._stored(_key(near[0], policy, model))
                kind, distance = "pdq", near[1]
        if found is None:
            self.metrics.reuse_lookups.labels("miss").inc()
            return None
        self.metrics.reuse_lookups.labels("hit" if kind == "sha256" else "near").inc()
        return Judgement(
            rating=found.rating,
            category_code=found.category_code,
            category=found.category,
            rationale=found.rationale,
            confidence=found.confidence,
            model=found.model,
            decided_by="reuse",
            match=Match(bank="reuse", entry_id=found.event_id, kind=kind, distance=distance),
            frames_judged=found.frames_judged,
            frame=found.frame,
        )

    async def remember(
        self, policy: Policy, verdict: Verdict, pdq: Pdq | None, model: ModelIdentity
    ) -> None:
        """Keep a model verdict for reuse (never a reused, bank or human one), under the
        identity of the model that answered (`model`, as `reused` is asked with)."""
        if self.store is None or verdict.decided_by != "model":
            return
        key = _key(verdict.image_sha256, policy, model)
        await self.store.put(key, verdict.model_dump_json().encode("utf-8"))
        if self.near is not None and pdq is not None and pdq.usable:
            self.near.add(pdq, verdict.image_sha256)

    async def once(
        self,
        policy: Policy,
        image: DecodedImage,
        event_id: str,
        judge: Callable[[], Awaitable[Judgement]],
    ) -> Judgement:
        """`judge()`, once for identical images judged together: the others wait for its
        judgement, and get it as reused from `event_id`'s. When the first fails, each waiter
        judges for itself: one failure is not everyone's. With reuse off, each judges."""
        if self.store is None:  # reuse is off: every event asks the model
            return await judge()
        flight = (image.sha256, policy.id, policy.full_version)
        pending = self._flights.get(flight)
        if pending is not None:
            self.metrics.single_flight_waits.inc()
            shared = await asyncio.shield(pending)
            if shared is None:
                return await judge()
            judgement, first = shared
            reuse = Match(bank="reuse", entry_id=first, kind="sha256")
            return replace(judgement, decided_by="reuse", match=reuse)
        future: asyncio.Future[tuple[Judgement, str] | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._flights[flight] = future
        try:
            judgement = await judge()
        except BaseException:
            future.set_result(None)
            raise
        else:
            future.set_result((judgement, event_id))
            return judgement
        finally:
            del self._flights[flight]

    async def _stored(self, key: ReuseKey) -> Verdict | None:
        assert self.store is not None
        raw = await self.store.get(key)
        if raw is None:
            return None
        try:
            return Verdict.model_validate_json(raw)
        except ValidationError:
            # A verdict written by another version of guardstream: judge again.
            self.metrics.reuse_lookups.labels("error").inc()
            return None

    def _by_bank(self, policy: Policy, bank: BankMatch) -> Judgement:
        self.metrics.bank_matches.labels(bank.spec.name, bank.entry.kind).inc()
        action: Action = "block" if bank.spec.action == "block" else "allow"
        category = (
            policy.safe_category if action == "allow" else policy.category(bank.spec.category_code)
        )
        note = f": {bank.entry.note}" if bank.entry.note else ""
        how = f"{bank.entry.kind} distance {bank.distance}" if bank.entry.kind == "pdq" else "exact"
        return Judgement(
            rating="Unsafe" if action == "block" else "Safe",
            category_code=category.code if category else bank.spec.category_code,
            category=category.label if category else bank.spec.category_code,
            rationale=f"Matched entry {bank.entry.entry_id} of bank {bank.spec.name} ({how}){note}",
            confidence=None,
            model=ModelInfo(
                name="bank", version=bank.spec.name, triton_model="", triton_version=""
            ),
            decided_by="bank",
            match=bank_match(bank),
            decision=_imposed(policy, action, f"bank:{bank.spec.name}"),
        )


def bank_review(judgement: Judgement, bank: BankMatch | None) -> Judgement:
    """The model's (or a reused) judgement, sent to review because a review bank matched."""
    if bank is None or bank.spec.action != "review":
        return judgement
    return replace(judgement, match=bank_match(bank), review_bank=bank)


def _by_reviewer(policy: Policy, decision: ReviewDecision) -> Judgement:
    category = policy.category(decision.category_code)
    note = f": {decision.note}" if decision.note else ""
    return Judgement(
        rating=decision.rating,
        category_code=decision.category_code,
        category=category.label if category else decision.category_code,
        rationale=f"A reviewer decided {decision.action} on {decision.decided_at:%Y-%m-%d}{note}",
        confidence=None,
        model=ModelInfo(
            name="human", version=decision.reviewer, triton_model="", triton_version=""
        ),
        decided_by="human",
        match=Match(bank="human", entry_id=decision.event_id, kind="sha256"),
        decision=_imposed(policy, decision.action, f"human:{decision.reviewer}"),
    )


def _imposed(policy: Policy, action: Action, reason: str) -> Decision:
    """An action known content decided, as the policy applies it (observe-only allows)."""
    if not policy.decision.enforce:
        return Decision("allow", action, review=False, reasons=(reason, "observe_only"))
    return Decision(action, action, review=action == "review", reasons=(reason,))


def bank_match(bank: BankMatch) -> Match:
    return Match(
        bank=bank.spec.name, entry_id=bank.entry.entry_id, kind=bank.entry.kind,
        distance=bank.distance,
    )  # fmt: skip


def _key(sha256: str, policy: Policy, model: ModelIdentity) -> ReuseKey:
    return ReuseKey(
        image_sha256=sha256,
        policy_id=policy.id,
        policy_version=policy.full_version,
        model_name=model[0],
        model_version=model[1],
    )


class NearDuplicates:
    """The PDQ hashes of the images judged lately, for reusing a near-duplicate's verdict.

    The newest `size` images (by sha256), in the banks' index (`service.core.pdq_index`).
    Per process: with a shared store, a pod finds near-duplicates only of the images it judged
    itself (exact duplicates are found across pods).
    """

    def __init__(self, size: int, distance: int) -> None:
        self._index: PdqIndex[str, str] = PdqIndex()
        self._newest: OrderedDict[str, None] = OrderedDict()
        self._size = size
        self._distance = distance

    def add(self, pdq: Pdq, sha256: str) -> None:
        if sha256 in self._newest:
            self._newest.move_to_end(sha256)
            return
        self._index.add(sha256, pdq.hex, sha256)
        self._newest[sha256] = None
        while len(self._newest) > self._size:
            oldest, _ = self._newest.popitem(last=False)
            self._index.remove(oldest)

    def nearest(self, pdq: Pdq) -> tuple[str, int] | None:
        """(sha256, distance) of the nearest image within the distance; usable hashes only."""
        if not pdq.usable:
            return None
        found = self._index.search(pdq.hex, self._distance)
        return min(found, key=lambda hit: hit[1]) if found else None
