"""When the reference moves (``StepwiseConfig.ref_refresh``): which M(j) is step t's reference.

* ``step`` (sDPO): the reference of step t is M(t-1), the policy as it starts the step.
* ``never`` (the control arm): M0 at every step.
* ``kl`` (2D-Curri-DPO's KL-adaptive refresh, Li & Zhang 2025): before step t ≥ 2 the mean per-token
  ``KL(M(t-1) ‖ R)`` of the policy to the reference R of step t-1 is measured on a fixed probe of the training pairs
  (:func:`scorers.divergence.mean_token_kl`); above ``kl_threshold`` the reference moves to M(t-1), else R stays.
  The decision is taken at chunk boundaries (a step is the unit the driver trains), and recorded in the step's
  record (``reference_step``, ``kl_to_reference``), so a resumed run continues with the same reference.

A reference other than the policy is held as a frozen model: the copy made when it was the policy (kept while
it may be reused), or loaded from its step folder (M0 from the model path) after a resume or where the
``precomputed`` mode released it.

Assumptions:
    ``kl`` measures on every process the same probe with full models (DDP; not under FSDP / ZeRO-3, where a
    process holds shards: refused by the driver).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefreshRule:
    """When the reference moves (``StepwiseConfig.ref_refresh``)."""

    name: str
    help: str  # README.md's refresh table shows it
    measures_kl: bool  # decides on the policy's KL to the current reference (needs a probe and a live reference)
    moves: Callable[[float, float | None], bool]  # (kl_threshold, measured KL or None) -> the reference moves


REFRESH_RULES = {r.name: r for r in (
    RefreshRule("step", "sDPO: the reference of step t is M(t-1), the policy as it starts the step", False,
                lambda threshold, kl: True),
    RefreshRule("never", "M0 at every step: chunked DPO with a fresh optimizer per chunk, the control that separates "
                "the refresh from the chunking", False, lambda threshold, kl: False),
    RefreshRule("kl", "2D-Curri-DPO: before step t the reference moves to M(t-1) only when the mean per-token KL of "
                "M(t-1) to the current reference on a probe of the training pairs exceeds `kl_threshold`", True,
                lambda threshold, kl: kl > threshold),
)}
REFRESH_RULE_NAMES = tuple(REFRESH_RULES)


def kl_probe(dataset, rows: int, seed: int):
    """The fixed probe of ``ref_refresh='kl'``: ``rows`` of ``dataset`` (all when fewer), a seeded sample in row
    order."""
    import random

    return dataset.select(sorted(random.Random(seed).sample(range(len(dataset)), min(rows, len(dataset)))))


def reference_moves(mode: str, threshold: float, measure_kl: Callable[[], float]) -> tuple[bool, float | None]:
    """The refresh rule, at a chunk boundary: whether the reference moves to the policy, and the KL measured for the
    decision (``None`` unless ``mode`` is 'kl'). 'step': always; 'never': never; 'kl': when ``measure_kl()`` (the
    mean per-token KL of the policy to the current reference on the probe) exceeds ``threshold``. The stepwise
    driver (:class:`ReferenceSchedule`) and the drop-in callback (``trainer_plugin.callback``) both decide here."""
    rule = REFRESH_RULES[mode]
    kl = float(measure_kl()) if rule.measures_kl else None
    return rule.moves(threshold, kl), kl


class ReferenceSchedule:
    """Decides and holds step t's reference M(j).

    Args:
        config: the run's ``StepwiseConfig`` (``ref_refresh``, ``kl_threshold``).
        load_model: ``load_model(j)`` loads M(j) from disk (M0 from the model path).
        kl: ``kl(policy, reference)`` on the run's probe (needed for ``ref_refresh='kl'``).
        records: the completed steps' records (a resumed run takes its last reference from them).
    """

    def __init__(self, config, load_model: Callable[[int], object], kl: Callable | None = None,
                 records: list[dict] = ()):
        self.mode, self.threshold = config.ref_refresh, config.kl_threshold
        self.load_model, self.kl = load_model, kl
        self.current = 0
        if records:
            last = records[-1]
            self.current = last.get("reference_step", 0 if self.mode == "never" else last["step"] - 1)
        self._held: tuple[int, object] | None = None

    def decide(self, t: int, policy) -> dict:
        """Choose step t's reference (call once per step, before :meth:`is_policy`); returns the record fields."""
        if t == 1:
            self.current = 0
            return {"reference_step": 0}
        previous = self.current
        moves, kl = reference_moves(self.mode, self.threshold, lambda: self.kl(policy, self.model(previous)))
        if moves:
            self.current = t - 1
        if kl is None:
            return {"reference_step": self.current}
        logger.info("step %d: KL(M(%d) ‖ M(%d)) = %.4g nats/token (threshold %g): reference = M(%d)", t, t - 1,
                    previous, kl, self.threshold, self.current)
        return {"reference_step": self.current, "kl_to_reference": kl}

    def is_policy(self, t: int) -> bool:
        """Whether step t's reference is the policy as it is now, M(t-1)."""
        return self.current == t - 1

    def keep(self, j: int, model) -> None:
        """Hold ``model`` (a frozen M(j)) for reuse by later steps."""
        self._held = (j, model)

    def model(self, j: int):
        """A frozen M(j): the one held, else loaded from disk (and held)."""
        if self._held is None or self._held[0] != j:
            self._held = None
            model = self.load_model(j)
            model.eval()
            model.requires_grad_(False)
            self._held = (j, model)
        return self._held[1]

    def release(self) -> None:
        """Drop the held model (the ``precomputed`` mode keeps no reference in memory while training)."""
        self._held = None
