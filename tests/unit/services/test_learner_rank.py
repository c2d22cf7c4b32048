"""LearnerRank's abandon rule, on the class Ray wraps (no actor, no DeepSpeed)."""

from __future__ import annotations

from services.learner_rank import LearnerRank


class _Transport:
    abandoned = 0

    def abandon(self):
        self.abandoned += 1


def test_abandon_drops_only_a_group_planned_before_the_death_was_known():
    rank = object.__new__(LearnerRank.__ray_metadata__.modified_class)
    rank.transport, rank._groups_formed = _Transport(), 3
    rank.abandon_weight_group(2)  # the owner knew of 2 groups: the third was planned after the death
    assert rank.transport.abandoned == 0
    rank.abandon_weight_group(3)  # the current group may hold the dead member
    rank.abandon_weight_group()
    assert rank.transport.abandoned == 2
