"""Shared check of the block-wise stages' resume: a run killed after its first block, re-run, equals an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from upq.ptq.blockwise import BlockResult, BlockwiseConfig, blockwise_ptq


def assert_resume_is_bit_identical(model_dir: Path, cfg: BlockwiseConfig, tmp_path: Path) -> None:
    """Kill a run after block 0, resume it, and compare every result and tensor with an uninterrupted run."""
    full, _, full_results = blockwise_ptq(str(model_dir), cfg, tmp_path / "a")

    def crash(result: BlockResult) -> None:
        if result.index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        blockwise_ptq(str(model_dir), cfg, tmp_path / "b", on_block_done=crash)
    resumed, _, resumed_results = blockwise_ptq(str(model_dir), cfg, tmp_path / "b")
    assert [r.mse_after for r in resumed_results] == [r.mse_after for r in full_results]
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
