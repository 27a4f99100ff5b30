"""Training logic of the prompt-routed model: losses, the paper's two phases, few-shot fine-tuning."""

from __future__ import annotations

import numpy as np
import torch

from inference.checkpoints import load_network_weights, with_prompt_centre
from lightning_modules.losses import pair_soft_dice
from lightning_modules.task_priorities import TaskPriorities
from lightning_modules.validation import VolumeValidation
from networks.compiled import compile_blocks
from networks.prompt_seg_net import PromptSegNet
from networks.routing import balance_loss, route_separation_loss
from networks.text_encoders import PromptEmbedder, build_text_encoder

TEXT_ENCODER_DIMS = {"minilm": 384}


class PromptSegModule(VolumeValidation):
    """Prompt-based universal CT segmentation (Ouyang et al., MICCAI), trained in two phases.

    Phase 1 (``joint_epochs``) trains everything but the frozen text encoder on all tasks with
    Gumbel-softmax routing. Phase 2 (``path_epochs``) fixes each task's route at the argmax and
    trains only the selected sub-pathways; each therefore learns only from the tasks routed through
    it. The optimiser is rebuilt at the switch, and the phase is stored in the checkpoint.

    With ``init_checkpoint`` and ``finetune_prompt`` it does the paper's few-shot adaptation
    instead: load the weights, route the new prompt, keep only its sub-pathways, freeze the encoder
    (and routers) and fine-tune the decoder.

    Args:
        feature_size: Swin embedding width (paper: 48).
        decoder_channels: bottleneck and five decoder level widths.
        num_paths: sub-pathways per AP module (paper: 6; 1 is the sole-path ablation).
        router_hidden_dim: router hidden width.
        prompt_head: prompt-conditioned output head (off for the ablation).
        level_conditioning: scale and shift each decoder level's features by the prompt (FiLM);
            off is the paper's routing-only decoder (see ``networks/conditioning.py``).
        head_hidden: hidden width of the prompt-generated head (0: a linear 1x1x1 read-out).
        route_head: generate the head from the prompt and its route together (off: the prompt
            alone, the paper); see ``networks/prompt_seg_net.py``.
        input_offset: subtracted from the windowed image, centring soft tissue near 0 so that
            bfloat16 keeps its contrast (see ``networks/prompt_seg_net.py``).
        input_windows: (level, width) in HU of extra input channels, the image re-windowed, e.g.
            ``[[40, 400]]`` for the abdominal soft-tissue window (``networks/intensity.py``); empty:
            the data's one window (the paper).
        channels_last: convolution weights (and so activations) in channels-last 3D memory format:
            the same network, about twice as fast a training step on CPU (``benchmarks/cpu_step.py``).
        compile: compile the encoder, the shared decoder blocks and every sub-pathway with
            ``torch.compile`` in ``configure_model`` (``networks/compiled.py``); routing stays eager
            Python between them. The first steps pay the compilation.
        encoder_depths: Swin blocks per stage (paper: 2, 2, 2, 2).
        window_size: Swin attention window (paper: 7).
        text_encoder: ``minilm`` (offline), ``open_clip`` (the paper's CLIP) or ``table``.
        text_encoder_weights: open_clip weights file or tag, MiniLM folder, or embedding table file.
        clip_model: open_clip architecture (paper: CLIP; default ViT-B-32).
        prompt_template: format string around each prompt, e.g. "a computerized tomography of a {}".
        embedding_dim: prompt embedding size; ``None`` asks the text encoder.
        lr: AdamW learning rate (paper: 2e-4).
        weight_decay: AdamW weight decay (paper: 1e-5).
        betas: AdamW betas (paper: momentum 0.9).
        joint_epochs: phase-1 epochs (paper: 3000).
        path_epochs: phase-2 epochs (paper: 1000).
        temperature_start: Gumbel-softmax temperature at the first epoch.
        temperature_end: temperature reached at the end of phase 1 (exponential decay).
        gumbel_noise_start: Gumbel noise scale at the first epoch (1 is the standard estimator).
        gumbel_noise_end: noise scale reached at the end of phase 1 (linear). Less noise means
            less random exploration of routes; with none, a prompt trains the sub-pathways its
            router currently prefers, which short runs need (a route redrawn every step trains
            six times slower and cannot settle).
        balance_weight: weight of the load-balancing term against routing collapse.
        shared_start_epochs: phase-1 epochs at the start in which every prompt takes candidate 0 at
            every level (one decoder learns from every task, as the sole path does); at their end each
            level's other candidates become copies of it and the routers choose again. 0 is the paper's
            training.
        separation_weight: weight of the term that keeps two prompts of one image whose targets
            differ off one whole route (``networks/routing.py``), phase 1; 0 is the paper's loss.
        router_lr_scale: the routers' learning rate as a fraction of ``lr``. Below 1, routes change
            less often while the sub-pathways learn: each change hands a prompt to a sub-pathway
            that has not learned it, which short runs cannot afford (paper: 1).
        cldice_weight: weight of the soft-clDice term on tubular tasks.
        focal_gamma: 0 for Dice + binary cross-entropy; above 0, the cross-entropy is the focal
            loss with this exponent (see ``lightning_modules/losses.py``).
        ce_top_fraction: cross-entropy over each pair's hardest fraction of voxels (1: all; nnU-Net's
            TopK loss uses 0.1), which keeps small structures from collapsing to background.
        ce_balance: raises a present pair's foreground share of its cross-entropy from its voxel
            fraction ``f`` (0, the voxel mean) to one half (1, class-balanced), ``f**(1-b)``-weighted
            between (see ``lightning_modules/losses.py``).
        task_priority_exponent: weight each pair's loss by ``(1 - its task's running training soft
            Dice) ** exponent``, normalised over the batch, so that the tasks not learned yet take more
            of the shared network's gradient (``lightning_modules/task_priorities.py``; logged as
            ``train/running_dice/<prompt>``, kept per process under DDP, rank 0's in the checkpoint);
            0: every pair alike (the paper).
        deep_supervision: the 1/2, 1/4, ... decoder levels also segment each prompt through a head
            of their own (``networks/prompt_seg_net.py``), their losses weighted 1/2, 1/4, ... of the
            final one (nnU-Net's deep supervision; 0: none, the paper).
        centre_prompts: subtract the mean embedding of the data's task prompts from every prompt
            before the routers and heads read it (set at the start of training, stored with the
            weights; ``networks/prompt_seg_net.py``). Off: the embeddings as the text encoder gives them.
            Data with one task prompt keeps a zero centre (centring would erase its only prompt).
        sw_roi: sliding-window edge (voxels) for validation.
        sw_overlap: sliding-window overlap.
        sw_batch_size: windows per forward pass.
        init_checkpoint: weights to start from (few-shot); loaded as weights only.
        finetune_prompt: the unseen prompt to adapt to (few-shot).
        seed: seed of the per-step Gumbel noise (runs resume exactly).
    """

    def __init__(
        self,
        feature_size: int = 48,
        decoder_channels: tuple[int, ...] = (192, 192, 192, 48, 48, 48),
        num_paths: int = 6,
        router_hidden_dim: int = 256,
        prompt_head: bool = True,
        level_conditioning: bool = False,
        head_hidden: int = 0,
        route_head: bool = False,
        input_offset: float = 0.5,
        input_windows: tuple[tuple[float, float], ...] = (),
        channels_last: bool = True,
        compile: bool = False,
        encoder_depths: tuple[int, ...] = (2, 2, 2, 2),
        window_size: int = 7,
        text_encoder: str = "minilm",
        text_encoder_weights: str | None = None,
        clip_model: str = "ViT-B-32",
        prompt_template: str = "{}",
        embedding_dim: int | None = None,
        lr: float = 2e-4,
        weight_decay: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        joint_epochs: int = 3000,
        path_epochs: int = 1000,
        temperature_start: float = 1.0,
        temperature_end: float = 0.3,
        gumbel_noise_start: float = 1.0,
        gumbel_noise_end: float = 0.0,
        balance_weight: float = 0.01,
        shared_start_epochs: int = 0,
        separation_weight: float = 0.0,
        router_lr_scale: float = 1.0,
        cldice_weight: float = 0.5,
        focal_gamma: float = 0.0,
        ce_top_fraction: float = 1.0,
        ce_balance: float = 0.0,
        task_priority_exponent: float = 0.0,
        deep_supervision: int = 0,
        centre_prompts: bool = False,
        sw_roi: int = 96,
        sw_overlap: float = 0.25,
        sw_batch_size: int = 2,
        init_checkpoint: str | None = None,
        finetune_prompt: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if (init_checkpoint is None) != (finetune_prompt is None):
            raise ValueError("few-shot fine-tuning needs both model.init_checkpoint and model.finetune_prompt")
        if finetune_prompt is not None and not finetune_prompt.strip():
            raise ValueError("model.finetune_prompt is empty")
        if not 0 <= shared_start_epochs <= joint_epochs:
            raise ValueError(
                f"model.shared_start_epochs={shared_start_epochs} must lie in 0..joint_epochs ({joint_epochs})"
            )
        self._embedder: PromptEmbedder | None = None
        self.save_hyperparameters()  # before ``self.embedder``, which reads the text encoder settings
        if embedding_dim is None:
            embedding_dim = TEXT_ENCODER_DIMS.get(text_encoder) or self.embedder.dim
        self.hparams.embedding_dim = embedding_dim
        self.network = PromptSegNet(
            1,
            embedding_dim,
            feature_size,
            decoder_channels,
            num_paths,
            router_hidden_dim,
            prompt_head,
            encoder_depths,
            window_size,
            level_conditioning,
            head_hidden,
            input_offset,
            deep_supervision=deep_supervision,
            channels_last=channels_last,
            route_head=route_head,
            input_windows=input_windows,
        )
        self.prompt_embeddings: dict[str, torch.Tensor] = {}
        self.task_priorities = TaskPriorities(task_priority_exponent) if task_priority_exponent > 0 else None
        self.phase = 1
        self.task_routes: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ prompts
    @property
    def embedder(self) -> PromptEmbedder:
        """The frozen text encoder, loaded only when a prompt has no stored embedding."""
        if self._embedder is None:
            encoder = build_text_encoder(
                self.hparams.text_encoder, self.hparams.text_encoder_weights, self.hparams.clip_model
            )
            self._embedder = PromptEmbedder(encoder, self.hparams.prompt_template)
        return self._embedder

    def embed(self, prompts: list[str]) -> torch.Tensor:
        missing = sorted({p for p in prompts if p not in self.prompt_embeddings})
        if missing:
            self.prompt_embeddings.update(zip(missing, self.embedder(missing)))
        return torch.stack([self.prompt_embeddings[p] for p in prompts]).to(self.device)

    # ------------------------------------------------------------------ setup and phases
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.datamodule is not None:
            embeddings = self.embed(sorted(self.tubular))
            if self.hparams.centre_prompts and not self.hparams.init_checkpoint and len(embeddings) > 1:
                self.network.centre_prompts(embeddings)
        if self.hparams.init_checkpoint and stage == "fit" and not self.task_routes:
            self._prepare_few_shot()

    def configure_model(self) -> None:
        """With ``compile``: compile the network's fixed-structure blocks (after any few-shot trimming)."""
        if self.hparams.compile:
            compile_blocks(self.network)

    @property
    def task_prompts(self) -> list[str]:
        return sorted(self.tubular) if self.tubular else sorted(self.prompt_embeddings)

    def _prepare_few_shot(self) -> None:
        embeddings = load_network_weights(self.network, self.hparams.init_checkpoint)
        self.hparams.input_offset = self.network.input_offset  # what the weights were trained with
        self.prompt_embeddings.update({p: e for p, e in embeddings.items() if p not in self.prompt_embeddings})
        prompt = self.hparams.finetune_prompt
        self.network = self.network.trimmed(self.embed([prompt])).train()
        self.network.encoder.requires_grad_(False)
        for pathway in self.network.pathways:
            pathway.router.requires_grad_(False)
            pathway.fixed_routes = True
        self.phase = 0
        self.task_routes = {prompt: tuple(self.network.routes(self.embed([prompt]))[0].tolist())}

    def enter_path_phase(self) -> None:
        """Phase 2: fix the routes and train only the sub-pathways the tasks select."""
        routes = self.network.routes(self.embed(self.task_prompts))
        self.network.requires_grad_(False)
        for level, pathway in enumerate(self.network.pathways):
            pathway.fixed_routes = True
            for path in routes[:, level].unique().tolist():
                pathway.sub_pathways[str(path)].requires_grad_(True)
        self.phase = 2

    def on_train_epoch_start(self) -> None:
        epoch = self.current_epoch
        if self.datamodule is not None:
            self.datamodule.set_epoch(epoch)
        if self.phase == 1 and epoch < self.hparams.shared_start_epochs:
            for pathway in self.network.pathways:
                pathway.shared_path = 0
        if self.phase == 1:
            progress = epoch / max(self.hparams.joint_epochs - 1, 1)
            start, end = self.hparams.temperature_start, self.hparams.temperature_end
            noise_start, noise_end = self.hparams.gumbel_noise_start, self.hparams.gumbel_noise_end
            self.network.set_routing_schedule(
                start * (end / start) ** progress, noise_start + (noise_end - noise_start) * progress
            )
        self.log("train/phase", float(self.phase))

    def on_train_epoch_end(self) -> None:
        """Switch to phase 2 after the last joint epoch, before the epoch's checkpoint is written
        (so it records phase 2) and before the next epoch's learning-rate warm-up is applied. A
        shared start ends the same way, so its checkpoint already holds the copied candidates."""
        if self.phase == 1 and self.current_epoch + 1 == self.hparams.shared_start_epochs:
            for pathway in self.network.pathways:
                pathway.split_shared_path()
        if self.phase == 1 and self.current_epoch + 1 >= self.hparams.joint_epochs:
            self.enter_path_phase()
            self.trainer.strategy.setup_optimizers(self.trainer)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        torch.manual_seed(int(np.random.SeedSequence([self.hparams.seed, self.global_step]).generate_state(1)[0]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW; the routers' group runs at ``router_lr_scale`` times the lr (``lr_scale`` in the group).
        A run with no joint epochs starts in phase 2."""
        if self.phase == 1 and self.hparams.joint_epochs == 0:
            self.enter_path_phase()
        trainable = [(n, p) for n, p in self.network.named_parameters() if p.requires_grad]
        routers = [p for n, p in trainable if ".router." in n]
        groups = [
            {"params": [p for n, p in trainable if ".router." not in n], "lr_scale": 1.0},
            {"params": routers, "lr_scale": self.hparams.router_lr_scale},
        ]
        groups = [dict(g, lr=self.hparams.lr * g["lr_scale"]) for g in groups if g["params"]]
        return torch.optim.AdamW(groups, betas=tuple(self.hparams.betas), weight_decay=self.hparams.weight_decay)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        output = self.network(batch["image"], self.embed(batch["prompts"]), batch["image_index"])
        if self.task_priorities is not None:
            batch = batch | {"pair_weights": self.prioritise(output.logits, batch)}
        losses = self.supervised_losses(output.logits, batch)
        loss = losses.pop("loss")
        if output.deep_logits:
            loss = losses["deep_supervised"] = self.deep_supervised_loss(loss, output.deep_logits, batch)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=len(batch["prompts"]))
        if self.phase == 1 and self.hparams.balance_weight > 0 and self.hparams.num_paths > 1:
            balance = torch.stack([balance_loss(logits) for logits in output.router_logits]).mean()
            loss = loss + self.hparams.balance_weight * balance
            self.log("train/balance", balance, batch_size=len(batch["prompts"]))
        if self.phase == 1 and self.hparams.separation_weight > 0 and self.hparams.num_paths > 1:
            separation = route_separation_loss(output.router_logits, batch["masks"], batch["image_index"])
            loss = loss + self.hparams.separation_weight * separation
            self.log("train/route_separation", separation, batch_size=len(batch["prompts"]))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["prompts"]))
        return loss

    def prioritise(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """The pairs' loss weights from their tasks' running Dice, then this batch folded in."""
        weights = self.task_priorities.weights(batch["prompts"])  # the losses move them to the logits' device
        with torch.no_grad():
            masks = batch["masks"]
            soft_dice = pair_soft_dice(torch.sigmoid(logits.float()), masks)
            self.task_priorities.update(batch["prompts"], soft_dice, masks.flatten(1).any(1))
        for prompt in set(batch["prompts"]) & self.task_priorities.dice.keys():
            self.log(f"train/running_dice/{prompt}", self.task_priorities.dice[prompt], batch_size=1)
        return weights

    def current_routes(self) -> dict[str, tuple[int, ...]]:
        """Each task prompt's inference route (one sub-pathway index per level)."""
        routes = self.network.routes(self.embed(self.task_prompts))
        return {p: tuple(r.tolist()) for p, r in zip(self.task_prompts, routes)}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["phase"] = self.phase
        checkpoint["prompt_embeddings"] = {p: e.cpu() for p, e in self.prompt_embeddings.items()}
        checkpoint["text_encoder_identity"] = self._text_identity()
        checkpoint["kept_paths"] = [pathway.kept_paths for pathway in self.network.pathways]
        if self.task_priorities is not None:
            checkpoint["task_dice"] = self.task_priorities.state_dict()
        super().on_save_checkpoint(checkpoint)

    def _text_identity(self) -> str:
        if self._embedder is not None:
            return self._embedder.identity
        return (
            f"{self.hparams.text_encoder}:{self.hparams.text_encoder_weights}|template={self.hparams.prompt_template}"
        )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = with_prompt_centre(
            checkpoint["state_dict"], self.network.embedding_dim, prefix="network."
        )
        self.prompt_embeddings.update(checkpoint.get("prompt_embeddings", {}))
        self.tubular.update(checkpoint.get("tubular", {}))
        if self.task_priorities is not None:
            self.task_priorities.load_state_dict(checkpoint.get("task_dice", {}))
        for pathway, kept in zip(self.network.pathways, checkpoint.get("kept_paths", [])):
            pathway.keep_only(set(kept))
        if checkpoint.get("phase") == 2 and self.phase != 2:
            # Phase 2 trains the sub-pathways the trained routers choose: load the weights before
            # choosing (Lightning loads them only after this hook; loading twice is harmless).
            self.load_state_dict(checkpoint["state_dict"])
            self.enter_path_phase()
