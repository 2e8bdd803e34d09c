"""SAM's image encoder on CPU: torch against OpenVINO (issue 45), time and fidelity, in one run.

    .venv/bin/pip install openvino==2026.4.1 nncf   # not a toothseg dependency (yet)
    .venv/bin/python bench/bench_sam_encoder.py [--sams lite_medsam vit_b] [--runs 5] \\
        [--out bench/results/sam_encoder.md]

For each SAM (LiteMedSAM with its packaged weights, ViT-B with random weights: the official
checkpoint's cost): the image encoder in torch fp32, and converted with `openvino.convert_model` on
an example input, compiled for the CPU in fp32 and, with nncf installed, with int8 weight
compression (`nncf.compress_weights`). Same preprocessed input (a synthetic 2000x1000 panoramic),
same threads (torch's count), one warm-up run each, then `--runs` timed runs: median (min-max).
Fidelity against torch fp32 on the same input: cosine of the embeddings, and the IoU of the masks
SAM's decoder draws from each embedding for the same boxes (every tooth of the image).
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_predict import machine, write_report  # noqa: E402


def timed(run, runs: int) -> list[float]:
    run()  # warm-up
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        run()
        out.append(time.perf_counter() - t)
    return out


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def masks_from(predictor, features, boxes) -> np.ndarray:
    import torch

    predictor.features = features
    with torch.no_grad():
        chunk = predictor.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float32),
                                                      predictor.original_size)
        masks, _, _ = predictor.predict_torch(None, None, boxes=chunk, multimask_output=False)
    return masks[:, 0].numpy()


def mean_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([(x & y).sum() / max((x | y).sum(), 1) for x, y in zip(a, b)]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sams", nargs="+", default=["lite_medsam", "vit_b"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sam_encoder.md")
    args = parser.parse_args()

    import openvino as ov
    import torch
    from segment_anything import SamPredictor

    from backend.process import set_torch_threads
    from backend.sam import SAM_BUILDERS, build_sam, packaged_checkpoint
    from training.data.synth import generate

    set_torch_threads(0)
    threads = torch.get_num_threads()
    try:
        import nncf
    except ImportError:
        nncf = None
    sample = generate(500, (2000, 1000))
    boxes = np.array([[xs.min(), ys.min(), xs.max(), ys.max()]
                      for ys, xs in (np.nonzero(m) for m in sample.masks().values() if m.any())], float)
    work = Path(tempfile.mkdtemp(prefix="toothseg-encoder-"))
    core = ov.Core()
    rows = []
    for name in args.sams:
        if name == "lite_medsam":
            checkpoint = packaged_checkpoint(name)
        else:
            torch.manual_seed(0)
            checkpoint = work / f"{name}.pth"
            torch.save(SAM_BUILDERS[name](checkpoint=None).state_dict(), checkpoint)
        sam = build_sam(name, checkpoint).eval()
        predictor = SamPredictor(sam)
        rgb = np.repeat(sample.image[:, :, None], 3, axis=2)
        predictor.set_image(rgb, image_format="RGB")  # the sizes the decoder needs
        x = sam.preprocess(torch.as_tensor(predictor.transform.apply_image(rgb)).permute(2, 0, 1)[None].float())
        with torch.no_grad():
            reference = sam.image_encoder(x)
            torch_runs = timed(lambda: sam.image_encoder(x), args.runs)
        reference_masks = masks_from(predictor, reference, boxes)
        rows.append((name, "torch fp32", "-", spread(torch_runs), "1.000000", "1.000"))
        t = time.perf_counter()
        converted = ov.convert_model(sam.image_encoder, example_input=x)
        convert_s = time.perf_counter() - t
        variants = [("OpenVINO fp32", converted)]
        if nncf is not None:
            variants.append(("OpenVINO int8 weights", nncf.compress_weights(ov.convert_model(sam.image_encoder,
                                                                                               example_input=x))))
        for label, model in variants:
            t = time.perf_counter()
            compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                         "INFERENCE_PRECISION_HINT": "f32"})
            compile_s = time.perf_counter() - t
            inputs = x.numpy()
            ov_runs = timed(lambda: compiled(inputs), args.runs)
            features = torch.as_tensor(np.asarray(compiled(inputs)[0]))
            cosine = float(torch.nn.functional.cosine_similarity(features.flatten(), reference.flatten(), dim=0))
            iou = mean_iou(masks_from(predictor, features, boxes), reference_masks)
            rows.append((name, label, f"{convert_s:.0f} + {compile_s:.0f}", spread(ov_runs), f"{cosine:.6f}",
                         f"{iou:.3f}"))
        print(f"{name}: done", flush=True)
    command = shlex.join([".venv/bin/python", "bench/bench_sam_encoder.py", *sys.argv[1:]])
    lines = ["# SAM's image encoder: torch against OpenVINO", "", f"Command: `{command}`",
             f"Machine: {machine()}; openvino {ov.get_version()}; nncf {nncf.__version__ if nncf else 'not installed'}",
             "", f"Input: a synthetic 2000x1000 panoramic, preprocessed as SAM does; {threads} threads for both; "
             f"{args.runs} timed runs after a warm-up. Fidelity against torch fp32: embedding cosine, mean IoU of the "
             f"masks decoded for the image's {len(boxes)} teeth's boxes.", "",
             "| SAM | encoder runtime | convert + compile s | encoder s | embedding cosine | mask IoU |",
             "|---|---|---|---|---|---|", *[f"| {' | '.join(row)} |" for row in rows]]
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
