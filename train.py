"""Train, validate, test or predict with LightningCLI: ``python train.py fit --config configs/quickstart.yaml``.

Before fitting, the data registry and every case are checked; all problems are printed together,
one ``error:`` line each, and the run stops with exit code 2 before any log folder is made.
bfloat16 on a CPU without native bfloat16 kernels (AVX512-BF16 or AMX) is warned about: it runs,
many times slower than 32-bit (about 20x a quickstart step on a 2-core AVX2 EPYC), so ``quickstart.sh``
asks ``cpu_has_native_bf16`` and trains in 32-bit there.
"""

import sys

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.cli import LightningCLI

from callbacks.config_logging import SaveAndLogConfig
from datamodules.multitask import MultiTaskDataModule
from datamodules.registry import RegistryError
from datamodules.volumes import BadCaseError
from lightning_modules.prompt_seg_module import PromptSegModule  # noqa: F401  (the default model)
from lightning_modules.validation import VolumeValidation


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), which oneDNN uses for bf16 convolutions."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


class PromptSegCLI(LightningCLI):
    """LightningCLI that checks the data before ``fit`` makes any output."""

    def before_fit(self) -> None:
        try:
            self.datamodule.setup("fit")
        except (RegistryError, BadCaseError, FileNotFoundError, ValueError) as error:
            for line in str(error).splitlines():
                print(f"error: {line.strip()}", file=sys.stderr)
            sys.exit(2)
        if (
            isinstance(self.trainer.accelerator, CPUAccelerator)
            and str(self.trainer.precision).startswith("bf16")
            and not cpu_has_native_bf16()
        ):
            print(
                f"warning: trainer.precision {self.trainer.precision} on a CPU without native bfloat16 "
                "(AVX512-BF16/AMX) is slow; use --trainer.precision 32-true",
                file=sys.stderr,
            )


def main(args: list[str] | None = None) -> LightningCLI:
    return PromptSegCLI(
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
