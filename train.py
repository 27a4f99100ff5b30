"""Train, validate, test or predict with LightningCLI: ``python train.py fit --config configs/quickstart.yaml``."""

from lightning.pytorch.cli import LightningCLI

from callbacks.config_logging import SaveAndLogConfig
from datamodules.multitask import MultiTaskDataModule
from lightning_modules.prompt_seg_module import PromptSegModule  # noqa: F401  (the default model)
from lightning_modules.validation import VolumeValidation


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(
        VolumeValidation,
        MultiTaskDataModule,
        subclass_mode_model=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_callback=SaveAndLogConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
