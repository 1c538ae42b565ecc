"""LightningCLI sets the strategy by name and by class_path with typed init_args."""

from __future__ import annotations

import pytest

from lightning_megatrain import MegaTrainStrategy
from models import BlockLM

pytest.importorskip("jsonargparse")


class CLIModel(BlockLM):
    def __init__(self, d: int = 16, n: int = 3) -> None:
        super().__init__(d=d, n=n)


def _cli(args: list[str]):  # type: ignore[no-untyped-def]
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(CLIModel, args=args, run=False, save_config_callback=None)


def test_strategy_by_name() -> None:
    cli = _cli(["--trainer.strategy=megatrain", "--trainer.accelerator=cpu", "--trainer.logger=false"])
    assert isinstance(cli.trainer.strategy, MegaTrainStrategy)


def test_strategy_by_class_path_with_init_args() -> None:
    cli = _cli(
        [
            "--trainer.strategy=lightning_megatrain.MegaTrainStrategy",
            "--trainer.strategy.init_args.prefetch=3",
            "--trainer.strategy.init_args.layer_cls=[Block]",
            "--trainer.strategy.init_args.pin_memory=false",
            "--trainer.strategy.init_args.check_memory=false",
            "--trainer.accelerator=cpu",
            "--trainer.precision=bf16-mixed",
            "--trainer.logger=false",
        ]
    )
    strategy = cli.trainer.strategy
    assert isinstance(strategy, MegaTrainStrategy)
    assert strategy.config.prefetch == 3
    assert strategy.config.layer_cls == ["Block"]
    assert strategy.config.pin_memory is False and strategy.check_memory is False
    assert cli.trainer.precision_plugin.precision == "bf16-mixed"


def test_bad_init_arg_type_is_rejected() -> None:
    with pytest.raises(SystemExit):
        _cli(["--trainer.strategy=lightning_megatrain.MegaTrainStrategy", "--trainer.strategy.init_args.prefetch=fast"])


def test_weights_flag(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for flag in ("--trainer.strategy.weights", "--trainer.strategy.init_args.weights"):
        cli = _cli(
            [
                "--trainer.strategy=lightning_megatrain.MegaTrainStrategy",
                f"{flag}={tmp_path}",
                "--trainer.strategy.weights_prefix=net.",
                "--trainer.accelerator=cpu",
                "--trainer.logger=false",
            ]
        )
        strategy = cli.trainer.strategy
        assert isinstance(strategy, MegaTrainStrategy)
        assert str(strategy.weights) == str(tmp_path) and strategy.weights_prefix == "net."
