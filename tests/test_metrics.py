"""Each metric against a hand-computed example (and torchmetrics where it has the metric)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torchmetrics.functional.classification import binary_f1_score, multilabel_f1_score

from pipeline import metrics
from pipeline.inception import FIDInceptionV3

# -- segmentation -----------------------------------------------------------------------------------------


def test_confusion_and_tokenfusion_scores_by_hand():
    # two 2x3 "images"; 255 pixels are ignored whatever is predicted there; class 3 absent from both
    target = torch.tensor([[[0, 0, 1], [1, 255, 2]]])
    pred = torch.tensor([[[0, 1, 1], [1, 2, 0]]])
    conf = metrics.confusion_matrix(pred, target, num_classes=4)
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    s = metrics.segmentation_scores(conf)
    assert s["pixacc"] == pytest.approx(3 / 5)
    assert s["macc"] == pytest.approx((1 / 2 + 2 / 2 + 0 / 1) / 3)  # class 3 (no ground truth) excluded
    assert s["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)  # class 3 (absent from both) excluded


def test_class_predicted_but_absent_from_ground_truth_counts_in_miou_not_macc():
    target = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 2, 1, 1]])  # class 2 never in the ground truth
    s = metrics.segmentation_scores(metrics.confusion_matrix(pred, target, 3))
    assert s["macc"] == pytest.approx((1 / 2 + 1) / 2)
    assert s["miou"] == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_one_matrix_over_the_split_not_a_mean_of_batches():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (6, 5, 5), generator=g)
    target[target == 2] = torch.where(torch.rand((target == 2).sum(), generator=g) < 0.3, 255, 2)
    pred = torch.randint(0, 3, (6, 5, 5), generator=g)
    valid = torch.tensor([True, True, True, True, False, False])  # last two: padding of an exact pass
    split = metrics.confusion_matrix(pred[:4], target[:4], 3)
    summed = metrics.confusion_matrix(pred[:3], target[:3], 3) + metrics.confusion_matrix(
        pred[3:], target[3:], 3, valid=valid[3:]
    )
    assert torch.equal(split, summed)
    per_batch = np.mean(
        [
            metrics.segmentation_scores(metrics.confusion_matrix(pred[i : i + 1], target[i : i + 1], 3))["miou"]
            for i in range(4)
        ]
    )
    assert metrics.segmentation_scores(split)["miou"] != pytest.approx(per_batch)


def test_segmentation_bad_labels_are_errors():
    with pytest.raises(ValueError, match="ground-truth label 7"):
        metrics.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)
    with pytest.raises(ValueError, match="predicted class"):
        metrics.confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="empty"):
        metrics.segmentation_scores(torch.zeros(3, 3))


# -- classification ---------------------------------------------------------------------------------------

TARGET = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 0]])
PROBS = torch.tensor([[0.9, 0.2, 0.4], [0.6, 0.7, 0.1], [0.1, 0.2, 0.3], [0.8, 0.5, 0.0]])  # 0.5 is not > 0.5


def test_f1_by_hand():
    s = metrics.multilabel_sums(PROBS, TARGET)
    assert s["tp"].tolist() == [2, 1, 0] and s["fp"].tolist() == [1, 0, 0] and s["fn"].tolist() == [0, 1, 1]
    f = metrics.f1_scores(s["tp"], s["fp"], s["fn"], s["samples_f1_sum"], s["count"])
    per_label = [4 / 5, 2 / 3, 0.0]
    assert f["micro_f1"] == pytest.approx(6 / 9)
    assert f["macro_f1"] == pytest.approx(sum(per_label) / 3)
    assert f["weighted_f1"] == pytest.approx((2 * 4 / 5 + 2 * 2 / 3 + 0) / 5)
    # per sample: 2/3, 2/3, 0 (no true, no predicted label: zero_division=0), 2/3
    assert f["samples_f1"] == pytest.approx((2 / 3 * 3 + 0) / 4)


def test_f1_matches_torchmetrics():
    g = torch.Generator().manual_seed(1)
    probs, target = torch.rand(40, 6, generator=g), (torch.rand(40, 6, generator=g) < 0.3).long()
    target[:, 5] = 0  # a label that is never true
    s = metrics.multilabel_sums(probs, target)
    f = metrics.f1_scores(s["tp"], s["fp"], s["fn"], s["samples_f1_sum"], s["count"])
    for avg in ("micro", "macro", "weighted"):
        ref = multilabel_f1_score(probs, target, num_labels=6, average=avg, threshold=0.5, zero_division=0)
        assert f[f"{avg}_f1"] == pytest.approx(float(ref), abs=1e-6)
    # per-sample F1 = binary F1 over each row's labels
    ref = binary_f1_score(probs, target, threshold=0.5, multidim_average="samplewise", zero_division=0)
    assert f["samples_f1"] == pytest.approx(float(ref.mean()), abs=1e-6)


def test_valid_mask_drops_padding_samples():
    valid = torch.tensor([True, True, False, False])
    s = metrics.multilabel_sums(PROBS, TARGET, valid=valid)
    assert s["count"] == 2 and s["tp"].tolist() == [1, 1, 0] and s["fp"].tolist() == [1, 0, 0]


# -- translation, density, finalize -----------------------------------------------------------------------


def test_regression_sums_and_finalize():
    pred = torch.tensor([[[0.0, 0.5], [1.0, 0.25]]])
    target = torch.tensor([[[0.5, 0.5], [0.0, 0.0]]])
    s = metrics.regression_sums(pred, target) | {"count": torch.tensor(1.0)}
    out = metrics.finalize("translation", s)
    assert out["mae"] == pytest.approx((0.5 + 0 + 1 + 0.25) / 4)
    assert out["mse"] == pytest.approx((0.25 + 0 + 1 + 0.0625) / 4)


def test_finalize_every_task_and_errors():
    assert metrics.finalize(
        "density", {"bits_per_dim_sum": torch.tensor(12.0), "count": torch.tensor(4.0), "nll_sum": torch.tensor(2.0)}
    ) == {"bits_per_dim": 3.0, "nll": 0.5}
    conf = torch.tensor([[3, 1], [0, 4]])
    seg = metrics.finalize(
        "segmentation", {"confusion": conf, "count": torch.tensor(2.0), "task_loss_sum": torch.tensor(1.0)}
    )
    assert seg == pytest.approx(
        {"pixacc": 7 / 8, "macc": (3 / 4 + 1) / 2, "miou": (3 / 4 + 4 / 5) / 2, "task_loss": 0.5}
    )
    s = metrics.multilabel_sums(PROBS, TARGET)
    assert set(metrics.finalize("classification", s)) == {"micro_f1", "macro_f1", "weighted_f1", "samples_f1"}
    with pytest.raises(ValueError, match=r"lack \['confusion'\]"):
        metrics.finalize("segmentation", {"count": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="unknown task"):
        metrics.finalize("detection", {})
    assert metrics.bits_per_dim(100 * math.log(2) * 3, 100) == pytest.approx(3.0)


# -- FID / KID --------------------------------------------------------------------------------------------


def _images(seed: int, n: int, shift: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 200, (n, 3, 32, 32), generator=g) + shift).clamp(0, 255).to(torch.uint8)


def test_proxy_distances_match_the_formulas_and_are_never_called_fid():
    real, fake = _images(0, 12), _images(1, 10, shift=40)
    out = metrics.image_distances(real, fake, kid_subsets=1, kid_subset_size=10)
    assert set(out) == {"fid_proxy", "kid_proxy"}
    net = metrics.RandomConvFeatures()
    fr, ff = net(real).double().numpy(), net(fake).double().numpy()
    mu1, mu2 = fr.mean(0), ff.mean(0)
    s1, s2 = np.cov(fr, rowvar=False), np.cov(ff, rowvar=False)
    fid = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert out["fid_proxy"] == pytest.approx(fid, rel=1e-3)
    # KID: unbiased MMD² with the cubic polynomial kernel k(x,y) = (x·y/d + 1)^3; the subset is every sample
    # (any order gives the same MMD), so the number is deterministic
    out = metrics.image_distances(real[:10], fake, kid_subsets=1, kid_subset_size=10)
    x, y, d, m = fr[:10], ff, fr.shape[1], 10
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    mmd = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    assert out["kid_proxy"] == pytest.approx(100 * mmd, rel=1e-3)
    same = metrics.image_distances(real, real, kid_subsets=1, kid_subset_size=12)
    assert abs(same["fid_proxy"]) < 1e-3 * out["fid_proxy"]


def _synthetic_inception_state() -> dict[str, torch.Tensor]:
    """A state dict with the published pt_inception key names and random values (no num_batches_tracked)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, v in FIDInceptionV3().state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.endswith("running_var"):
            state[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            state[k] = torch.randn(v.shape, generator=g) * 0.05
    return state


def test_inception_loads_the_published_key_names(tmp_path):
    state = _synthetic_inception_state()
    # the pt_inception-2015-12-05 layout: 94 conv+BN units (5 keys each) and the 1008-way fc
    assert len(state) == 94 * 5 + 2
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert state["Mixed_6e.branch7x7dbl_5.bn.running_var"].shape == (192,)
    assert state["fc.weight"].shape == (1008, 2048)
    path = tmp_path / "pt_inception.pth"
    torch.save(state, path)
    net = FIDInceptionV3.from_file(str(path))
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    feats = net(_images(2, 2))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    net, prefix = metrics.feature_extractor(str(path))
    assert prefix == "fid" and isinstance(net, FIDInceptionV3)


def test_inception_weights_errors_name_the_problem(tmp_path):
    state = _synthetic_inception_state()
    missing = dict(state)
    del missing["Mixed_5b.branch_pool.conv.weight"]
    with pytest.raises(ValueError, match=r"1 missing \(e.g. \['Mixed_5b.branch_pool.conv.weight'\]"):
        FIDInceptionV3.from_state_dict(missing)
    wrong = dict(state) | {"fc.weight": torch.zeros(1000, 2048)}
    with pytest.raises(ValueError, match=r"fc.weight has shape \(1000, 2048\)"):
        FIDInceptionV3.from_state_dict(wrong)
    extra = dict(state) | {"AuxLogits.fc.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="1 unexpected"):
        FIDInceptionV3.from_state_dict(extra)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch weights file"):
        metrics.image_distances(_images(0, 2), _images(1, 2), inception_weights=str(junk))
    with pytest.raises(ValueError, match="no such file"):
        FIDInceptionV3.from_file(str(tmp_path / "absent.pth"))


# -- the loop's evaluate(): sums of any shape reduced exactly across real gloo ranks ----------------------


class _SegmentationEngine(torch.nn.Module):
    """Stands in for the DeepSpeed engine: the prediction is carried in the batch, so the eval sums are known."""

    def forward(self, batch, mode):
        assert mode == "eval"
        valid = batch["__valid__"]
        w = valid.double()
        return {
            "confusion": metrics.confusion_matrix(batch["pred"], batch["label"], 3, valid=valid),
            "task_loss_sum": (batch["loss"] * w).sum(),
            "count": w.sum(),
        }


def _split(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 3, (5, 4, 4), generator=g)
    label[0, 0] = 255
    return label, torch.randint(0, 3, (5, 4, 4), generator=g), torch.rand(5, generator=g).double()


def _rank_batches(rank: int):
    """Rank 0 holds samples 0, 2, 4, rank 1 holds 1, 3 and one padding sample (the loader keeps ranks in step)."""
    label, pred, loss = _split()
    idx = [[0, 2], [4]] if rank == 0 else [[1, 3], [0]]
    valid = [[True, True], [True]] if rank == 0 else [[True, True], [False]]
    return [
        {"label": label[i], "pred": pred[i], "loss": loss[i], "__valid__": torch.tensor(v)} for i, v in zip(idx, valid)
    ]


def _evaluate_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as tdist

    from pipeline.config import Config
    from pipeline.train.loop import evaluate

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    cfg = Config()
    cfg.model.task = "segmentation"
    result = evaluate(_SegmentationEngine(), cfg, _rank_batches(rank), torch.device("cpu"))
    torch.save(result, f"{out}.{rank}")
    tdist.destroy_process_group()


def test_evaluate_reduces_arbitrary_shaped_sums_exactly_across_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    import pipeline.train.loop  # noqa: F401  (imported once here; the forked ranks inherit it)

    mp.start_processes(
        _evaluate_worker,
        args=(f"file://{tmp_path}/store", str(tmp_path / "out")),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    label, pred, loss = _split()
    expected = {
        f"val_{k}": v
        for k, v in metrics.finalize(
            "segmentation",
            {
                "confusion": metrics.confusion_matrix(pred, label, 3),
                "task_loss_sum": loss.sum(),
                "count": torch.tensor(5.0),
            },
        ).items()
    } | {"val_samples": 5.0}
    for rank in range(2):
        assert torch.load(tmp_path / f"out.{rank}") == pytest.approx(expected, rel=1e-12)
