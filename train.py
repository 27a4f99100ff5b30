"""Train, validate, test or predict with LightningCLI: ``python train.py fit --config configs/quickstart.yaml``."""

from lightning.pytorch.cli import LightningCLI

from callbacks.config_logging import SaveAndLogConfig
from datamodules.multitask import MultiTaskDataModule
from lightning_modules.prompt_seg_module import PromptSegModule


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(
        PromptSegModule,
        MultiTaskDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_callback=SaveAndLogConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
