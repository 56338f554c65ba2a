"""The masked reference itself, against a literal reading of the rule."""

import torch

from rlkv.attention.reference import keep_keys_mask, masked_attention, token_positions


def test_token_positions_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos, valid = token_positions(mask, 2, 5, "cpu")
    assert pos.tolist() == [[-1, -1, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert valid.tolist() == [[False, False, True, True, True], [True] * 5]


def test_keep_keys_mask_matches_the_rule_literally():
    sink, recent, n = 2, 3, 12
    pos = torch.arange(n)[None]
    full = torch.tensor([True, False])
    mask = keep_keys_mask(pos, pos, full, sink, recent)
    for t in range(n):
        for j in range(n):
            assert mask[0, 0, t, j] == (j <= t)
            assert mask[0, 1, t, j] == (j <= t and (j < sink or t - recent < j))


def test_block_rule_is_the_authors_block_streaming():
    """Block 4, sink 4, recent 8 (1 sink block, 2 recent blocks): a query in block b sees block 0 and
    blocks b-1 and b up to itself, so 5 to 8 recent keys (the authors' block_streaming_attn_func)."""
    pos = torch.arange(20)[None]
    mask = keep_keys_mask(pos, pos, torch.tensor([False]), sink=4, recent=8, block=4)
    for t in range(20):
        blocks = {0, t // 4 - 1, t // 4}
        assert mask[0, 0, t].tolist() == [j <= t and j // 4 in blocks for j in range(20)], t
    rounded = keep_keys_mask(pos, pos, torch.tensor([False]), sink=3, recent=6, block=4)  # sizes round up
    assert torch.equal(rounded, mask)
    assert torch.equal(  # block 1 is the token-exact rule
        keep_keys_mask(pos, pos, torch.tensor([False]), 2, 3, block=1),
        keep_keys_mask(pos, pos, torch.tensor([False]), 2, 3),
    )


def test_keep_keys_mask_full_prefill_rule_per_row():
    """prompt_len [batch]: prompt queries of a compressed head attend causally to every key, later ones stream."""
    sink, recent, n = 1, 2, 9
    pos = torch.stack([torch.arange(n), torch.arange(n) - 2]).masked_fill(
        torch.tensor([[False] * n, [True, True] + [False] * 7]), -1
    )
    prompt_len = torch.tensor([6, 3])
    mask = keep_keys_mask(pos, pos, torch.tensor([False]), sink, recent, prompt_len=prompt_len)
    for row in range(2):
        for t in range(n):
            for j in range(n):
                qt, kj = int(pos[row, t]), int(pos[row, j])
                streaming = kj < sink or qt - recent < kj
                expected = kj >= 0 and kj <= qt and (qt < int(prompt_len[row]) or streaming)
                assert bool(mask[row, 0, t, j]) == expected, (row, t, j)
    assert torch.equal(
        keep_keys_mask(pos, pos, torch.tensor([False]), sink, recent, prompt_len=0),
        keep_keys_mask(pos, pos, torch.tensor([False]), sink, recent),
    )


def test_keep_keys_mask_window_and_padding():
    pos = torch.tensor([[-1, 0, 1, 2, 3, 4]])
    mask = keep_keys_mask(pos, pos, torch.tensor([True]), sink=1, recent=1, window=2)
    assert not mask[0, 0, :, 0].any()  # padding is never attended
    assert mask[0, 0, 5].tolist() == [False, False, False, False, True, True]


def test_masked_attention_equals_per_head_softmax_with_gqa():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mask = torch.rand(1, 2, 5, 5) > 0.3
    mask[..., 0] = True
    out = masked_attention(q, k, v, mask, scaling=0.5)
    for h in range(4):
        kv = h // 2
        s = (q[0, h] @ k[0, kv].T) * 0.5
        s[~mask[0, kv]] = float("-inf")
        expected = torch.softmax(s, -1) @ v[0, kv]
        torch.testing.assert_close(out[0, :, h], expected)
