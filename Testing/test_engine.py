"""The inference engine: caching, batching of prompts, cancel, bounded memory, preprocessing."""

import weakref

import numpy as np
import pytest
import torch
from conftest import assert_same_levels, blobs

from medvlsm.engine import Engine, SegmentationResult
from medvlsm.errors import Cancelled, InputError
from medvlsm.postprocess import PostProcess, labelmap
from medvlsm.preprocess import Letterbox, to_model_input
from medvlsm.request import plan, planes_cost
from medvlsm.volume import Volume
from medvlsm.window import choose_window

# "The same" in fp32: the same sums in another association order (batch shapes, padding) differ by
# ~1e-6 relative on logits; the uint8 probabilities (x 255) then differ by at most one level, where
# the float lies on a rounding boundary.
RTOL = 1e-5


def ct_volume(shape=(10, 40, 48), seed=0):
    return Volume(blobs(shape, seed), (0.9, 0.9, 2.5), (0, 0, 0), np.eye(3))


def relative_error(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_split_stages_equal_the_transformers_forward(tiny_model):
    """encode_text / encode_images (skipping unused layers, pre-reduced) / decode == HF forward."""
    x = torch.randn(3, 3, 352, 352)
    prompts = ["liver", "left kidney", ""]
    with torch.no_grad():
        ours = tiny_model.decode(tiny_model.encode_images(x), tiny_model.encode_text(prompts))
        tokens = tiny_model.tokenize(prompts)
        for p in range(len(prompts)):
            ref = tiny_model.hf(input_ids=tokens["input_ids"][p : p + 1].repeat(3, 1),
                                attention_mask=tokens["attention_mask"][p : p + 1].repeat(3, 1), pixel_values=x).logits
            assert relative_error(ours[:, p], ref) < RTOL


def test_cached_features_give_the_uncached_result(tiny_model):
    v = ct_volume()
    cached = Engine(tiny_model, device="cpu", precision="fp32", batch_size=4, cache_bytes=2**30)
    first = cached.segment(v, ["liver"])
    assert not first.from_cache
    second = cached.segment(v, ["spleen"])
    assert second.from_cache
    fresh = Engine(tiny_model, device="cpu", precision="fp32", batch_size=4).segment(v, ["spleen"])
    assert_same_levels(second.probabilities, fresh.probabilities)


def test_cache_is_keyed_on_content_and_settings(tiny_model):
    v = ct_volume()
    e = Engine(tiny_model, device="cpu", precision="fp32", cache_bytes=2**30)
    e.segment(v, ["a"])
    assert e.segment(v, ["b"]).from_cache
    assert not e.segment(v, ["b"], plane="coronal").from_cache
    assert not e.segment(v, ["b"], window="lung").from_cache
    changed = v.with_array(v.array.copy())
    changed.array[0, 0, 0] += 1
    assert not e.segment(changed, ["b"]).from_cache
    assert e.segment(v, ["c"], cache_key="node1").from_cache is False
    assert e.segment(v, ["d"], cache_key="node1").from_cache


def test_prefetch_encodes_the_slice_on_screen_before_the_prompt_is_known(tiny_model):
    v = ct_volume()
    e = Engine(tiny_model, device="cpu", precision="fp32", batch_size=4, cache_bytes=2**30)
    assert e.prefetch(v, plane="coronal", slices=(5, 6), cache_key="node1") is None  # no probabilities made
    preview = e.segment(v, ["liver"], plane="coronal", slices=(5, 6), cache_key="node1")
    assert preview.from_cache  # the decoder only
    fresh = Engine(tiny_model, device="cpu", precision="fp32", batch_size=4).segment(v, ["liver"], plane="coronal",
                                                                                   slices=(5, 6))
    assert_same_levels(preview.probabilities, fresh.probabilities)
    assert "liver" in e._text_cache and "prefetch" not in e._text_cache  # no text work for a prefetch
    Engine(tiny_model, device="cpu", precision="fp32").prefetch(v, slices=(0, 1))  # no cache: nothing to do


def test_cache_respects_its_budget(tiny_model, monkeypatch):
    e = Engine(tiny_model, device="cpu", precision="fp32", cache_bytes=1000)  # far too small
    v = ct_volume()
    e.segment(v, ["a"])
    assert not e.segment(v, ["b"]).from_cache
    encoded = []
    real = tiny_model.encode_images
    monkeypatch.setattr(tiny_model, "encode_images", lambda pixels: encoded.append(len(pixels)) or real(pixels))
    e.batch_size = 2
    e.prefetch(v, plane="all")  # features that could not be kept: one batch tells, the rest is not encoded
    assert encoded == [2] and not e._cache


def test_several_prompts_in_one_pass_equal_separate_runs(engine):
    v = ct_volume()
    together = engine.segment(v, ["liver", "spleen", "bright"])
    for p, prompt in enumerate(["liver", "spleen", "bright"]):
        alone = engine.segment(v, [prompt])
        assert_same_levels(together.probabilities[p], alone.probabilities[0])


def test_cancel_stops_within_one_batch_and_returns_nothing(engine):
    v = ct_volume((20, 32, 32))
    calls = []
    encoded = []
    original = engine.model.encode_images
    engine.model.encode_images = lambda px: (encoded.append(len(px)), original(px))[1]
    try:
        with pytest.raises(Cancelled):
            engine.segment(v, ["x"], progress=lambda done, total: calls.append(done), cancel=lambda: len(calls) >= 1)
    finally:
        del engine.model.encode_images
    assert calls == [4]  # one batch of 4 slices, then stopped
    assert encoded == [4]


def test_memory_is_bounded_on_a_deep_volume(engine):
    """Streaming: no earlier batch's activations are alive while the next batch is encoded,
    and no batch is larger than the batch size."""
    v = Volume(blobs((120, 24, 24)), (1, 1, 1))
    alive, sizes, refs = [], [], []
    original = engine.model.encode_images

    def tracking(px):
        alive.append(sum(r() is not None for r in refs))
        sizes.append(len(px))
        features = original(px)
        refs.extend(weakref.ref(f) for f in features)
        return features

    engine.model.encode_images = tracking
    try:
        result = engine.segment(v, ["x"])
    finally:
        del engine.model.encode_images
    assert len(sizes) == 30 and max(sizes) == 4
    assert max(alive) == 0
    assert result.probabilities.shape == (1,) + v.shape and result.probabilities.dtype == np.uint8


def test_slice_range_only_touches_those_slices(engine):
    v = ct_volume()
    r = engine.segment(v, ["x"], plane="axial", slices=(3, 6))
    assert r.slice_range == (3, 6)
    assert r.probabilities[0, 3:6].reshape(3, -1).any(axis=1).all()
    assert not r.probabilities[0, :3].any() and not r.probabilities[0, 6:].any()
    with pytest.raises(InputError, match="outside"):
        engine.segment(v, ["x"], slices=(5, 50))


def test_rethreshold_and_labelmap_without_running_the_model():
    probs = np.zeros((2, 1, 2, 3), np.float32)
    probs[0, 0, 0] = [0.2, 0.6, 0.9]
    probs[1, 0, 0] = [0.7, 0.8, 0.4]
    grid = Volume(np.zeros((1, 2, 3)))
    r = SegmentationResult(grid, plan(grid, ["a", "b"]), probs, 0.5, "m", True, "cpu", "float32", 0.0)
    assert r.masks().sum() == 4 and r.masks(0.85).sum() == 1
    np.testing.assert_array_equal(r.labelmap()[0, 0], [2, 2, 1])  # overlap: higher probability wins
    np.testing.assert_array_equal(labelmap(r.masks())[0, 0], [2, 2, 1])


def test_rgb_2d_image_through_the_engine(engine):
    rgb = np.random.default_rng(0).integers(0, 255, (1, 30, 50, 3), dtype=np.uint8)
    r = engine.segment(Volume(rgb), ["polyp"])
    assert r.probabilities.shape == (1, 1, 30, 50)
    assert "255" in r.window


def test_prompt_warnings(engine, caplog):
    r = engine.segment(ct_volume((2, 16, 16)), ["", "foie à gauche", "  liver\n"])
    assert r.prompts == ["", "foie à gauche", "liver"]
    assert any("p0" in w for w in r.warnings) and any("English" in w for w in r.warnings)
    with pytest.raises(InputError, match="No prompt"):
        engine.segment(ct_volume((2, 16, 16)), [])


def test_long_prompt_is_truncated_with_a_warning(engine, caplog):
    long = "a very long description of a small pink round polyp " * 12
    r = engine.segment(ct_volume((2, 16, 16)), [long])
    assert r.probabilities.shape[0] == 1
    assert "tokens long" in caplog.text and "Shorten" in caplog.text
    assert any("tokens long" in w for w in r.warnings)  # the panel shows the result's warnings


def test_a_request_is_planned_once_and_survives_json(engine):
    """What a client sends a server: the same request, the same probabilities; a request is checked
    against the volume it runs on, and a malformed one names its problem."""
    v = ct_volume((4, 20, 24))
    request = plan(v, ["liver", " spleen "], plane="coronal", slices=(2, 9), window="abdomen", threshold=0.3,
                   post=PostProcess(keep_largest=True), cache_key=("vtkMRMLScalarVolumeNode1", 42))
    assert request.prompts == ("liver", "spleen") and request.window.describe.startswith("abdomen")
    again = type(request).from_json(request.to_json())
    assert again == request
    a, b = engine.segment(v, request), engine.segment(v, again)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    assert a.threshold == 0.3 and a.window == request.window.describe and a.slice_range == (2, 9)
    np.testing.assert_array_equal(a.masks(), b.masks(0.3, PostProcess(keep_largest=True)))
    with pytest.raises(InputError, match="planned for"):
        engine.segment(ct_volume((5, 20, 24)), request)
    with pytest.raises(InputError, match="Unknown plane 'oblique'"):  # the planner's own line
        type(request).from_json(request.to_json().replace('"coronal"', '"oblique"'))
    with pytest.raises(InputError, match="Malformed"):
        type(request).from_json("{}")
    with pytest.raises(InputError, match="not a probability"):
        plan(v, ["liver"], threshold=1.5)


@pytest.mark.parametrize("precision", ["bf16"])
def test_bf16_agrees_with_fp32(tiny_model, precision):
    v = ct_volume()
    fp32 = Engine(tiny_model, device="cpu", precision="fp32").segment(v, ["x"])
    bf16 = Engine(tiny_model, device="cpu", precision=precision).segment(v, ["x"])
    assert bf16.dtype == "bfloat16"
    agree = (fp32.masks() == bf16.masks()).mean()
    assert agree > 0.97


def test_unknown_device_and_missing_gpu_are_clear_errors(tiny_model):
    with pytest.raises(InputError, match="device"):
        Engine(tiny_model, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            Engine(tiny_model, device="cuda")


# ---- preprocessing ---------------------------------------------------------------------------

def test_window_choice():
    assert "abdomen" in choose_window(ct_volume()).describe
    from medvlsm import io
    from medvlsm.resources import resource

    chest = choose_window(io.read_image(resource("Demo", "lung1_ct_crop.nrrd")))  # the demo's chest CT
    assert chest.describe.startswith("lung (auto: chest CT") and (chest.low, chest.high) == (-1350.0, 150.0)
    assert "255" in choose_window(Volume(np.zeros((1, 4, 4), np.uint8))).describe
    mr = Volume(np.random.default_rng(0).integers(0, 3000, (3, 8, 8)).astype(np.int16))
    assert "percentile" in choose_window(mr).describe
    lung = choose_window(ct_volume(), "lung")
    assert (lung.low, lung.high) == (-1350.0, 150.0)
    assert (choose_window(ct_volume(), "40,400").low) == -160.0
    with pytest.raises(InputError, match="LEVEL,WIDTH"):
        choose_window(ct_volume(), "40,abc")
    with pytest.raises(InputError, match="Unknown window"):
        choose_window(ct_volume(), "soft")


def test_letterbox_keeps_physical_aspect_and_restores_positions():
    box = Letterbox.fit(100, 50, (1.0, 1.0), 352)
    assert (box.height, box.width, box.top, box.left) == (352, 176, 0, 88)
    aniso = Letterbox.fit(40, 200, (5.0, 1.0), 352)  # 200 mm x 200 mm physically
    assert (aniso.height, aniso.width) == (352, 352)
    stretch = Letterbox.fit(100, 50, (1.0, 1.0), 352, "stretch")
    assert (stretch.height, stretch.width) == (352, 352)
    img = torch.zeros(1, 1, 100, 50)
    img[0, 0, 10:20, 30:40] = 1
    restored = box.restore(box.apply(img))
    ys, xs = np.nonzero(restored[0, 0].numpy() > 0.5)
    assert abs(ys.mean() - 14.5) < 1 and abs(xs.mean() - 34.5) < 1


def test_model_input_is_normalised_rgb():
    slices = torch.tensor(np.full((2, 10, 10), 40, np.int16))
    x = to_model_input(slices, choose_window(ct_volume(), "abdomen"), Letterbox.fit(10, 10, (1, 1), 32),
                       (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert x.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(x.numpy(), 0.0, atol=1e-6)  # 40 HU is mid-window -> 0.5 -> (0.5-0.5)/0.25


# ---- post-processing -------------------------------------------------------------------------

def test_postprocess_keep_largest_min_size_fill_holes():
    m = np.zeros((5, 12, 12), bool)
    m[1:4, 1:6, 1:6] = True  # 75 voxels
    m[2, 3, 3] = False  # a hole
    m[2, 9:11, 9:11] = True  # 4-voxel island
    assert PostProcess(keep_largest=True)(m)[2, 9:11, 9:11].sum() == 0
    assert PostProcess(min_voxels=5)(m).sum() == m.sum() - 4
    assert PostProcess(fill_holes=True)(m)[2, 3, 3]
    assert PostProcess()(m) is m


def test_labelmap_follows_argmax_with_ties_to_the_earlier_prompt_in_little_memory():
    import tracemalloc

    from medvlsm.postprocess import labelmap

    rng = np.random.default_rng(0)
    probabilities = (rng.integers(0, 5, (3, 6, 20, 20)) * 60).astype(np.uint8)  # many ties
    masks = probabilities > 70
    masks[0, 0, 0, 0] = True  # a filled hole: in the mask whatever its probability (0 here)
    probabilities[:, 0, 0, 0] = 0
    scores = np.where(masks, probabilities.astype(int), -1)
    expected = np.where(masks.any(0), scores.argmax(0) + 1, 0)
    np.testing.assert_array_equal(labelmap(masks, probabilities), expected)
    big = rng.integers(0, 256, (3, 128, 128, 128), dtype=np.uint8)
    big_masks = big > 127
    tracemalloc.start()
    labelmap(big_masks, big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak <= 1.5 * big[0].size  # bytes per voxel: the labels and a slab, not a float copy + int64 argmax


def test_uint8_probabilities_cut_like_float32_within_half_a_step():
    """The result keeps round(p x 255): at any threshold its mask is the float32 mask except where p lies
    within half a quantisation step of the threshold."""
    from medvlsm.postprocess import LEVELS, quantise, threshold

    rng = np.random.default_rng(1)
    p = np.concatenate([rng.random(200_000, dtype=np.float32), np.arange(256, dtype=np.float32) / 255,
                        (np.arange(255, dtype=np.float32) + 0.5) / 255])  # also the levels and the boundaries
    q = quantise(p)
    assert q.dtype == np.uint8 and np.abs(q / LEVELS - p).max() <= 0.5 / LEVELS + 1e-7
    for t in list(rng.random(50)) + [0.5, 0.35, 1 / 255, 254 / 255, 127.5 / 255]:
        differ = threshold(q, t) != (p > t)
        assert np.abs(p[differ] - t).max(initial=0) <= 0.5 / LEVELS + 1e-6, t
    import torch

    assert torch.equal(quantise(torch.from_numpy(p)), torch.from_numpy(q))  # the engine quantises in torch


@pytest.mark.parametrize("fusion", ["mean", "max", "majority"])
def test_all_three_planes_fuse_the_single_plane_results_on_the_grid(tiny_model, fusion):
    """Each plane without resampling, fused voxel by voxel on a grid whose planes are not its array axes;
    progress counts the three planes' slices; a re-prompt of every plane runs from the cache."""
    from medvlsm.volume import PLANES

    v = Volume(blobs((9, 22, 26), seed=2), (0.7, 0.9, 2.0), (5, 6, 7), np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float))
    engine = Engine(tiny_model, device="cpu", precision="fp32", cache_bytes=1 << 28)
    calls = []
    fused = engine.segment(v, ["liver", "spleen"], plane="all", fusion=fusion, progress=lambda d, t: calls.append((d, t)))
    single = np.stack([engine.segment(v, ["liver", "spleen"], plane=p).probabilities for p in PLANES])
    expected = {"mean": np.rint(single.mean(0)), "max": single.max(0),
                "majority": (single > 0.5 * 255).sum(0) * 85}[fusion]
    assert fused.probabilities.dtype == np.uint8
    np.testing.assert_array_equal(fused.probabilities, expected.astype(np.uint8))
    assert fused.threshold == 0.5 and fused.plane == "all" and calls[-1] == (sum(v.shape), sum(v.shape))
    assert engine.segment(v, ["kidney"], plane="all", fusion=fusion).from_cache
    fresh = Engine(tiny_model, device="cpu", precision="fp32", cache_bytes=1 << 28)
    fresh.prefetch(v, plane="all")  # while the prompt is typed: every slice of each plane
    assert fresh.segment(v, ["kidney"], plane="all", fusion=fusion).from_cache
    with pytest.raises(InputError, match="belongs to one plane"):
        plan(v, ["liver"], plane="all", slices=(0, 2))
    with pytest.raises(InputError, match="Unknown fusion"):
        plan(v, ["liver"], plane="all", fusion="median")
    request = plan(v, ["liver"], plane="all", fusion=fusion)
    assert type(request).from_json(request.to_json()) == request
    # i runs anterior-posterior, j inferior-superior, k left-right: 22 axial, 26 coronal, 9 sagittal slices
    assert planes_cost(v) == "22 axial + 26 coronal + 9 sagittal slices, 2.6x one axial run"
