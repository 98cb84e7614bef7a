"""`sft.pack`: samples whole into few blocks, truncation only beyond a block, the same blocks for the same order."""

from __future__ import annotations

from collections import Counter

from steer_train.sft import IGNORE, collate, n_loss_tokens, pack


def sample(n: int, tag: int = 0) -> tuple[list[int], list[int]]:
    """n tokens whose ids name the sample (tag) so a split or a mix-up shows; loss on the last token."""
    return [tag] * n, [IGNORE] * (n - 1) + [tag]


def lengths(blocks) -> list[list[int]]:
    return [[len(ids) for ids, _ in block] for block in blocks]


def test_fills_blocks_that_greedy_in_order_packing_leaves_part_empty():
    # In order, 5 | 6 | 5+4 needs three blocks of 10; 5+5 and 6+4 fill two exactly.
    blocks, _ = pack([sample(5), sample(6), sample(5), sample(4)], 10)
    assert sorted(map(sorted, lengths(blocks))) == [[4, 6], [5, 5]]


def test_every_sample_lands_whole_in_exactly_one_block():
    samples = [sample(n, tag) for tag, n in enumerate([7, 3, 9, 2, 5, 5, 8, 1, 4])]
    blocks, truncated = pack(samples, 10)
    packed = [s for block in blocks for s in block]
    assert truncated == 0 and Counter(map(str, packed)) == Counter(map(str, samples))
    assert all(sum(len(ids) for ids, _ in block) <= 10 for block in blocks)


def test_a_sample_longer_than_a_block_is_truncated_to_fill_one():
    blocks, truncated = pack([sample(3, 1), sample(14, 2)], 10)
    assert truncated == 1 and sorted(lengths(blocks)) == [[3], [10]]
    assert [2] * 10 in [ids for block in blocks for ids, _ in block]


def test_equal_lengths_keep_their_input_order():
    blocks, _ = pack([sample(4, tag) for tag in range(6)], 8)
    assert [[ids[0] for ids, _ in block] for block in blocks] == [[0, 1], [2, 3], [4, 5]]


def test_targets_stop_at_each_sample_end():
    """Next-token targets never cross from one packed sample into the next, and count what n_loss_tokens counts."""
    block = [([5, 6, 7], [IGNORE, 6, 7]), ([8, 9], [8, 9])]
    batch = collate([block], 6, pad_id=0)
    assert batch["targets"][0].tolist() == [6, 7, IGNORE, 9, IGNORE, IGNORE]
    assert int((batch["targets"] != IGNORE).sum()) == n_loss_tokens([block]) == 3
