"""What each eval keeps while `run_evals` walks the eval set: one accumulator per eval behind a two-method protocol.

`update(batch, out, mask)` sees this host's rows of one batch (numpy): `batch` holds `image` [b, h, w, 3] in
[-1, 1] and `label` [b]; `out` the eval forward's outputs (`rec`, `psnr`, `ssim`, `indices` [b, k, n], `img` and
`txt` CLIP features, `lpips`); `mask` [b] marks real rows (the last batch is padded). `finalize()` reduces across
processes (a collective: every process calls it, in the same order) and returns `{metric: value}`.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import jax
import numpy as np

from unitok_jax.evals import concat_across_processes, sum_across_processes
from unitok_jax.evals.codebook import CodebookUsage
from unitok_jax.evals.image_metrics import to_unit_range
from unitok_jax.evals.zeroshot import TopKAccumulator, chance_accuracy, recall_at_k, zero_shot_logits


class Accumulator(Protocol):
    def update(self, batch: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray], mask: np.ndarray) -> None: ...

    def finalize(self) -> dict[str, Any]: ...


class ReconAccumulator:
    """PSNR/SSIM/LPIPS means, codebook usage over the whole set, and the first images for the grid."""

    def __init__(self, num_codebooks: int, codebook_size: int, grid_images: int, lpips_skipped: str | None):
        self.sums = np.zeros(4, np.float64)  # psnr, ssim, lpips, count
        self.usage = CodebookUsage(num_codebooks, codebook_size)
        self.grid_images = grid_images
        self.grid: tuple[np.ndarray, np.ndarray] | None = None
        self.lpips_skipped = lpips_skipped

    def update(self, batch, out, mask):
        n = int(mask.sum())
        if not n:
            return
        psnr = out["psnr"][mask].astype(np.float64)
        # identical images give inf dB; cap at 100 dB so one perfect image does not make the mean inf
        self.sums[0] += np.minimum(psnr, 100.0).sum()
        self.sums[1] += out["ssim"][mask].astype(np.float64).sum()
        if "lpips" in out:
            self.sums[2] += out["lpips"][mask].astype(np.float64).sum()
        self.sums[3] += n
        self.usage.update(out["indices"][mask])
        if self.grid_images and (self.grid is None or self.grid[0].shape[0] < self.grid_images):
            orig, rec = batch["image"][mask], out["rec"][mask]
            if self.grid is not None:
                orig, rec = np.concatenate([self.grid[0], orig]), np.concatenate([self.grid[1], rec])
            self.grid = (orig[: self.grid_images], rec[: self.grid_images])

    def finalize(self) -> dict[str, Any]:
        sums = sum_across_processes(self.sums)
        n = max(sums[3], 1.0)
        out: dict[str, Any] = {"psnr": sums[0] / n, "ssim": sums[1] / n}
        if self.lpips_skipped:
            out["lpips_skipped"] = self.lpips_skipped
        else:
            out["lpips"] = sums[2] / n
        out.update(self.usage.compute())
        out["num_images"] = int(sums[3])
        return out


class FidAccumulator:
    """rFID (reconstructions vs. originals) and Inception Score through a `fid.FidEvaluator`."""

    def __init__(self, evaluator):
        self.ev = evaluator

    def update(self, batch, out, mask):
        if not mask.any():
            return
        rec = np.asarray(to_unit_range(out["rec"][mask]))
        orig = np.asarray(to_unit_range(batch["image"][mask]))
        self.ev.update(rec, reference_images=orig)

    def finalize(self) -> dict[str, Any]:
        res = self.ev.compute()
        if "skipped" in res:
            return {"skipped": res["skipped"]}
        if self.ev.reference is None:
            accum = self.ev.reference_accum.allreduce()  # collective on every process
            if accum.count >= 2:
                self.ev.reference = accum.to_reference(self.ev.reference_fingerprint or "")  # reused next time
        out = {}
        for key, value in res.items():
            out["rfid" if key == "fid" else ("rfid_skipped" if key == "fid_skipped" else key)] = value
        return out


class ZeroShotAccumulator:
    """Zero-shot top-1/top-5 against a text classifier, and image<->text retrieval on the same images."""

    def __init__(self, classifier, num_classes: int, retrieval_max: int, with_retrieval: bool):
        self.classifier = classifier
        self.num_classes = num_classes
        self.topk = TopKAccumulator((1, 5))
        self.with_retrieval = with_retrieval
        self.retrieval_max = max(1, retrieval_max // jax.process_count())
        self.img: list[np.ndarray] = []
        self.txt: list[np.ndarray] = []
        self.kept = 0

    def update(self, batch, out, mask):
        labels = np.where(mask, batch["label"], -1)
        if self.classifier is not None and (labels >= 0).any():
            self.topk.update(zero_shot_logits(out["img"], self.classifier), labels)
        if self.with_retrieval and "txt" in out and self.kept < self.retrieval_max:
            take = min(int(mask.sum()), self.retrieval_max - self.kept)
            self.img.append(out["img"][mask][:take])
            self.txt.append(out["txt"][mask][:take])
            self.kept += take

    def finalize(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.classifier is not None:
            acc = self.topk.compute()
            if acc["count"]:
                chance = chance_accuracy(self.num_classes, 1)
                out.update(
                    top1=acc["top1"],
                    top5=acc["top5"],
                    chance=chance,
                    chance_top5=chance_accuracy(self.num_classes, 5),
                    top1_over_chance=acc["top1"] / chance,
                    num_classes=self.num_classes,
                    count=acc["count"],
                )
            else:
                out["classification_skipped"] = "the zero-shot dataset has no labels (label -1 everywhere)"
        if self.with_retrieval:
            dim = (
                self.classifier.shape[0] if self.classifier is not None else (self.img[0].shape[-1] if self.img else 1)
            )
            img = np.concatenate(self.img) if self.img else np.zeros((0, dim), np.float32)
            txt = np.concatenate(self.txt) if self.txt else np.zeros((0, dim), np.float32)
            img, txt = concat_across_processes(img), concat_across_processes(txt)  # collective
            if img.shape[0] >= 2:
                for key, value in recall_at_k(img, txt, (1, 5, 10)).items():
                    out[f"retrieval/{key}"] = value
                out["retrieval/count"] = int(img.shape[0])
        return out
