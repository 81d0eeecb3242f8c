"""Prediction pieces on real CamVid images: TTA, voting, subset scoring, the submission writer."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from training.evaluation.ensemble import iter_predictions
from training.evaluation.inference import predict_proba
from training.evaluation.members import Member, MultiInputTransform, assign_inputs
from training.evaluation.selection import SubsetScorer, greedy_select
from training.evaluation.tta import TTA
from training.evaluation.vote import hard_vote, soft_vote, vote
from training.evaluation.submission import HEADER, SubmissionWriter, check_submission, iter_submission, write_submission

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def camvid_batch(camvid_small):
    """Config, index and 4 real CamVid images through the eval transform at 64 px."""
    from training.config import load_space
    from training.data.coco import load_coco

    space = load_space("deeplab", smoke=True, overrides={"data.root": str(camvid_small)})
    cfg = space.resolve({"model.encoder": "mobilenet_v2"})
    index = load_coco(camvid_small, "train.json")
    from training.data.dataset import ImageDataset
    from training.evaluation.members import InputSpec

    from training.data.transforms import normalize_images

    ds = ImageDataset(index, index.image_ids[:4], InputSpec.of(cfg).transform())
    images = normalize_images(torch.stack([ds[i][0] for i in range(4)]), cfg.augment.mean, cfg.augment.std)
    return cfg, index, images


def make_model(cfg, seed: int, num_classes: int = 12):
    from training.modeling.models import build_model

    torch.manual_seed(seed)
    model = build_model(cfg.model, num_classes).eval()
    # A random model barely depends on its input; perturbing BN stats makes flips matter.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
    return model


def manual_probs(model, x, size, dims=()):
    with torch.no_grad():
        x = x.flip(dims) if dims else x
        logits = model(x)
        logits = logits.flip(dims) if dims else logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).softmax(1)


def test_flip_tta_equals_manual_flip_predict_unflip(camvid_batch):
    cfg, _, images = camvid_batch
    model = make_model(cfg, seed=0)
    size = (96, 96)
    plain = manual_probs(model, images, size)
    hflip = manual_probs(model, images, size, (3,))
    vflip = manual_probs(model, images, size, (2,))
    got_h = predict_proba(model, images, size, TTA(hflip=True))
    torch.testing.assert_close(got_h, (plain + hflip) / 2, rtol=1e-5, atol=1e-6)
    got_hv = predict_proba(model, images, size, TTA.parse("flip,vflip"))
    torch.testing.assert_close(got_hv, (plain + hflip + vflip) / 3, rtol=1e-5, atol=1e-6)
    # The views really differ (otherwise the test proves nothing).
    assert (hflip - plain).abs().max() > 1e-3
    torch.testing.assert_close(predict_proba(model, images, size, TTA()), plain, rtol=1e-5, atol=1e-6)


def test_scale_tta_resizes_input_and_back(camvid_batch):
    cfg, _, images = camvid_batch
    model = make_model(cfg, seed=1)
    size = (64, 64)
    expected = manual_probs(model, images, size)
    for side in (48, 80):  # 0.75 and 1.25 of 64, multiples of DeepLabV3+'s divisor 16
        scaled = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
        expected = expected + manual_probs(model, scaled, size)
    got = predict_proba(model, images, size, TTA.parse("scale", (0.75, 1.25)), divisor=16)
    torch.testing.assert_close(got, expected / 3, rtol=1e-5, atol=1e-6)


def test_tta_parse():
    assert TTA.parse("flip") == TTA.parse("hflip") == TTA(hflip=True)
    assert TTA.parse("flip,vflip") == TTA(hflip=True, vflip=True)
    assert TTA.parse("hflip,scale", (0.5, 1.5)).scales == (0.5, 1.0, 1.5)
    assert TTA.parse("none") == TTA() and not TTA().enabled and TTA().name == "none"
    assert TTA.parse("hflip").views() == [(1.0, ()), (1.0, (3,))]
    with pytest.raises(ValueError, match="unknown TTA"):
        TTA.parse("mirror")


def _probs(*pixels):
    """One model's probabilities for a 1 x 1 image per argument: [p_class0, p_class1, ...]."""
    return torch.tensor(pixels, dtype=torch.float32).T[None, :, None, :]  # 1 x C x 1 x W


def test_soft_vs_hard_vote_on_crafted_probabilities():
    # Pixel 0: two models mildly for class 0, one strongly for class 1.
    #   soft: mean = [0.27, 0.53, 0.20] -> 1;  hard: 2 votes for 0 -> 0.
    # Pixel 1: a 1:1 vote tie between 0 and 1; mean prob [0.325, 0.675] -> both pick 1.
    # Pixel 2: a 1:1 tie and equal mean probabilities -> the lowest class id (0).
    # Pixel 3: a 1:1:1 tie; class 2 has the highest mean prob -> 2 (class 1's mean is lower).
    m1 = _probs([0.4, 0.3, 0.3], [0.55, 0.45, 0.0], [0.6, 0.4, 0.0], [0.5, 0.2, 0.3])
    m2 = _probs([0.4, 0.3, 0.3], [0.1, 0.9, 0.0], [0.4, 0.6, 0.0], [0.1, 0.6, 0.3])
    m3 = _probs([0.0, 1.0, 0.0], [0.55, 0.45, 0.0], [0.6, 0.4, 0.0], [0.1, 0.3, 0.6])
    # Pixels 1 and 2 are about two voters: scored with m1 and m2 only.
    assert soft_vote([m1, m2, m3])[0, 0].tolist()[0] == 1
    assert hard_vote([m1, m2, m3])[0, 0].tolist()[0] == 0
    assert hard_vote([m1, m2])[0, 0].tolist()[1:3] == [1, 0]
    assert soft_vote([m1, m2])[0, 0].tolist()[1:3] == [1, 0]
    assert hard_vote([m1, m2, m3])[0, 0].tolist()[3] == 2
    assert vote(torch.stack([m1, m2, m3]), "soft").shape == (1, 1, 4)
    with pytest.raises(ValueError):
        vote([m1], "median")


def test_subset_scorer_and_greedy_selection():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8))
    good = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 0.6 + 0.1  # right everywhere
    noise = [torch.rand(2, 3, 8, 8).softmax(1) for _ in range(2)]
    per_config = [(good, good), (noise[0], noise[0]), (noise[1], noise[1])]
    scorer = SubsetScorer(3, 3, modes=("none", "hflip"))
    scorer.update(per_config, target)
    assert scorer.scores("none", "soft", 0b001).miou == 1.0
    for i, (probs, _) in enumerate(per_config):  # singletons = the model's own argmax
        from training.evaluation.metrics import ConfusionMatrix

        cm = ConfusionMatrix(3)
        cm.update(probs.argmax(1), target)
        np.testing.assert_array_equal(scorer.matrix("none", "hard", 1 << i), cm.matrix.numpy())
    score_of = {s: scorer.scores("none", "soft", s).miou for s in range(1, 8)}
    chosen, steps = greedy_select(score_of, 3)
    assert chosen == 0b001 and len(steps) == 1  # adding noise never helps a perfect model
    # Greedy stops at the first step that does not improve, never below the best single.
    crafted = {0b001: 0.5, 0b010: 0.6, 0b100: 0.4, 0b011: 0.7, 0b110: 0.65, 0b101: 0.45, 0b111: 0.69}
    chosen, steps = greedy_select(crafted, 3)
    assert chosen == 0b011 and [s["miou"] for s in steps] == [0.6, 0.7]


def test_ensemble_prediction_streams_models_with_different_inputs(camvid_batch):
    """Two configs at different image sizes share one DataLoader pass; masks are the soft vote
    in the larger model's frame (96 px), resized nearest-neighbour to 256 only as labels."""
    import cv2

    from training.data.dataset import ImageDataset

    cfg64, index, _ = camvid_batch
    cfg96 = cfg64.model_copy(update={"data": cfg64.data.model_copy(update={"image_size": 96})})
    members = [Member(1, 0, make_model(cfg64, 2), cfg64, divisor=16), Member(2, 0, make_model(cfg96, 3), cfg96, divisor=16)]
    specs = assign_inputs(members)
    assert len(specs) == 2 and [m.input_index for m in members] == [0, 1]
    ids = index.image_ids[:3]
    loader = DataLoader(ImageDataset(index, ids, MultiInputTransform(specs)), batch_size=2)
    out = list(iter_predictions(members, loader, (256, 256), TTA(hflip=True), "soft"))
    assert [i for i, _ in out] == ids
    from training.data.transforms import normalize_images

    inputs = [normalize_images(torch.stack([spec.transform()(image=_read(index, i))["image"] for i in ids]), spec.mean, spec.std) for spec in specs]
    expected = soft_vote([predict_proba(m.model, inputs[m.input_index], (96, 96), TTA(hflip=True)) for m in members])
    for (_, mask), exp in zip(out, expected):
        assert mask.shape == (256, 256) and mask.dtype == np.uint8
        exp = cv2.resize(exp.numpy().astype(np.uint8), (256, 256), interpolation=cv2.INTER_NEAREST)
        np.testing.assert_array_equal(mask, exp)


def _read(index, image_id):
    from training.data.coco import read_image

    return read_image(index.image_path(image_id))


# ---- submission writer -------------------------------------------------------------------------


def _masks(n: int, num_classes: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield f"images/test/{i:04d}.jpg", rng.integers(0, num_classes, (256, 256), dtype=np.uint8)


def test_submission_format(tmp_path):
    path = tmp_path / "submission.csv"
    masks = dict(_masks(3))
    assert write_submission(path, iter(masks.items()), num_classes=12) == 3
    raw = path.read_bytes()
    assert b"\r" not in raw and raw.count(b"\n") == 4 and raw.endswith(b"\n")  # LF line ends, not csv's CRLF
    # Parsed by hand (not with our reader): a header line, then `image_id,<65536 ints>` per image.
    rows = [line.split(",", 1) for line in path.read_text().splitlines()]
    assert tuple(rows[0]) == HEADER and len(rows) == 4
    for (image_id, tokens), (want_id, want_mask) in zip(rows[1:], masks.items()):
        values = tokens.split(" ")
        assert image_id == want_id and len(values) == 65536
        np.testing.assert_array_equal(np.array(values, dtype=np.int64).reshape(256, 256), want_mask)  # row-major
    assert check_submission(path, list(masks), 12) == 3
    assert [i for i, _ in iter_submission(path)] == list(masks)
    with pytest.raises(ValueError, match="256x256"):
        write_submission(tmp_path / "bad.csv", [("x", np.zeros((64, 64), np.uint8))])
    assert not (tmp_path / "bad.csv").exists()  # an aborted write leaves no partial file
    with pytest.raises(ValueError, match="num_classes"):
        write_submission(tmp_path / "bad.csv", [("x", np.full((256, 256), 12, np.uint8))], num_classes=12)


def test_submission_writer_streams(tmp_path):
    """The writer consumes a generator row by row: peak memory does not grow with the image count."""
    path = tmp_path / "s.csv"
    written: list[int] = []

    def rows(n):
        with SubmissionWriter(path) as w:
            for image_id, mask in _masks(n):
                w.write(image_id, mask)
                written.append(w.rows)
        return w.rows

    def peak(n: int) -> int:
        gc.collect()
        tracemalloc.start()
        write_submission(path, _masks(n))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(10), peak(20)
    # A row is ~150 kB of text; a writer that buffered rows would peak ~1.5 MB higher at 20.
    assert large < small * 1.25 + 256 * 1024, (small, large)
    assert rows(3) == 3 and written == [1, 2, 3]


def test_tta_candidates_are_every_subset_of_the_allowed_views():
    from training.evaluation.selection import tta_candidates

    names = [t.name for t in tta_candidates(TTA.parse("flip,scale", (0.75, 1.0, 1.25)))]
    assert names == ["none", "scale(0.75,1)", "scale(1,1.25)", "scale(0.75,1,1.25)",
                     "hflip", "hflip+scale(0.75,1)", "hflip+scale(1,1.25)", "hflip+scale(0.75,1,1.25)"]
    assert [t.name for t in tta_candidates(TTA())] == ["none"]


def _oof_fold(tmp_path, probs, target):
    from training.evaluation.selection import OOFFold, quantize

    OOFFold.save(tmp_path / "f", list(range(target.shape[0])), np.stack([quantize(p) for p in probs]), target.numpy().astype(np.uint8))
    return OOFFold.load(tmp_path / "f")


def test_greedy_weights_with_replacement_never_below_the_best_single(tmp_path):
    from training.evaluation.selection import ensemble_matrix, greedy_weights
    from training.evaluation.metrics import SegScores

    torch.manual_seed(1)
    target = torch.randint(0, 3, (4, 16, 16))
    truth = F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    probs = [(truth * w + torch.rand(4, 3, 16, 16) * (1 - w)).softmax(1) for w in (0.6, 0.3, 0.2)]
    fold = _oof_fold(tmp_path, probs, target)
    weights, score, steps = greedy_weights([fold], "soft", 3, None)
    singles = [SegScores.from_matrix(ensemble_matrix([fold], [int(i == j) for j in range(3)], "soft", 3, None)).miou for i in range(3)]
    assert steps[0]["miou"] == max(singles) and score >= max(singles) and weights[int(np.argmax(singles))] >= 1
    assert score == max(s["miou"] for s in steps) and sum(weights) <= len(steps)
    assert SegScores.from_matrix(ensemble_matrix([fold], weights, "soft", 3, None)).miou == score


def test_postprocess_removes_small_components_only_where_oof_improves(tmp_path):
    from training.evaluation.postprocess import PostProcess
    from training.evaluation.selection import search_postprocess

    target = torch.zeros(2, 32, 32, dtype=torch.long)
    target[:, 4:20, 4:20] = 1  # one large object of class 1 per image; class 2 is never there
    probs = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 0.8 + 0.1
    probs[:, 2, 28:30, 28:30] = 0.95  # 4-pixel false specks of class 2, next best: background
    fold = _oof_fold(tmp_path, [probs], target)
    found, candidates = search_postprocess([fold], [1], "soft", 3, None)
    assert found.min_area.get(2, 0) > 0 and 1 not in found.min_area  # removing the object would hurt class 1
    assert {c["class_id"] for c in candidates} == {1, 2}
    labels = probs.argmax(1)[0].numpy().astype(np.uint8)
    cleaned = found.apply(labels, probs[0].numpy())
    assert (cleaned == target[0].numpy()).all() and (labels != cleaned).sum() == 4
    assert PostProcess.from_names(found.to_names(["bg", "a", "b"]), ["bg", "a", "b"]) == found
