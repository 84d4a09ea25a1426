"""``SegmentationModule``: the LightningModule that trains a 2D segmentation network on slices.

Loss: cross-entropy, optionally plus soft Dice over the foreground classes, optionally with deep
supervision (the same loss on the decoder's coarser levels, through 1x1 heads that only training
uses: the exported network is unchanged). Metrics (torchmetrics,
accumulated over the epoch): Dice and Jaccard per class and their mean over the two hippocampus
classes. TensorBoard gets scalars and, once per ``log_images_every_n_epochs``, an image grid of
input / ground truth / prediction / foreground probability. The test stage segments every test
volume whole and computes 3D per-volume metrics (:mod:`hippo.metrics`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.segmentation import DiceScore

from hippo.model.slicewise import segment_slices
from hippo.metrics import summarize, volume_metrics

# RGB colours of the label overlay: background black, anterior orange, posterior cyan.
LABEL_COLOURS = torch.tensor([[0, 0, 0], [255, 140, 0], [0, 200, 255]], dtype=torch.float32) / 255


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """``1 -`` mean soft Dice over the foreground classes, computed over the whole batch.

    Args:
        logits: ``(N, C, H, W)``.
        target: ``(N, H, W)`` int64 class indices.
    """
    probs = torch.softmax(logits.float(), 1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()[:, 1:]
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1 - ((2 * inter + eps) / (denom + eps)).mean()


class SegmentationModule(L.LightningModule):
    """Slice-wise segmentation training.

    Args:
        net: the network, ``(N, 1, H, W) -> (N, C, H, W)`` logits (e.g. :class:`hippo.model.unet.UNet`).
        optimizer: a partial optimizer factory taking the parameters (``_partial_: true`` in config).
        scheduler: an optional partial LR-scheduler factory taking the optimizer.
        scheduler_monitor: metric a ``ReduceLROnPlateau`` scheduler watches.
        loss: ``"ce"`` or ``"ce_dice"``.
        dice_weight: weight of the soft-Dice term in ``"ce_dice"``.
        class_names: names of the classes, background first.
        log_images_every_n_epochs: 0 disables the image grids.
        test_batch_size: slices per forward pass when segmenting test volumes.
        augmentation: an optional batch augmentation ``(image, label) -> (image, label)`` run on
            training batches only (e.g. :class:`hippo.data.augment.SliceAugmentation`).
        largest_component: post-process whole-volume predictions (test stage and the exported
            model) by keeping the largest connected foreground component.
        deep_supervision: number of coarser decoder levels (1/2, 1/4, ... resolution) that also get
            the loss during training, each through its own 1x1 head to class logits, against the
            label sub-sampled to that resolution; level ``i`` weighs ``2**-i`` of the full-resolution
            loss, and the weights are normalised to sum to 1 (as in nnU-Net). 0 = off. Needs a
            :class:`hippo.model.unet.UNet` with more than ``deep_supervision`` levels; the heads are
            not part of ``net``, so the exported model and inference are unchanged.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_monitor: str = "val/dice_mean",
        loss: str = "ce_dice",
        dice_weight: float = 1.0,
        class_names: Sequence[str] = ("background", "anterior", "posterior"),
        log_images_every_n_epochs: int = 1,
        test_batch_size: int = 64,
        augmentation: nn.Module | None = None,
        largest_component: bool = False,
        deep_supervision: int = 0,
    ):
        super().__init__()
        if loss not in ("ce", "ce_dice"):
            raise ValueError(f"loss must be 'ce' or 'ce_dice', got {loss!r}")
        if deep_supervision < 0:
            raise ValueError(f"deep_supervision must be >= 0, got {deep_supervision}")
        self.save_hyperparameters(ignore=["net", "augmentation"], logger=False)
        self.net = net
        self.augmentation = augmentation
        self.class_names = list(class_names)
        n = len(self.class_names)
        metrics = MetricCollection({
            "dice": DiceScore(num_classes=n, average="none", aggregation_level="global", input_format="index"),
            "jaccard": MulticlassJaccardIndex(num_classes=n, average="none"),
        })
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.val_dice_best = MaxMetric()
        self.test_results: list[dict[str, Any]] = []
        self._image_batch: dict[str, Any] | None = None
        self._decoder_features: list[torch.Tensor] = []
        self.deep_heads = self._attach_deep_supervision(int(deep_supervision), n)

    def _attach_deep_supervision(self, levels: int, num_classes: int) -> nn.ModuleList:
        """1x1 heads for the decoder outputs of UNet levels ``1..levels`` (kept by forward hooks)."""
        heads = nn.ModuleList()
        if levels == 0:
            return heads
        block = getattr(getattr(self.net, "model", None), "submodule", None)
        for level in range(1, levels + 1):
            if block is None or getattr(block, "submodule", None) is None:
                raise ValueError(f"deep_supervision={levels} needs a UNet with more than {levels} levels "
                                 f"(model.net.num_downs > {levels})")
            heads.append(nn.Conv2d(block.up.out_channels, num_classes, kernel_size=1))   # the level's filters
            block.register_forward_hook(self._keep_decoder_output)
            block = block.submodule
        return heads

    def _keep_decoder_output(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if self.training:
            self._decoder_features.append(output)

    def _deep_supervision_loss(self, loss: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Combine the full-resolution ``loss`` with the coarser levels' (hooks fill the features
        deepest first, so they are reversed to level 1, 2, ...)."""
        features, self._decoder_features = self._decoder_features[::-1], []
        if not self.training or not len(self.deep_heads):
            return loss
        total, weights = loss, 1.0
        for level, (head, feature) in enumerate(zip(self.deep_heads, features), start=1):
            step = 2 ** level
            total = total + 2.0 ** -level * self._loss(head(feature), y[:, step // 2::step, step // 2::step])
            weights += 2.0 ** -level
        return total / weights

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.float(), y)
        if self.hparams.loss == "ce_dice":
            loss = loss + self.hparams.dice_weight * soft_dice_loss(logits, y)
        return loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def model_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shared by train and val: returns ``(loss, logits, predictions)``."""
        x, y = batch["image"], batch["label"]
        self._decoder_features = []
        logits = self(x)
        loss = self._deep_supervision_loss(self._loss(logits, y), y)
        return loss, logits, logits.argmax(1)

    @property
    def postprocessing(self) -> dict[str, Any]:
        """What inference applies after the network (stored in the exported model file)."""
        return {"largest_component": bool(self.hparams.largest_component)}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.augmentation is not None:
            image, label = self.augmentation(batch["image"], batch["label"])
            batch = {**batch, "image": image, "label": label}
        loss, _, pred = self.model_step(batch)
        self.train_metrics.update(pred, batch["label"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(pred))
        return loss

    def on_train_epoch_end(self) -> None:
        self._log_class_metrics(self.train_metrics)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits, pred = self.model_step(batch)
        self.val_metrics.update(pred, batch["label"])
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(pred))
        self._keep_examples(batch, logits)

    def _keep_examples(self, batch: dict[str, torch.Tensor], logits: torch.Tensor, k: int = 8) -> None:
        """Keep the ``k`` slices of this epoch's most foreground-rich val batch for the image grid."""
        if not self.hparams.log_images_every_n_epochs:
            return
        fg = (batch["label"] > 0).flatten(1).sum(1)
        top = fg.topk(min(k, len(fg))).indices.sort().values
        score = int(fg[top].sum())
        if self._image_batch is None or score > self._image_batch["score"]:
            self._image_batch = {"score": score, "image": batch["image"][top].detach().cpu(),
                                 "label": batch["label"][top].detach().cpu(), "logits": logits[top].detach().float().cpu()}

    def on_validation_epoch_end(self) -> None:
        dice_mean = self._log_class_metrics(self.val_metrics)
        self.val_dice_best.update(dice_mean)
        self.log("val/dice_mean_best", self.val_dice_best.compute(), prog_bar=True)
        every = self.hparams.log_images_every_n_epochs
        if every and self._image_batch is not None and self.current_epoch % every == 0:
            self._log_image_grid("val/examples", self._image_batch["image"], self._image_batch["label"],
                                 self._image_batch["logits"])
        self._image_batch = None

    def _log_class_metrics(self, collection: MetricCollection) -> torch.Tensor:
        """Log per-class Dice/Jaccard and their foreground means; return the mean foreground Dice."""
        values = collection.compute()
        collection.reset()
        dice_mean = torch.tensor(0.0)
        for key, per_class in values.items():
            per_class = per_class.float()
            for i, name in enumerate(self.class_names):
                self.log(f"{key}_{name}", per_class[i])
            mean = per_class[1:].mean()
            self.log(f"{key}_mean", mean, prog_bar=key.endswith("dice"))
            if key.endswith("dice"):
                dice_mean = mean
        return dice_mean

    def _log_image_grid(self, tag: str, image: torch.Tensor, label: torch.Tensor, logits: torch.Tensor) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image"):
            return
        experiment.add_image(tag, make_grid_image(image, label, logits), self.global_step)

    # ---------------------------------------------------------------- test: whole volumes, 3D metrics
    def on_test_epoch_start(self) -> None:
        self.test_results = []

    def segment_volume(self, image: np.ndarray, patch_size: Sequence[int] = (64, 64),
                       context_slices: int = 0) -> np.ndarray:
        """Segment one whole volume as the exported model will in deployment.

        Args:
            image: ``(S, H, W)`` normalised slices stacked along the slicing axis.
            patch_size: the smallest ``(H, W)`` a slice is padded to (the training patch).
            context_slices: neighbouring slices per side fed as extra channels (2.5D).

        Returns:
            ``(S, H, W) uint8`` labels, in full precision, with the model's post-processing.
        """
        with torch.autocast(device_type=self.device.type, enabled=False):
            return segment_slices(self.net, image, size_multiple=getattr(self.net, "size_multiple", 1),
                                  min_size=patch_size, batch_size=self.hparams.test_batch_size, device=self.device,
                                  context=context_slices, largest_component=bool(self.hparams.largest_component))

    def test_step(self, case: dict[str, Any], batch_idx: int) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        pred = self.segment_volume(case["image"], getattr(datamodule, "patch_size", (64, 64)),
                                   getattr(datamodule, "context_slices", 0))
        row = {"name": case["name"], **volume_metrics(pred, case["label"], case["spacing"])}
        self.test_results.append(row)

    def on_test_epoch_end(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # each rank tested a share of the volumes (the sampler may repeat one to even them out)
            parts: list[list[dict[str, Any]] | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, self.test_results)
            rows = {r["name"]: r for part in parts for r in (part or [])}
            self.test_results = [rows[name] for name in sorted(rows)]
        summary = summarize(r for r in self.test_results)
        for key in ("dice_anterior", "dice_posterior", "dice_mean", "dice_foreground",
                    "jaccard_anterior", "jaccard_posterior", "jaccard_mean", "jaccard_foreground"):
            if key in summary:
                self.log(f"test/{key}", summary[key]["mean"])

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.hparams.optimizer(params=self.parameters())
        if self.hparams.scheduler is None:
            return {"optimizer": optimizer}
        scheduler = self.hparams.scheduler(optimizer=optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": self.hparams.scheduler_monitor,
                                 "interval": "epoch", "frequency": 1}}


def make_grid_image(image: torch.Tensor, label: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Tile up to N slices into a ``(3, 4*H, N*W)`` RGB grid in ``[0, 1]``.

    Rows: input slice, ground truth (coloured), prediction (coloured), foreground probability.

    Args:
        image: ``(N, 1, H, W)`` in ``[0, 1]``; label: ``(N, H, W)``; logits: ``(N, C, H, W)``.
    """
    image, label, logits = image.cpu().float(), label.cpu(), logits.cpu().float()
    colours = LABEL_COLOURS
    if logits.shape[1] > len(colours):
        colours = torch.cat([colours, torch.rand(logits.shape[1] - len(colours), 3)])
    gray = image[:, 0].clamp(0, 1)
    probs = torch.softmax(logits, 1)
    rows = [
        gray[..., None].expand(-1, -1, -1, 3),
        colours[label.long()],
        colours[probs.argmax(1)],
        (1 - probs[:, 0]).clamp(0, 1)[..., None].expand(-1, -1, -1, 3),
    ]
    # each row: (N, H, W, 3) -> (H, N*W, 3); stack rows vertically
    tiles = [torch.cat(list(r), dim=1) for r in rows]
    return torch.cat(tiles, dim=0).permute(2, 0, 1).contiguous()

