"""Feature rows against an independent computation: own decode, torchvision's own transforms, a separately built
model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from helpers import FAST, decode_all_rgb, make_frame_folder, make_video
from PIL import Image

import pipeline


def reference_model(state_file):
    """ResNet-18 built here, not by the package: weights loaded, fc replaced by Identity, eval mode."""
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(state_file, weights_only=True))
    model.fc = torch.nn.Identity()
    return model.eval()


@torch.inference_mode()
def reference_rows(model, rgb_frames: list[np.ndarray], resize: int | None = None, crop: int | None = None):
    transforms = torchvision.models.ResNet18_Weights.DEFAULT.transforms()  # the weights' own preprocessing
    if resize is not None:  # the same preset at a smaller size, as --resize/--crop ask for
        transforms.resize_size, transforms.crop_size = [resize], [crop]
    x = torch.stack([transforms(torch.from_numpy(f).permute(2, 0, 1)) for f in rgb_frames])
    return model(x).numpy()


def test_video_rows_equal_independent_reference_and_bgr_is_caught(tmp_path, resnet18_state_file):
    video = make_video(tmp_path / "clip.avi", 9)
    report = pipeline.extract_videos(
        [video],
        tmp_path / "c.h5",
        backbone="resnet18",
        weights=str(resnet18_state_file),
        stride=3,
        dtype="float32",
        progress=False,
        workers=1,
    )
    assert report.ok and report.extracted == ["clip.avi"]
    cache = pipeline.open_cache(tmp_path / "c.h5")
    idx = cache.frame_indices("clip.avi")
    np.testing.assert_array_equal(idx, [0, 3, 6])
    frames = decode_all_rgb(video)
    model = reference_model(resnet18_state_file)
    expected = reference_rows(model, [frames[i] for i in idx])
    got = cache.features("clip.avi")
    assert got.dtype == np.float32 and got.shape == (3, 512)
    err = np.abs(got - expected).max()
    assert err < 1e-4 * max(1.0, np.abs(expected).max()), err
    # A BGR mix-up, or rows shifted by one frame, would be far outside that tolerance.
    bgr = reference_rows(model, [frames[i][:, :, ::-1].copy() for i in idx])
    assert np.abs(got - bgr).max() > 100 * max(err, 1e-6)
    shifted = reference_rows(model, [frames[i + 1] for i in idx])
    assert np.abs(got - shifted).max() > 100 * max(err, 1e-6)
    # Provenance: the spec names the file's sha256 and torchvision's default preprocessing for the architecture.
    spec = cache.spec
    assert spec.weights == resnet18_state_file.name and len(spec.weights_sha256) == 64
    assert (spec.preprocessing.resize, spec.preprocessing.crop, spec.preprocessing.color) == (256, 224, "RGB")


def test_frame_folder_rows_equal_pil_reference(tmp_path, resnet18_state_file):
    """Frame folders are read with PIL here (a different decoder from the package's OpenCV) in natural order."""
    folder = make_frame_folder(tmp_path / "seq", 12)
    pipeline.extract_videos(
        [folder],
        tmp_path / "c.h5",
        backbone="resnet18",
        weights=str(resnet18_state_file),
        max_frames=4,
        stride=1,
        dtype="float32",
        progress=False,
        workers=0,
    )
    cache = pipeline.open_cache(tmp_path / "c.h5")
    np.testing.assert_array_equal(cache.frame_indices("seq"), [0, 1, 2, 3])
    files = [folder / f"img_{i}.png" for i in (1, 2, 3, 4)]
    rgb = [np.array(Image.open(f).convert("RGB")) for f in files]
    expected = reference_rows(reference_model(resnet18_state_file), rgb)
    np.testing.assert_allclose(cache.features("seq"), expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_natural_sort_of_frame_folders(tmp_path, resnet18_state_file):
    folder = make_frame_folder(tmp_path / "seq", 12)  # img_1 ... img_12: img_10 must come after img_9
    opts = {**FAST, "weights": str(resnet18_state_file)}
    pipeline.extract_videos([folder], tmp_path / "c.h5", dtype="float32", frames_fps=4.0, **opts)
    cache = pipeline.open_cache(tmp_path / "c.h5")
    natural = [np.array(Image.open(folder / f"img_{i}.png").convert("RGB")) for i in range(1, 13)]
    expected = reference_rows(reference_model(resnet18_state_file), natural, resize=64, crop=56)
    np.testing.assert_allclose(cache.features("seq"), expected, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_array_equal(cache.frame_indices("seq"), np.arange(12))
    np.testing.assert_allclose(cache.timestamps("seq"), np.arange(12) / 4.0)
    assert cache.info("seq")["kind"] == "frames"


@pytest.mark.parametrize("batch_size", [1, 5])
def test_batch_size_and_workers_do_not_change_features(tmp_path, batch_size):
    videos = tmp_path / "v"
    for k, n in enumerate((7, 3, 11)):
        make_video(videos / f"c{k}.avi", n, offset=10 * k)
    base = dict(FAST, dtype="float32")
    pipeline.extract_videos([videos], tmp_path / "a.h5", **{**base, "batch_size": 8})
    pipeline.extract_videos([videos], tmp_path / "b.h5", **{**base, "batch_size": batch_size, "workers": 2})
    a, b = pipeline.open_cache(tmp_path / "a.h5"), pipeline.open_cache(tmp_path / "b.h5")
    assert sorted(a.keys()) == sorted(b.keys()) == ["c0.avi", "c1.avi", "c2.avi"]
    for key in a.keys():
        np.testing.assert_array_equal(a.frame_indices(key), b.frame_indices(key))
        np.testing.assert_allclose(a.features(key), b.features(key), atol=1e-5, rtol=1e-5)


def test_float16_storage_matches_float32(tmp_path):
    make_video(tmp_path / "v" / "a.avi", 5)
    pipeline.extract_videos([tmp_path / "v"], tmp_path / "h.h5", **FAST)
    pipeline.extract_videos([tmp_path / "v"], tmp_path / "f.h5", dtype="float32", **FAST)
    h, f = pipeline.open_cache(tmp_path / "h.h5"), pipeline.open_cache(tmp_path / "f.h5")
    assert h.features("a.avi").dtype == np.float16 and h.dtype == "float16"
    np.testing.assert_allclose(h.features("a.avi").astype(np.float32), f.features("a.avi"), rtol=2e-3, atol=1e-3)


def test_real_torchvision_weights_from_the_cache_are_hash_checked(tmp_path, monkeypatch, mobilenet_v2_imagenet):
    """torchvision's own weights resolve through $TORCH_HOME/hub/checkpoints offline, and a corrupt file is refused."""
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / mobilenet_v2_imagenet.name).write_bytes(mobilenet_v2_imagenet.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    video = make_video(tmp_path / "v" / "a.avi", 3)
    report = pipeline.extract_videos(
        [video],
        tmp_path / "c.h5",
        backbone="mobilenet_v2",
        weights="IMAGENET1K_V1",
        dtype="float32",
        progress=False,
        workers=0,
    )
    cache = pipeline.open_cache(tmp_path / "c.h5")
    assert report.ok and cache.spec.weights == "MobileNet_V2_Weights.IMAGENET1K_V1" and cache.spec.dim == 1280
    assert cache.spec.weights_sha256.startswith("b0353104")  # torchvision names files by their sha256 prefix
    # Against torchvision's own model with the same weights and its own transforms.
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    model = torchvision.models.mobilenet_v2(weights=weights).eval()
    model.classifier[1] = torch.nn.Identity()
    with torch.inference_mode():
        x = torch.stack([weights.transforms()(torch.from_numpy(f).permute(2, 0, 1)) for f in decode_all_rgb(video)])
        expected = model(x).numpy()
    np.testing.assert_allclose(cache.features("a.avi"), expected, atol=1e-4 * np.abs(expected).max())
    # A corrupted file in the cache fails torchvision's hash check: a clear error, not silent garbage.
    (checkpoints / mobilenet_v2_imagenet.name).write_bytes(b"0" * 1000)
    with pytest.raises(pipeline_weights_error(), match="not in the torchvision cache"):
        pipeline.extract_videos(
            [video], tmp_path / "d.h5", backbone="mobilenet_v2", weights="IMAGENET1K_V1", progress=False, workers=0
        )


def pipeline_weights_error():
    from pipeline.extract.backbone import WeightsError

    return WeightsError


def test_prefixed_state_dict_with_foreign_classifier_loads(tmp_path, resnet50_selfsup):
    """A real ResNet-50 file with 'module.pre.' keys and its own fc: the prefix is stripped, the fc dropped."""
    video = make_video(tmp_path / "v" / "a.avi", 2)
    pipeline.extract_videos(
        [video],
        tmp_path / "c.h5",
        backbone="resnet50",
        weights=str(resnet50_selfsup),
        dtype="float32",
        progress=False,
        workers=0,
        crop=112,
        resize=128,
    )
    cache = pipeline.open_cache(tmp_path / "c.h5")
    assert cache.spec.dim == 2048 and cache.spec.weights == "model.pth"
    state = torch.load(resnet50_selfsup, map_location="cpu", weights_only=True)
    model = torchvision.models.resnet50()
    model.fc = torch.nn.Identity()
    model.load_state_dict(
        {
            k[len("module.pre.") :]: v
            for k, v in state.items()
            if k.startswith("module.pre.") and not k.startswith("module.pre.fc.")
        }
    )
    model.eval()
    pre = torchvision.transforms.Compose(
        [
            torchvision.transforms.Resize(128, antialias=True),
            torchvision.transforms.CenterCrop(112),
            torchvision.transforms.ConvertImageDtype(torch.float32),
            torchvision.transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    with torch.inference_mode():
        x = torch.stack([pre(torch.from_numpy(f).permute(2, 0, 1)) for f in decode_all_rgb(video)])
        expected = model(x).numpy()
    np.testing.assert_allclose(cache.features("a.avi"), expected, atol=1e-4 * np.abs(expected).max())


def test_long_video_streams_into_chunked_storage_with_the_same_rows(tmp_path):
    """Past 1024 rows a video is appended chunk by chunk (bounded memory); its rows equal those of a short run."""
    import h5py

    from pipeline.data.cache import CHUNK_ROWS, CONTIGUOUS_MAX_ROWS

    n = CONTIGUOUS_MAX_ROWS + 80
    video = make_video(tmp_path / "long.avi", n, width=40, height=32)
    small = dict(FAST, resize=32, crop=32, dtype="float32", batch_size=64)
    pipeline.extract_videos([video], tmp_path / "long.h5", **small)
    pipeline.extract_videos([video], tmp_path / "head.h5", max_frames=300, **small)
    long, head = pipeline.open_cache(tmp_path / "long.h5"), pipeline.open_cache(tmp_path / "head.h5")
    rows = long.features("long.avi")
    assert rows.shape == (n, 512)
    np.testing.assert_array_equal(long.frame_indices("long.avi"), np.arange(n))
    np.testing.assert_allclose(rows[:300], head.features("long.avi"), atol=1e-5)
    with h5py.File(tmp_path / "long.h5") as f:
        ds = f["videos"][f["index/id"].asstr()[0]]["features"]
        assert ds.chunks == (CHUNK_ROWS, 512) and ds.compression is None
