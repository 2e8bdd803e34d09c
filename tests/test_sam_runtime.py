"""SAM_RUNTIME (backend.sam_runtime): SAM's image encoder in OpenVINO or torch. The same embedding
and masks as torch with the shipped LiteMedSAM weights; the converted encoder cached by checkpoint,
input size and OpenVINO version, converted once by processes starting together; a runtime that
cannot serve falls back to torch with one log line. LiteMedSAM converts in about 10 s, the test
SAM (vit_tiny) in about 3 s."""
import hashlib
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from backend import sam_runtime
from backend.sam import SamRefiner
from backend.sam_runtime import OpenVinoEncoder, openvino_encoder
from backend.settings import Settings
from training.data.synth import generate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lite_medsam_both(request):
    """The shipped LiteMedSAM twice: its encoder in torch, and in OpenVINO, converted on this
    machine's first run into pytest's cache, in a folder named by the conversion code's hash (the
    runtime's own key adds checkpoint, input size and OpenVINO version); a clean checkout converts."""
    code = hashlib.sha1((REPO / "backend" / "sam_runtime.py").read_bytes()).hexdigest()[:12]
    cache = Path(request.config.cache.mkdir(f"toothseg-openvino-{code}"))
    return (SamRefiner.load("lite_medsam", None, runtime="torch", batch_size=4),
            SamRefiner.load("lite_medsam", None, runtime="openvino", runtime_cache=cache, batch_size=4))


def test_openvino_encoder_gives_torchs_embedding_and_masks(lite_medsam_both):
    """Fidelity with the shipped weights on a 2000x1000 panoramic: embedding cosine >= 0.999 to
    torch fp32's, masks decoded for every tooth's box IoU >= 0.98 to torch's (mean and each)."""
    torch_sam, ov_sam = lite_medsam_both
    assert (torch_sam.encoder_runtime, ov_sam.encoder_runtime) == ("torch", "openvino")
    assert isinstance(ov_sam.predictor.model.image_encoder, OpenVinoEncoder)
    sample = generate(500, (2000, 1000))
    boxes = np.array([[xs.min(), ys.min(), xs.max(), ys.max()]
                      for ys, xs in (np.nonzero(m) for m in sample.masks().values() if m.sum() >= 200)], float)
    results = []
    for refiner in (torch_sam, ov_sam):
        masks, _ = refiner.sam_masks(sample.image, f"fidelity-{refiner.encoder_runtime}", boxes)
        features = refiner.cache.get(refiner.key(f"fidelity-{refiner.encoder_runtime}")).features
        results.append((masks, features))
    (torch_masks, torch_features), (ov_masks, ov_features) = results
    cosine = float(torch.nn.functional.cosine_similarity(ov_features.flatten(), torch_features.flatten(), dim=0))
    ious = [(a & b).sum() / max((a | b).sum(), 1) for a, b in zip(ov_masks, torch_masks)]
    assert cosine >= 0.999, cosine
    assert len(ious) >= 20 and min(ious) >= 0.98, (np.mean(ious), min(ious))


def test_settings_choose_the_runtime_and_health_says_which_serves(tmp_path, monkeypatch, sam_checkpoint):
    """SAM_RUNTIME picks the encoder's runtime (openvino by default), a wrong value is refused with
    the variable's name, and /health names the runtime serving once SAM is loaded (null before)."""
    from backend import app as app_module
    from backend import runtime as runtime_module

    assert Settings.from_env({}).sam_runtime == "openvino"
    with pytest.raises(ValueError, match="SAM_RUNTIME='onnx' is not valid: one of openvino, torch"):
        Settings.from_env({"SAM_RUNTIME": "onnx"})
    for runtime in ("torch", "openvino"):
        for name, value in {"MODEL_DIR": str(tmp_path / "models"), "SAM_MODEL_TYPE": "vit_tiny",
                            "SAM_CHECKPOINT": str(sam_checkpoint), "SAM_RUNTIME": runtime,
                            "EMBEDDING_CACHE_DIR": str(tmp_path / "embeddings")}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(runtime_module, "_runtime", None)  # this process's Runtime, from the environment
        client = app_module.create_app().test_client()
        assert client.get("/health").get_json()["sam_encoder_runtime"] is None
        refiner = runtime_module.get_runtime().refiner()
        assert client.get("/health").get_json()["sam_encoder_runtime"] == runtime == refiner.encoder_runtime
        assert isinstance(refiner.predictor.model.image_encoder, OpenVinoEncoder) == (runtime == "openvino")
    assert list((tmp_path / "embeddings" / "openvino").glob("vit_tiny-*/encoder.xml"))  # next to the embeddings


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "SAM_RUNTIME" in
            r.getMessage()]


def test_without_openvino_the_encoder_runs_in_torch_with_one_log_line(tmp_path, monkeypatch, caplog,
                                                                     sam_checkpoint):
    """OpenVINO not installed (its import fails), or unable to convert (its cache folder cannot be
    made): SAM still serves, in torch, and the log says so once."""
    sample = generate(3, (512, 512))
    box = np.array([100, 150, 160, 260], float)
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    with caplog.at_level(logging.INFO):
        refiner = SamRefiner.load("vit_tiny", sam_checkpoint, runtime="openvino", runtime_cache=tmp_path / "ov")
        mask, _ = refiner.prompt(sample.image, "no-openvino", box)
    assert refiner.encoder_runtime == "torch" and mask.shape == sample.image.shape
    assert len(warnings_of(caplog)) == 1 and "not installed" in warnings_of(caplog)[0], warnings_of(caplog)
    assert any("image encoder runtime: torch" in r.getMessage() for r in caplog.records)

    monkeypatch.delitem(sys.modules, "openvino")
    caplog.clear()
    (tmp_path / "not-a-folder").write_text("")
    with caplog.at_level(logging.INFO):
        refiner = SamRefiner.load("vit_tiny", sam_checkpoint, runtime="openvino",
                                  runtime_cache=tmp_path / "not-a-folder")
    assert refiner.encoder_runtime == "torch" and len(warnings_of(caplog)) == 1, warnings_of(caplog)


def tiny_encoder(seed: int, img_size: int = 256) -> torch.nn.Module:
    """A ViT image encoder of SAM's kind small enough to convert in about a second."""
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(seed)
    return ImageEncoderViT(img_size=img_size, patch_size=16, embed_dim=64, depth=2, num_heads=2, out_chans=256,
                           use_rel_pos=True, window_size=14, global_attn_indexes=[1]).eval()


def test_converted_encoder_is_cached_by_checkpoint_input_size_and_openvino_version(tmp_path, monkeypatch):
    """Converted once, then read from the cache; another checkpoint, another input size or another
    OpenVINO version converts again, into a folder of its own."""
    cache = tmp_path / "openvino"
    first = openvino_encoder(tiny_encoder(0), "vit_tiny-aaaa", cache, 2)
    again = openvino_encoder(tiny_encoder(0), "vit_tiny-aaaa", cache, 2)
    assert first.converted and not again.converted and again.path == first.path
    x = torch.randn(1, 3, 256, 256)
    assert torch.allclose(first(x), again(x))
    other_checkpoint = openvino_encoder(tiny_encoder(1), "vit_tiny-bbbb", cache, 2)
    other_size = openvino_encoder(tiny_encoder(0, img_size=128), "vit_tiny-aaaa", cache, 2)
    assert other_size(torch.randn(1, 3, 128, 128)).shape == (1, 256, 8, 8)
    monkeypatch.setattr(sam_runtime, "openvino_version", lambda: "2099.1.0")
    other_version = openvino_encoder(tiny_encoder(0), "vit_tiny-aaaa", cache, 2)
    for encoder in (other_checkpoint, other_size, other_version):
        assert encoder.converted
    assert len({e.path for e in (first, other_checkpoint, other_size, other_version)}) == 4
    assert not list(cache.glob(".*"))  # no temporary folder left


@pytest.mark.slow  # three processes that each import torch and OpenVINO: about 10 s
def test_processes_starting_together_convert_once(tmp_path):
    """Three processes ask for the same uncached encoder at the same moment (each waits, ready, for
    a start file): one converts, the others read its result; every one gets a working encoder."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        import torch
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from backend.sam_runtime import openvino_encoder
        from test_sam_runtime import tiny_encoder
        import openvino
        encoder = tiny_encoder(0)
        print("ready", flush=True)
        while not Path({str(tmp_path / 'go')!r}).exists():
            time.sleep(0.01)
        result = openvino_encoder(encoder, "vit_tiny-together", Path({str(tmp_path / 'cache')!r}), 1)
        print("converted" if result.converted else "read", tuple(result(torch.zeros(1, 3, 256, 256)).shape),
              flush=True)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(3)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        (tmp_path / "go").write_text("")
        outcomes = [proc.communicate(timeout=300)[0].strip() for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert sorted(outcomes) == ["converted (1, 256, 16, 16)", "read (1, 256, 16, 16)", "read (1, 256, 16, 16)"], \
        outcomes


def test_threads_sharing_a_converted_encoder_get_their_own_embeddings(tmp_path):
    """The shipped SAM's refiner and a tuned decoder's share one encoder, each with its own lock: two
    threads encoding different images at once each get their image's embedding (OpenVINO's compiled
    model has one infer request; without the encoder's lock they got each other's results)."""
    import threading

    encoder = openvino_encoder(tiny_encoder(0), "vit_tiny-threads", tmp_path, 1)
    inputs = [torch.randn(1, 3, 256, 256) for _ in range(2)]
    expected = [encoder(x) for x in inputs]
    wrong = []

    def encode(i: int) -> None:
        for _ in range(50):
            if not torch.equal(encoder(inputs[i]), expected[i]):
                wrong.append(i)

    threads = [threading.Thread(target=encode, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"{len(wrong)} of 100 embeddings were another thread's"
