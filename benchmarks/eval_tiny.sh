#!/usr/bin/env bash
# Evaluate a finished tiny run (the README's training command) and print the report plus the zero-shot margin.
#
#   python -m unitok_jax.main --config=configs/unitok.py:tiny --workdir=runs/tiny     # train (~10+ min on 2 cores)
#   bash benchmarks/eval_tiny.sh [runs/tiny] [report.json] [extra evaluate flags...]  # ~1 min on 2 cores
#
# Evaluates the latest checkpoint on the embedded eval split (500 images): recon (PSNR/SSIM/codebook usage),
# fid (reported as skipped unless --config.eval.fid.inception_path=... is passed), zeroshot (48 classes, top-1/5
# vs chance, image<->text recall@k).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORKDIR="${1:-runs/tiny}"
OUT="${2:-$WORKDIR/eval/report.json}"
PY="${PYTHON:-python}"
shift $(( $# > 2 ? 2 : $# ))
if [ ! -d "$WORKDIR/checkpoints" ]; then
  echo "no checkpoints in $WORKDIR: train first with" >&2
  echo "  python -m unitok_jax.main --config=configs/unitok.py:tiny --workdir=$WORKDIR" >&2
  exit 1
fi
"$PY" -m unitok_jax.evaluate --config="$REPO/configs/unitok.py:tiny" --checkpoint="$WORKDIR" \
  --evals=recon,fid,zeroshot --output="$OUT" "$@"
"$PY" - "$OUT" <<'PYEOF'
import json
import sys

r = json.load(open(sys.argv[1]))
top1, top5 = r["zeroshot/top1"], r["zeroshot/top5"]
c1, c5 = r["zeroshot/chance"], r["zeroshot/chance_top5"]
print(f"step {r.get('meta/step')}: PSNR {r['recon/psnr']:.2f} dB, SSIM {r['recon/ssim']:.3f}, "
      f"codebook usage {r['recon/usage']:.3f}, perplexity {r['recon/perplexity']:.1f}")
print(f"zero-shot ({r['zeroshot/num_classes']} classes, {r['zeroshot/count']} images): top-1 {top1:.3f} vs chance "
      f"{c1:.3f} ({top1 / c1:.2f}x), top-5 {top5:.3f} vs chance {c5:.3f} ({top5 / c5:.2f}x)")
n = r.get("zeroshot/retrieval/count", 0)
if n:
    print(f"retrieval ({n} pairs, chance R@1 {1 / n:.4f}): image->text R@1/5/10 "
          + "/".join(f"{r[f'zeroshot/retrieval/image_to_text/R@{k}']:.3f}" for k in (1, 5, 10))
          + ", text->image " + "/".join(f"{r[f'zeroshot/retrieval/text_to_image/R@{k}']:.3f}" for k in (1, 5, 10)))
for key, value in r.items():
    if key.endswith("skipped"):
        print(f"{key}: {value}")
PYEOF
