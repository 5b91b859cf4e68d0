"""domain.commit_tracker: a transport position is released only behind fully acked batches."""

from __future__ import annotations

import random

import pytest

from domain.commit_tracker import CommitTracker


def test_single_batch_single_sink_released_after_ack() -> None:
    tracker: CommitTracker[int] = CommitTracker()
    tracker.register(1, ["pg"], {"p0": 100})

    assert tracker.take_committable("p0") is None
    assert tracker.pending_count("p0") == 1

    tracker.ack(1, "pg")
    assert tracker.take_committable("p0") == 100
    assert tracker.pending_count("p0") == 0
    # Nothing new: a second take returns nothing rather than repeating the checkpoint.
    assert tracker.take_committable("p0") is None


def test_later_batch_acked_first_never_passes_earlier_unfinished_one() -> None:
    tracker: CommitTracker[int] = CommitTracker()
    tracker.register(1, ["pg"], {"p0": 10})
    tracker.register(2, ["pg"], {"p0": 20})
    tracker.register(3, ["pg"], {"p0": 30})

    tracker.ack(3, "pg")
    tracker.ack(2, "pg")
    assert tracker.take_committable("p0") is None
    assert tracker.pending_count("p0") == 3

    tracker.ack(1, "pg")
    assert tracker.take_committable("p0") == 30
    assert tracker.pending_count("p0") == 0


def test_release_stops_at_first_unfinished_batch() -> None:
    tracker: CommitTracker[int] = CommitTracker()
    for batch_id in (1, 2, 3, 4):
        tracker.register(batch_id, ["pg"], {"p0": batch_id * 10})

    tracker.ack(1, "pg")
    tracker.ack(2, "pg")
    tracker.ack(4, "pg")
    assert tracker.take_committable("p0") == 20
    assert tracker.pending_count("p0") == 2

    tracker.ack(3, "pg")
    assert tracker.take_committable("p0") == 40


def test_batch_with_several_sinks_needs_every_ack() -> None:
    tracker: CommitTracker[str] = CommitTracker()
    tracker.register(1, ["pg", "webhook", "iceberg"], {"p0": "lsn-1"})

    tracker.ack(1, "pg")
    assert tracker.take_committable("p0") is None
    tracker.ack(1, "iceberg")
    assert tracker.take_committable("p0") is None
    tracker.ack(1, "webhook")
    assert tracker.take_committable("p0") == "lsn-1"


def test_batch_with_no_targets_is_done_at_once() -> None:
    tracker: CommitTracker[int] = CommitTracker()
    tracker.register(1, [], {"p0": 5})
    assert tracker.take_committable("p0") == 5
    assert tracker.pending_count() == 0


def test_batch_with_no_targets_waits_behind_an_unfinished_predecessor() -> None:
    tracker: CommitTracker[int] = CommitTracker()
    tracker.register(1, ["pg"], {"p0": 5})
    tracker.register(2, [], {"p0": 6})
    assert tracker.take_committable("p0") is None

    tracker.ack(1, "pg")
    assert tracker.take_committable("p0") == 6


def test_none_checkpoints_in_between_return_newest_real_checkpoint() -> None:
    tracker: CommitTracker[int] = CommitTracker()
    tracker.register(1, ["pg"], {"p0": 10})
    tracker.register(2, ["pg"], {"p0": 20})
    tracker.register(3, ["pg"], {"p0": None})
    tracker.register(4, ["pg"], {"p0": None})
    for batch_id in (4, 3, 2, 1):
        tracker.ack(batch_id, "pg")

    assert tracker.take_committable("p0") == 20
    assert tracker.pending_count("p0") == 0


def test_done_prefix_of_only_none_checkpoints_returns_none_but_pops_them() -> None:
    tracker: CommitTracker[int] = CommitTracker()
    tracker.register(1, ["pg"], {"p0": None})
    tracker.register(2, ["pg"], {"p0": None})
    tracker.register(3, ["pg"], {"p0": 30})
    tracker.ack(1, "pg")
    tracker.ack(2, "pg")

    assert tracker.take_committable("p0") is None
    assert tracker.pending_count("p0") == 1

    tracker.ack(3, "pg")
    assert tracker.take_committable("p0") == 30


def test_partitions_are_independent() -> None:
    tracker: CommitTracker[int] = CommitTracker()
    tracker.register(1, ["pg"], {"a": 100})
    tracker.register(2, ["pg"], {"b": 200})
    tracker.register(3, ["pg"], {"a": 300})
    tracker.register(4, ["pg"], {"b": 400})

    # Partition b finishing does not depend on partition a's unfinished batch 1.
    tracker.ack(2, "pg")
    tracker.ack(4, "pg")
    tracker.ack(3, "pg")
    assert tracker.take_committable("a") is None
    assert tracker.take_committable("b") == 400
    assert tracker.pending_count("a") == 2
    assert tracker.pending_count("b") == 0
    assert tracker.pending_count() == 2

    tracker.ack(1, "pg")
    assert tracker.take_committable("a") == 300
    assert set(tracker.lanes()) == {"a", "b"}


def test_unknown_partition_has_nothing_committable() -> None:
    tracker: CommitTracker[int] = CommitTracker()
    assert tracker.take_committable("nope") is None
    assert tracker.pending_count("nope") == 0


def test_ack_of_unknown_batch_is_ignored() -> None:
    """Late acks (a batch of a revoked lane, a resent batch acked twice) change nothing."""
    tracker: CommitTracker[int] = CommitTracker()
    tracker.register(1, ["pg"], {"p0": 1})
    assert tracker.ack(99, "pg") == ()
    assert tracker.waiting_sinks() == {"pg": 1}


def test_ack_of_released_batch_is_ignored() -> None:
    tracker: CommitTracker[int] = CommitTracker()
    tracker.register(1, ["pg"], {"p0": 1})
    assert tracker.ack(1, "pg") == ("p0",)
    assert tracker.take_committable("p0") == 1
    assert tracker.ack(1, "pg") == ()
    assert tracker.take_committable("p0") is None


def test_ack_from_a_sink_that_is_not_a_target_raises() -> None:
    tracker: CommitTracker[int] = CommitTracker()
    tracker.register(1, ["pg"], {"p0": 1})
    with pytest.raises(ValueError, match="not a target"):
        tracker.ack(1, "webhook")
    assert tracker.take_committable("p0") is None
    assert tracker.waiting_sinks() == {"pg": 1}


def test_duplicate_ack_is_tolerated_and_counts_once() -> None:
    tracker: CommitTracker[int] = CommitTracker()
    tracker.register(1, ["pg", "webhook"], {"p0": 7})
    tracker.ack(1, "pg")
    tracker.ack(1, "pg")  # a replayed ack must neither raise nor stand in for webhook's
    assert tracker.take_committable("p0") is None
    assert tracker.waiting_sinks() == {"webhook": 1}

    tracker.ack(1, "webhook")
    tracker.ack(1, "webhook")
    assert tracker.take_committable("p0") == 7


def test_register_same_batch_twice_raises() -> None:
    tracker: CommitTracker[int] = CommitTracker()
    tracker.register(1, ["pg"], {"p0": 1})
    with pytest.raises(ValueError, match="twice"):
        tracker.register(1, ["pg"], {"p0": 2})
    with pytest.raises(ValueError, match="twice"):
        tracker.register(1, ["pg"], {"p1": 2})


def test_register_out_of_order_raises() -> None:
    tracker: CommitTracker[int] = CommitTracker()
    tracker.register(5, ["pg"], {"p0": 50})
    with pytest.raises(ValueError, match="out of order"):
        tracker.register(4, ["pg"], {"p0": 40})
    # The rejected batch was not recorded.
    assert tracker.pending_count("p0") == 1
    assert tracker.ack(4, "pg") == ()


def test_lower_batch_id_in_another_partition_is_fine() -> None:
    tracker: CommitTracker[int] = CommitTracker()
    tracker.register(5, ["pg"], {"p0": 50})
    tracker.register(4, ["pg"], {"p1": 40})
    tracker.ack(4, "pg")
    assert tracker.take_committable("p1") == 40


def test_targets_iterable_is_copied() -> None:
    tracker: CommitTracker[int] = CommitTracker()
    targets = ["pg", "webhook"]
    tracker.register(1, targets, {"p0": 1})
    targets.clear()
    assert tracker.waiting_sinks() == {"pg": 1, "webhook": 1}
    tracker.register(2, (s for s in ["pg"]), {"p0": 2})  # a one-shot generator works too
    assert tracker.waiting_sinks() == {"pg": 2, "webhook": 1}


def test_waiting_sinks_counts_unfinished_batches_per_sink() -> None:
    tracker: CommitTracker[int] = CommitTracker()
    assert tracker.waiting_sinks() == {}
    tracker.register(1, ["pg", "webhook"], {"a": 1})
    tracker.register(2, ["pg"], {"a": 2})
    tracker.register(3, ["webhook", "iceberg"], {"b": 3})
    assert tracker.waiting_sinks() == {"pg": 2, "webhook": 2, "iceberg": 1}

    tracker.ack(2, "pg")  # done but stuck behind batch 1: no longer waits on pg
    assert tracker.waiting_sinks() == {"pg": 1, "webhook": 2, "iceberg": 1}

    tracker.ack(3, "webhook")
    tracker.ack(3, "iceberg")
    assert tracker.waiting_sinks() == {"pg": 1, "webhook": 1}

    tracker.ack(1, "pg")
    tracker.ack(1, "webhook")
    assert tracker.waiting_sinks() == {}


# --- randomized property ---------------------------------------------------------------------

SINKS = ("pg", "webhook", "iceberg", "dlq")


def _run_random_scenario(seed: int) -> None:
    """Random batches (random targets, some None checkpoints) in a few partitions, acked in a
    random order (with duplicates), with take_committable called at random moments.

    Reference model: for each partition the committable checkpoint is the max checkpoint of
    the longest prefix of batches whose every target acked. Checkpoints grow with the
    batch id, so the tracker's "newest" and the model's "max" must agree.
    """
    rng = random.Random(seed)
    tracker: CommitTracker[int] = CommitTracker()
    partitions = [f"p{i}" for i in range(rng.randint(1, 3))]

    # batch id -> (partition, targets, checkpoint)
    batches: dict[int, tuple[str, frozenset[str], int | None]] = {}
    order: dict[str, list[int]] = {p: [] for p in partitions}
    batch_id = 0
    for _ in range(rng.randint(1, 40)):
        batch_id += rng.randint(1, 3)  # ids increase but need not be contiguous
        partition = rng.choice(partitions)
        targets = frozenset(rng.sample(SINKS, rng.randint(0, len(SINKS))))
        checkpoint = None if rng.random() < 0.3 else batch_id * 1000
        batches[batch_id] = (partition, targets, checkpoint)
        order[partition].append(batch_id)
        tracker.register(batch_id, sorted(targets), {partition: checkpoint})

    acks = [(b, s) for b, (_, targets, _) in batches.items() for s in targets]
    acks += rng.sample(acks, len(acks) // 4)  # some duplicates
    rng.shuffle(acks)

    acked: dict[int, set[str]] = {b: set() for b in batches}
    released: dict[str, int] = dict.fromkeys(partitions, 0)  # count of released batches
    best_returned: dict[str, int | None] = dict.fromkeys(partitions)

    def done(b: int) -> bool:
        return acked[b] >= batches[b][1]

    def check_take(partition: str) -> None:
        ids = order[partition]
        start = released[partition]
        end = start
        while end < len(ids) and done(ids[end]):
            end += 1
        newly = [batches[b][2] for b in ids[start:end] if batches[b][2] is not None]
        expected_now = max(newly) if newly else None

        got = tracker.take_committable(partition)
        assert got == expected_now, (seed, partition, ids, start, end)
        released[partition] = end
        if got is not None:
            best_returned[partition] = got
        # Cumulatively, the newest committed position equals the model's watermark.
        prefix = [batches[b][2] for b in ids[:end] if batches[b][2] is not None]
        assert best_returned[partition] == (max(prefix) if prefix else None), seed
        assert tracker.pending_count(partition) == len(ids) - end, seed

    for b, sink in acks:
        if b in batches and released[batches[b][0]] > order[batches[b][0]].index(b):
            # Already released: a late duplicate of a released batch is ignored.
            assert tracker.ack(b, sink) == ()
            continue
        tracker.ack(b, sink)
        acked[b].add(sink)
        if rng.random() < 0.3:
            check_take(rng.choice(partitions))

        expected_waiting: dict[str, int] = {}
        for p in partitions:
            for pending in order[p][released[p] :]:
                for s in batches[pending][1] - acked[pending]:
                    expected_waiting[s] = expected_waiting.get(s, 0) + 1
        assert tracker.waiting_sinks() == expected_waiting, seed

    for p in partitions:
        check_take(p)
        assert tracker.pending_count(p) == 0, seed
    assert tracker.pending_count() == 0
    assert tracker.waiting_sinks() == {}


@pytest.mark.parametrize("seed_block", range(10))
def test_random_ack_orders_release_exactly_the_fully_acked_prefix(seed_block: int) -> None:
    for seed in range(seed_block * 100, seed_block * 100 + 100):
        _run_random_scenario(seed)


def test_lanes_of_tracked_and_released_batches() -> None:
    tracker: CommitTracker[int] = CommitTracker()
    tracker.register(1, ["pg"], {"a": 1})
    tracker.register(2, ["pg"], {"b": 2})
    assert tracker.lanes_of(1) == ("a",)
    assert tracker.lanes_of(2) == ("b",)
    assert tracker.lanes_of(3) == ()

    tracker.ack(1, "pg")
    assert tracker.lanes_of(1) == ("a",)  # acked but not yet released
    assert tracker.take_committable("a") == 1
    assert tracker.lanes_of(1) == ()
    assert tracker.lanes_of(2) == ("b",)


def test_every_handle_of_the_done_prefix_is_released_in_order() -> None:
    """Per-message acks (Pub/Sub) need all of them, not only the newest."""
    tracker: CommitTracker[str] = CommitTracker()
    for batch_id, handle in ((1, "m1"), (2, None), (3, "m3"), (4, "m4")):
        tracker.register(batch_id, ["pg"], {"lane": handle})
    for batch_id in (3, 1, 2):
        tracker.ack(batch_id, "pg")
    assert tracker.take_released("lane") == ["m1", "m3"]
    assert tracker.take_released("lane") == []
    tracker.ack(4, "pg")
    assert tracker.take_released("lane") == ["m4"]


def test_one_batch_may_carry_several_lanes() -> None:
    tracker: CommitTracker[int] = CommitTracker()
    tracker.register(1, ["pg"], {"a": 10})
    tracker.register(2, ["pg"], {"a": 20, "b": 200})
    tracker.register(3, ["pg"], {"b": 300})
    tracker.ack(2, "pg")
    tracker.ack(3, "pg")
    assert tracker.take_released("b") == [200, 300]
    assert tracker.take_released("a") == []  # batch 1 is not done
    assert tracker.lanes_of(2) == ("a",)
    tracker.ack(1, "pg")
    assert tracker.take_released("a") == [10, 20]
    assert tracker.pending_count() == 0


def test_revoked_lanes_are_forgotten_and_nothing_of_theirs_is_released() -> None:
    tracker: CommitTracker[int] = CommitTracker()
    tracker.register(1, ["pg"], {"a": 10})
    tracker.register(2, ["pg"], {"a": 20, "b": 200})
    tracker.register(3, ["pg"], {"b": 300})
    assert tracker.revoke(["a"]) == 2
    assert tracker.lanes() == ("b",)
    assert tracker.lanes_of(1) == () and tracker.lanes_of(2) == ("b",)
    # Late acks of the abandoned batch are ignored; the shared batch still counts for b.
    assert tracker.ack(1, "pg") == ()
    tracker.ack(2, "pg")
    tracker.ack(3, "pg")
    assert tracker.take_released("a") == []
    assert tracker.take_released("b") == [200, 300]
    assert tracker.pending_count() == 0
