"""timm image models (timm:NAME) and torchvision video models (one row per window of frames): loading, weights,
preprocessing, the cache's window rows, and the stages that read them. Small models with random weights, offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from helpers import TINY_HEAD, decode_all_rgb, make_video, write_label_folder
from typer.testing import CliRunner

import pipeline
from pipeline.cli import app
from pipeline.data.cache import CacheError
from pipeline.data.frame_labels import read_frame_labels
from pipeline.extract.backbone import FrameEmbedder, WeightsError, WeightsNameError, load_backbone
from pipeline.extract.reproduce import backbone_for_spec
from pipeline.extract.windows import Windower, window_count
from pipeline.spec import Window
from pipeline.train_head.checkpoint import FeatureMismatchError, load_checkpoint

runner = CliRunner()

# r3d_18 at 2-4 frames of 32 px: a forward pass of a few milliseconds
VIDEO = dict(backbone="r3d_18", weights="none", resize=36, crop=32, window=4, window_stride=2, progress=False)
TIMM = dict(backbone="timm:test_vit", weights="none", progress=False)  # a 64-dim ViT at 160 px


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Two classes of short videos: 11, 7 and 3 frames (3: shorter than a window of 4)."""
    root = tmp_path_factory.mktemp("videos")
    for label, offset in (("red", 0), ("blue", 50)):
        (root / label).mkdir()
        for n in (11, 7, 3):
            make_video(root / label / f"v{n}.mp4", n, offset=offset + n)
    return root


@pytest.fixture(scope="module")
def window_cache(videos, tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "r3d.h5"
    report = pipeline.extract_videos([videos], path, workers=0, **VIDEO)
    assert report.ok and len(report.extracted) == 6
    return path


# ------------------------------------------------------------------------------------------------ the windows
@pytest.mark.parametrize("size,stride", [(4, 2), (4, 4), (3, 5), (1, 1)])
def test_windows_are_cut_the_same_whatever_the_chunks(size, stride):
    n = 13
    frames = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    idx, ts = np.arange(n) * 2, np.arange(n) * 0.08  # every other decoded frame, 25 fps
    expected = [list(range(s, s + size)) for s in range(0, n - size + 1, stride)]
    for chunks in ([n], [1] * n, [5, 1, 7], [2, 11]):
        w, got, spans, centre_idx, centre_ts, start = Windower(Window(size, stride)), [], [], [], [], 0
        for k in chunks:
            out = w.push(frames[start : start + k], idx[start : start + k], ts[start : start + k])
            start += k
            assert len(w._frames) < size + k  # only the frames a later window needs are kept
            if out is not None:
                got += [c[:, 0, 0, 0].tolist() for c in out.clips]
                spans += out.spans.tolist()
                centre_idx += out.frame_indices.tolist()
                centre_ts += out.timestamps.tolist()
        assert w.finish() is None
        assert got == expected and len(got) == window_count(n, Window(size, stride))
        assert spans == [[idx[e[0]], idx[e[-1]]] for e in expected]
        assert centre_idx == [(idx[e[0]] + idx[e[-1]]) // 2 for e in expected]
        np.testing.assert_allclose(centre_ts, [(ts[e[0]] + ts[e[-1]]) / 2 for e in expected])


def test_a_video_shorter_than_a_window_gets_one_padded_window():
    frames = torch.arange(3, dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 2, 2).contiguous()
    w = Windower(Window(4, 4))
    assert w.push(frames, [0, 1, 2], [0.0, 0.04, 0.08]) is None
    last = w.finish()
    assert last.clips[0, :, 0, 0, 0].tolist() == [0, 1, 2, 2]  # the last frame repeated
    assert last.spans.tolist() == [[0, 2]] and last.frame_indices.tolist() == [1] and last.timestamps[0] == 0.04
    assert Windower(Window(4, 4)).finish() is None and window_count(0, Window(4, 4)) == 0


# ----------------------------------------------------------------------------------------- video models
def test_window_rows_in_the_cache(window_cache, videos):
    cache = pipeline.open_cache(window_cache)
    spec = cache.spec
    assert spec.window == Window(4, 2) and spec.to_dict()["window"] == {"size": 4, "stride": 2}
    assert spec.backbone == "r3d_18" and spec.dim == 512 and spec.preprocessing.antialias is False
    for n, rows in ((11, 4), (7, 2), (3, 1)):
        key = f"red/v{n}.mp4"
        spans = cache.frame_spans(key)
        assert cache.features(key).shape == (rows, 512) and cache.num_frames(key) == rows
        assert spans.tolist() == ([[s, s + 3] for s in range(0, 2 * rows, 2)] if n > 3 else [[0, 2]])
        np.testing.assert_array_equal(cache.frame_indices(key), spans.sum(1) // 2)
        np.testing.assert_allclose(cache.timestamps(key), spans.sum(1) / 2 / 25.0, atol=1e-6)  # 25 fps
    assert cache.check() == {}
    result = runner.invoke(app, ["info", str(window_cache)], terminal_width=200)
    assert (
        result.exit_code == 0 and "rows       one per window of 4 sampled frames, one window every 2" in result.output
    ), result.output


def test_window_rows_equal_torchvisions_video_transforms_on_a_clip(tmp_path):
    """The weights' own VideoClassification preset on the decoded frames of each row's window, then the model."""
    video = make_video(tmp_path / "v.mp4", 9, width=160, height=120)
    options = dict(backbone="r3d_18", weights="none", window=4, window_stride=3, progress=False, workers=0)
    pipeline.extract_videos([video], tmp_path / "c.h5", **options)
    cache = pipeline.open_cache(tmp_path / "c.h5")
    feats, spans = cache.features("v.mp4").astype(np.float32), cache.frame_spans("v.mp4")
    assert cache.spec.preprocessing.resize_hw == (128, 171) and cache.spec.preprocessing.crop == 112
    torch.manual_seed(0)  # the seeded random initialisation of --weights none
    model = torchvision.models.video.r3d_18().eval()
    model.fc = torch.nn.Identity()
    preset = torchvision.models.get_model_weights("r3d_18").DEFAULT.transforms()
    frames = torch.from_numpy(np.stack(decode_all_rgb(video))).permute(0, 3, 1, 2)  # (T, 3, H, W)
    with torch.inference_mode():
        reference = torch.cat([model(preset(frames[a : b + 1])[None]) for a, b in spans]).numpy()
    assert spans.tolist() == [[0, 3], [3, 6]]
    assert cosine(feats, reference).min() >= 0.999


def test_windows_never_depend_on_their_batch_and_resume_equals_one_run(videos, window_cache, tmp_path):
    """Windows of other videos (or padding) share their batches here: the features are the same bytes."""
    one = tmp_path / "one.h5"
    pipeline.extract_videos([videos / "red"], one, workers=1, **VIDEO)
    a, b = pipeline.open_cache(window_cache), pipeline.open_cache(one)
    assert a.spec == b.spec and sorted(b.keys()) == ["v11.mp4", "v3.mp4", "v7.mp4"]
    for key in b.keys():
        np.testing.assert_array_equal(a.features(f"red/{key}"), b.features(key))
        np.testing.assert_array_equal(a.frame_spans(f"red/{key}"), b.frame_spans(key))
    # a lost part is redone alone, the rest skipped, and the result is the same
    b.part_path("v11.mp4").unlink()
    report = pipeline.extract_videos([videos / "red"], one, workers=0, **VIDEO)
    assert report.extracted == ["v11.mp4"] and len(report.skipped) == 2
    np.testing.assert_array_equal(pipeline.open_cache(one).features("v11.mp4"), a.features("red/v11.mp4"))


def test_a_bad_input_fails_alone_among_window_rows(videos, window_cache, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "v11.mp4").write_bytes((videos / "red" / "v11.mp4").read_bytes())
    (folder / "broken.mp4").write_bytes((videos / "red" / "v7.mp4").read_bytes()[:300])  # a truncated file
    (folder / "empty.mp4").write_bytes(b"")
    report = pipeline.extract_videos([folder], tmp_path / "c.h5", workers=1, **VIDEO)
    assert sorted(report.failed) == ["broken.mp4", "empty.mp4"] and report.extracted == ["v11.mp4"]
    cache = pipeline.open_cache(tmp_path / "c.h5")
    np.testing.assert_array_equal(cache.features("v11.mp4"), pipeline.open_cache(window_cache).features("red/v11.mp4"))
    assert {f["key"] for f in cache.failures()} == {"broken.mp4", "empty.mp4"}


def test_another_window_is_another_spec_and_is_refused(videos, window_cache):
    with pytest.raises(CacheError, match="window"):
        pipeline.extract_videos([videos], window_cache, workers=0, **{**VIDEO, "window_stride": 4})


def test_window_flags_are_checked(videos, tmp_path):
    with pytest.raises(ValueError, match="--window and --window-stride apply to video backbones"):
        pipeline.extract_videos([videos], tmp_path / "a.h5", backbone="resnet18", weights="none", window=4)
    with pytest.raises(ValueError, match="--window-stride must be >= 1"):
        pipeline.extract_videos([videos], tmp_path / "a.h5", **{**VIDEO, "window_stride": 0})
    # MViT takes exactly 16 frames of 224 px: said before any video is read
    with pytest.raises(ValueError, match=r"--window 4 with 32x32 crops does not fit mvit_v2_s"):
        pipeline.extract_videos([videos], tmp_path / "m.h5", **{**VIDEO, "backbone": "mvit_v2_s"})
    assert not (tmp_path / "m.h5").exists()


def test_stage_two_on_window_rows_and_predict_rebuilds_the_video_model(videos, window_cache, tmp_path):
    run = pipeline.train_head(
        window_cache, tmp_path / "run", head="meanpool", val_fraction=0.34, **{**TINY_HEAD, "epochs": 2}
    )
    assert run.summary["epochs_run"] == 2
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt.feature_spec == pipeline.open_cache(window_cache).spec
    assert pipeline.evaluate(tmp_path / "run" / "best.pt", window_cache, progress=False).metrics
    params = ["hidden=8:32", "epochs=1", "batch_size=4", "clip_len=2"]
    swept = pipeline.sweep(
        window_cache,
        tmp_path / "sweep",
        params=params,
        trials=2,
        val_fraction=0.34,
        threads=2,
        progress=False,
        plots=False,
    )
    assert len(swept.rows) == 2
    loaded = backbone_for_spec(ckpt.feature_spec)
    assert loaded.video and loaded.dim == 512 and loaded.preprocessing == ckpt.feature_spec.preprocessing
    report = pipeline.predict(
        tmp_path / "run" / "best.pt", [videos / "red"], tmp_path / "preds.csv", cache=tmp_path / "p.h5", workers=0
    )
    assert len(report.predictions) == 3 and not report.failed
    made = pipeline.open_cache(tmp_path / "p.h5")
    assert made.spec == ckpt.feature_spec
    key = str((videos / "red" / "v11.mp4").resolve())
    np.testing.assert_array_equal(made.features(key), pipeline.open_cache(window_cache).features("red/v11.mp4"))
    # per-frame labels: each window row gets the label of its centre frame
    labels = {f"{c}/v{n}.mp4": [f"{c}{i // 5}" for i in range(n)] for c in ("red", "blue") for n in (11, 7, 3)}
    gt = write_label_folder(tmp_path / "gt" / "red", {k: v for k, v in labels.items() if k.startswith("red")})
    write_label_folder(tmp_path / "gt" / "blue", {k: v for k, v in labels.items() if k.startswith("blue")})
    rows = read_frame_labels(gt.parent, pipeline.open_cache(window_cache)).rows
    assert rows["red/v11.mp4"].tolist() == ["red0", "red0", "red1", "red1"]  # centres 1, 3, 5, 7
    frames = pipeline.train_head(window_cache, tmp_path / "frames", head="tcn", frame_labels=gt.parent, **TINY_HEAD)
    assert frames.summary["target"] == "frames"


def test_finetune_refuses_a_head_on_window_rows(window_cache, tmp_path):
    pipeline.train_head(
        window_cache, tmp_path / "run", head="meanpool", val_fraction=0.34, **{**TINY_HEAD, "epochs": 1}
    )
    with pytest.raises(ValueError, match="window rows of the video model r3d_18"):
        pipeline.finetune([tmp_path], tmp_path / "run" / "best.pt", tmp_path / "ft", progress=False)


# ------------------------------------------------------------------------------------------------ timm models
timm = pytest.importorskip("timm")


def _save_random_test_vit(path, seed: int = 7):
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False)
    save_file(model.state_dict(), str(path))
    return model.eval()


def test_timm_model_rows_and_spec(tmp_path):
    video = make_video(tmp_path / "v.mp4", 5)
    report = pipeline.extract_videos([video], tmp_path / "c.h5", workers=0, **TIMM)
    cache = pipeline.open_cache(tmp_path / "c.h5")
    spec = cache.spec
    assert report.ok and spec.backbone == "timm:test_vit.r160_in1k" and spec.dim == 64 and spec.window is None
    config = timm.data.resolve_data_config(model=timm.create_model("test_vit"))
    pre = spec.preprocessing
    assert (pre.crop, pre.resize, pre.interpolation) == (160, int(160 / config["crop_pct"]), "bicubic")
    assert pre.mean == config["mean"] and pre.std == config["std"]
    assert cache.features("v.mp4").shape == (5, 64) and cache.frame_spans("v.mp4") is None
    # every choice is in the spec id: the crop, the backbone's tag
    other = pipeline.extract_videos([video], tmp_path / "d.h5", workers=0, crop=144, **TIMM).spec
    assert other.id != spec.id and other.preprocessing.crop == 144
    with pytest.raises(WeightsNameError, match="not a pretrained tag of timm's test_vit"):
        load_backbone("timm:test_vit", "no_such_tag")
    with pytest.raises(ValueError, match="is not a timm model"):
        load_backbone("timm:no_such_model_xyz", "none")


def test_timm_rows_equal_timms_own_transform_and_forward(tmp_path):
    """resolve_data_config + create_transform on each decoded frame (PIL), then forward_features + forward_head."""
    from PIL import Image

    weights = tmp_path / "test_vit.safetensors"
    model = _save_random_test_vit(weights)
    video = make_video(tmp_path / "v.mp4", 4, width=160, height=120)
    pipeline.extract_videos([video], tmp_path / "c.h5", workers=1, **{**TIMM, "weights": str(weights)})
    cache = pipeline.open_cache(tmp_path / "c.h5")
    assert cache.spec.weights == weights.name and len(cache.spec.weights_sha256) == 64
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    x = torch.stack([transform(Image.fromarray(f)) for f in decode_all_rgb(video)])
    with torch.inference_mode():
        reference = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    assert cosine(cache.features("v.mp4"), reference).min() >= 0.999


def test_timm_weights_from_the_hugging_face_cache_and_the_offline_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError) as e:
        load_backbone("timm:test_vit", "DEFAULT")
    text = str(e.value)
    assert "model.safetensors of the Hugging Face repo timm/test_vit.r160_in1k" in text
    assert str(hub) in text and "--weights /path/to/model.safetensors" in text and "--weights none" in text

    snapshot = hub / "models--timm--test_vit.r160_in1k" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (hub / "models--timm--test_vit.r160_in1k" / "refs").mkdir()
    (hub / "models--timm--test_vit.r160_in1k" / "refs" / "main").write_text("0123abcd")
    model = _save_random_test_vit(snapshot / "model.safetensors")
    loaded = load_backbone("timm:test_vit", "DEFAULT")
    assert loaded.weights == "hf-hub:timm/test_vit.r160_in1k" and loaded.backbone == "timm:test_vit.r160_in1k"
    x = torch.randint(0, 256, (3, 3, 160, 160), dtype=torch.uint8)
    with torch.inference_mode():
        want = model.forward_head(model.forward_features(loaded.preprocessing.normalize(x)), pre_logits=True)
    torch.testing.assert_close(FrameEmbedder(loaded, torch.device("cpu"))(x), want)

    # a head trained on these features rebuilds the same backbone from its spec, and refuses other weights
    video = make_video(tmp_path / "v.mp4", 3)
    pipeline.extract_videos([video], tmp_path / "c.h5", workers=0, backbone="timm:test_vit", progress=False)
    spec = pipeline.open_cache(tmp_path / "c.h5").spec
    again = backbone_for_spec(spec)
    assert again.weights_sha256 == spec.weights_sha256 and again.dim == 64
    _save_random_test_vit(snapshot / "model.safetensors", seed=8)
    with pytest.raises(WeightsError, match="hash to"):
        backbone_for_spec(spec)


def test_a_weights_file_of_another_architecture_is_refused(tmp_path, resnet18_state_file):
    with pytest.raises(WeightsError, match="cannot load weights file"):
        load_backbone("timm:test_vit", str(resnet18_state_file))


def test_a_head_on_timm_features_refuses_a_video_cache(window_cache, tmp_path):
    for c in ("a", "b"):
        (tmp_path / "v" / c).mkdir(parents=True)
        for i in range(3):
            make_video(tmp_path / "v" / c / f"v{i}.mp4", 2, offset=10 * i)
    pipeline.extract_videos([tmp_path / "v"], tmp_path / "t.h5", workers=0, **TIMM)
    options = {**TINY_HEAD, "epochs": 1}
    pipeline.train_head(tmp_path / "t.h5", tmp_path / "run", head="meanpool", val_fraction=0.34, **options)
    with pytest.raises(FeatureMismatchError, match="backbone:"):
        pipeline.evaluate(tmp_path / "run" / "best.pt", window_cache, progress=False)
