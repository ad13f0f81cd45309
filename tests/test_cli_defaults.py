"""Every CLI flag that sets a config field defaults to that field's dataclass default, and builds the same config."""

from __future__ import annotations

import argparse

import pytest

from upq import cli
from upq.cli_fields import as_flag, config_from_args, field_default
from upq.distill.config import DistillConfig
from upq.evaluation.runner import EvalSettings
from upq.ptq.blockwise import BlockwiseConfig
from upq.ptq.rtn import RTNStage

# flags that set no config field: where to read and write, logging, the device, what to load
NOT_CONFIG = {
    "distill": {"out", "work_dir", "keep_work_dir", "quiet", "log_file", "help"},
    "quantize": {"model", "recipe", "budget", "set", "add_stage", "method", "dtype", "out", "work_dir", "keep_work_dir", "device",
                 "quiet", "log_file", "help", *cli.GRID_FIELDS},
    "eval": {"model", "reference", "device", "out", "compare", "quiet", "log_file", "help"},
}
CONFIGS = {"distill": (DistillConfig, cli.DISTILL_FIELDS), "quantize": (BlockwiseConfig, cli.BLOCKWISE_FIELDS),
           "eval": (EvalSettings, cli.EVAL_FIELDS)}


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_flag_default_is_its_dataclass_default(command: str) -> None:
    cls, fields = CONFIGS[command]
    actions = {a.dest: a for a in _subparser(command)._actions}
    unclassified = set(actions) - set(fields) - NOT_CONFIG[command]
    assert not unclassified, f"upq {command}: flags that neither map to a {cls.__name__} field nor are listed as CLI-only"
    assert not set(fields) - set(actions), "mapped fields without a flag"
    for dest, paths in fields.items():
        for path in paths:
            default = field_default(cls, path)
            if path.startswith("!"):
                assert actions[dest].default is False and default is True, (command, dest)
            else:
                assert actions[dest].default == as_flag(path, default), (command, dest, actions[dest].default, default)


def test_quantize_grid_defaults_follow_the_method() -> None:
    actions = {a.dest: a for a in _subparser("quantize")._actions}
    assert all(actions[d].default is None for d in cli.GRID_FIELDS)  # resolved per method
    assert field_default(RTNStage, "bits") == 2 and field_default(BlockwiseConfig, "bits") == 4


def test_flags_left_at_their_defaults_build_the_default_config(tmp_path) -> None:
    args = cli.build_parser().parse_args(["distill", "--from", str(tmp_path), "--steps", "3", "--out", "x"])
    built = config_from_args(DistillConfig, cli.DISTILL_FIELDS, args)
    assert built == DistillConfig(int4_dir=str(tmp_path), steps=3)
    args = cli.build_parser().parse_args(["distill", "--from", str(tmp_path), "--steps", "3", "--out", "x",
                                          "--no-mask-prompt", "--train", "scales", "--group-size", "64", "--seed", "7",
                                          "--teacher", "org/teacher", "--keep-checkpoints", "3"])
    built = config_from_args(DistillConfig, cli.DISTILL_FIELDS, args)
    assert (built.data.mask_prompt, built.train, built.group_size, built.seed, built.data.chat.seed) == (False, ("scales",), 64, 7, 7)
    assert (built.teacher, built.keep_checkpoints) == ("org/teacher", 3)
    args = cli.build_parser().parse_args(["quantize", "--method", "blockwise-ptq", "--out", "x"])
    assert config_from_args(BlockwiseConfig, cli.BLOCKWISE_FIELDS, args) == BlockwiseConfig()
