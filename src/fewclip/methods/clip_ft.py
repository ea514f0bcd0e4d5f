"""CLIP fine-tuning: the image encoder trained on the support images against the frozen zero-shot classifier.

    z = 100 · n(f_θ(x)) · Wᵀ,   loss = CE(z, y),   f_θ the image tower (``scope="all"``) or its final block and
    projection (``scope="last"``), W the cached zero-shot text rows (frozen)

AdamW with a cosine schedule over every step, random augmentation of each support image (``augmentation``; Dassl's
``dassl_train`` RandomResizedCrop 0.08–1 + flip by default, drawn per image and epoch from ``seed``, so a run is
reproducible whatever the batching or loader workers). After every epoch the validation images are encoded in eval
mode and scored; the best epoch is kept (ties: the earliest), or the last with ``selection="none"``.

The full fine-tuning baseline of the few-shot CLIP literature, and fewclip's reference method for the image path:
the runner re-encodes the test images with the fine-tuned encoder through the feature cache (keyed by its weights'
SHA-256) and scores them with the same head. Mixed precision (autocast + loss scaling) on CUDA when the backbone's
precision is fp16 or bf16; master weights are float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..models import AUGMENT_PRESETS, SCOPES
from .image import LOGIT_SCALE, ImageEpisode, ImageMethod, image_batches, readable_accuracy
from .params import Options, param
from .registry import register
from .training import BATCH_SIZE, EPOCHS, LEARNING_RATE, SEED, WEIGHT_DECAY, adamw, fit_epochs


@register("clip-ft")
@dataclass(kw_only=True, repr=False, eq=False)
class CLIPFineTune(ImageMethod):
    scope: str = param("all", Options(SCOPES), doc="what trains: the whole image tower, or its final block")
    epochs: int = param(10, EPOCHS, doc="training epochs (each support image once per epoch)")
    lr: float = param(1e-5, LEARNING_RATE, doc="AdamW learning rate (cosine schedule over every step)")
    weight_decay: float = param(0.1, WEIGHT_DECAY, doc="AdamW weight decay")
    batch_size: int = param(32, BATCH_SIZE, doc="support images per step")
    augmentation: str = param("dassl_train", Options(AUGMENT_PRESETS), doc="augmentation of the support images")
    seed: int = param(1, SEED, doc="seed of the batch order and of the augmentation draws")

    def _fit(self, data: ImageEpisode) -> dict[str, Any]:
        model = data.trainable(self.scope)
        device = model.device
        text = data.text_weights.float().to(device)
        train, val = data.train, data.val
        root, options = data.splits.root, data.options
        batch = min(int(self.batch_size), len(train))
        steps = -(-len(train) // batch)
        augment, plain = model.train_transform(self.augmentation), model.eval_transform()
        generator = torch.Generator().manual_seed(int(self.seed))
        unreadable: set[str] = set()  # images the extraction stage had cached but that cannot be read now
        params = dict(model.named_parameters())
        optimizer = adamw(list(params.values()), lr=float(self.lr), weight_decay=float(self.weight_decay))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(self.epochs) * steps)

        def batches(epoch: int):
            order = torch.randperm(len(train), generator=generator).tolist()
            return image_batches(
                root,
                train,
                augment,
                options,
                batch,
                seed=int(self.seed),
                draw=epoch,
                order=order,
                unreadable=unreadable,
            )

        def loss(images_labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            images, labels = images_labels
            logits = LOGIT_SCALE * F.normalize(model.image_features(images), dim=-1) @ text.T
            return F.cross_entropy(logits, labels.to(device))

        def val_accuracy() -> float:
            model.eval()
            batches = image_batches(root, val, plain, options, max(batch, 64), unreadable=unreadable)
            # the arg-max of the cosines: no need to normalise
            accuracy = readable_accuracy(batches, lambda images: model.image_features(images) @ text.T, val, unreadable)
            model.train()
            return accuracy

        result = fit_epochs(
            params,
            optimizer,
            int(self.epochs),
            batches,
            loss,
            name=self.name,
            lr=float(self.lr),
            evaluate=val_accuracy if self.selection == "val" and val else None,
            scheduler=schedule,
            weight=lambda images_labels: images_labels[1].numel(),
            steps_per_epoch=steps,
            mixed_precision=model.autocast_dtype,
        )
        model.load_trainable_state(result.state)
        self.text_ = data.text_weights.float().cpu().clone()
        self.encoder_state_ = model.trainable_state()
        self.encoder_scope_ = self.scope
        self.encoder_sha256_ = model.state_sha256(self.encoder_state_)
        self.backbone_spec_ = data.backbone.to_dict()
        self.skipped_images_ = sorted(unreadable)
        self.trained_parameters_ = int(sum(p.numel() for p in params.values()))
        self.best_epoch_ = result.best_epoch
        self.history_ = result.history
        if result.best_accuracies is not None:
            self._val_accuracy_ = float(result.best_accuracies[0])
        else:  # selection "none": the last epoch, scored once on the validation images if there are any
            with torch.no_grad():
                self._val_accuracy_ = val_accuracy() if val else None
        model.eval()
        self._encoder_ = model.frozen()
        return {"epoch": self.best_epoch_}
