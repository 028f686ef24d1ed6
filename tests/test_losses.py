"""Losses on hand-made tensors whose correct value is computed by hand here, plus gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from medseg.errors import ConfigError
from medseg.losses import (
    DeepSupervisionLoss,
    DualSelfDistillationLoss,
    FocalTverskyLoss,
    FocalTverskyMIPLoss,
    MIPLoss,
    SideHead,
    build_loss,
    kl_distillation,
    nnunet_deep_supervision_weights,
    segmentation_loss,
)
from medseg.networks import NetworkOutput, create_network, network_entry


def focal_tversky_by_hand(tp: float, fn: float, fp: float, alpha=0.7, beta=0.3, gamma=0.75, smooth=1.0) -> float:
    ti = (tp + smooth) / (tp + alpha * fn + beta * fp + smooth)
    return (1 - ti) ** gamma


# ------------------------------------------------------------------------------ focal Tversky
def test_focal_tversky_on_probabilities_matches_the_spockmip_formula():
    p = torch.tensor([0.9, 0.2, 0.6, 0.1, 0.7, 0.0]).reshape(1, 1, 6, 1, 1)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0]).reshape(1, 1, 6, 1, 1)
    # TP = .9 + .1 + .7 = 1.7 ; FN = .1 + .9 + .3 = 1.3 ; FP = .2 + .6 + 0 = 0.8
    expected = focal_tversky_by_hand(1.7, 1.3, 0.8)
    loss = FocalTverskyLoss(activation=None, to_onehot_y=False)(p, y)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_focal_tversky_is_computed_over_the_flattened_batch():
    p = torch.tensor([[0.8, 0.4], [0.3, 0.0]]).reshape(2, 1, 2, 1, 1)
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).reshape(2, 1, 2, 1, 1)
    # over both samples: TP = .8 + .3 = 1.1 ; FN = .2 + .7 = .9 ; FP = .4
    loss = FocalTverskyLoss(activation=None, to_onehot_y=False, batch=True)(p, y)
    assert loss.item() == pytest.approx(focal_tversky_by_hand(1.1, 0.9, 0.4), rel=1e-5)


def test_focal_tversky_softmax_averages_classes_and_weighs_false_negatives_more():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).T.reshape(1, 2, 3, 1, 1)
    label = torch.tensor([0, 1, 1]).reshape(1, 1, 3, 1, 1)
    p = torch.softmax(logits, 1)[0, :, :, 0, 0]  # (2 classes, 3 voxels)
    per_class = []
    for c in range(2):
        y = (label.flatten() == c).float()
        tp, fn, fp = float((p[c] * y).sum()), float(((1 - p[c]) * y).sum()), float((p[c] * (1 - y)).sum())
        per_class.append(focal_tversky_by_hand(tp, fn, fp))
    loss = FocalTverskyLoss()(logits, label)
    assert loss.item() == pytest.approx(sum(per_class) / 2, rel=1e-5)
    # missing foreground costs more than the same amount of spurious foreground (alpha 0.7 > beta 0.3)
    missed = FocalTverskyLoss(activation=None, to_onehot_y=False)(
        torch.tensor([0.0, 0.0]).reshape(1, 1, 2, 1, 1), torch.tensor([1.0, 0.0]).reshape(1, 1, 2, 1, 1)
    )
    spurious = FocalTverskyLoss(activation=None, to_onehot_y=False)(
        torch.tensor([1.0, 1.0]).reshape(1, 1, 2, 1, 1), torch.tensor([1.0, 0.0]).reshape(1, 1, 2, 1, 1)
    )
    assert missed > spurious


def test_focal_tversky_gradient_pushes_towards_the_label():
    logits = torch.zeros(1, 3, 4, 4, 4, requires_grad=True)
    label = torch.randint(0, 3, (1, 1, 4, 4, 4))
    FocalTverskyLoss()(logits, label).backward()
    grad = logits.grad
    assert torch.isfinite(grad).all()
    onehot = F.one_hot(label[:, 0], 3).permute(0, 4, 1, 2, 3).bool()
    assert (grad[onehot] < 0).all()  # raising the true class's logit lowers the loss


# ------------------------------------------------------------------------------ MIP
def test_mip_projects_along_z_the_last_axis_of_bhwd():
    # a foreground line along z (D) at (h=0, w=1): its z-MIP is one pixel
    label = torch.zeros(1, 1, 2, 2, 3)
    label[0, 0, 0, 1, :] = 1
    prob = torch.full((1, 1, 2, 2, 3), 0.1)
    prob[0, 0, 0, 1, 2] = 0.9  # the prediction sees the vessel in one slice only
    logits = torch.logit(prob)
    # z-MIP of p: 0.9 at (0, 1), 0.1 elsewhere (3 pixels); of y: 1 at (0, 1)
    tp, fn, fp = 0.9, 0.1, 0.3
    loss = MIPLoss(axis="z", activation="sigmoid")(logits, label)
    assert loss.item() == pytest.approx(focal_tversky_by_hand(tp, fn, fp), rel=1e-5)


def test_mip_multi_is_the_sum_of_the_three_axis_terms():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 4, 5, 6)
    label = (torch.rand(2, 1, 4, 5, 6) > 0.7).float()
    p = torch.sigmoid(logits)
    expected = 0.0
    for dim in (2, 3, 4):
        pm, ym = p.amax(dim), label.amax(dim)
        tp, fn, fp = float((pm * ym).sum()), float(((1 - pm) * ym).sum()), float((pm * (1 - ym)).sum())
        expected += focal_tversky_by_hand(tp, fn, fp)
    loss = MIPLoss(axis="multi", activation="sigmoid")(logits, label)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_mip_softmax_projects_each_class_and_skips_background():
    logits = torch.zeros(1, 3, 2, 2, 2)
    logits[0, 1, 0, 0, 1] = 4.0
    label = torch.zeros(1, 1, 2, 2, 2, dtype=torch.long)
    label[0, 0, 0, 0, :] = 1
    label[0, 0, 1, 1, 0] = 2
    p = torch.softmax(logits, 1)
    expected = 0.0
    for c in (1, 2):  # background excluded
        pm = p[0, c].amax(-1)
        ym = (label[0, 0] == c).float().amax(-1)
        expected += focal_tversky_by_hand(
            float((pm * ym).sum()), float(((1 - pm) * ym).sum()), float((pm * (1 - ym)).sum())
        )
    loss = MIPLoss(axis="z", activation="softmax")(logits, label)
    assert loss.item() == pytest.approx(expected / 2, rel=1e-5)  # mean over the foreground classes


def test_mip_accepts_the_whole_volume_projection_cropped_to_the_patch():
    # the vessel leaves the patch in z: inside the patch's z-range it is absent, but the whole-volume
    # MIP (cropped to the patch's in-plane window) still shows it, as SPOCKMIP's target does
    label_patch = torch.zeros(1, 1, 2, 2, 2)
    whole_mip = torch.zeros(1, 1, 2, 2)
    whole_mip[0, 0, 1, 1] = 1
    logits = torch.full((1, 1, 2, 2, 2), -5.0)
    loss_patch = MIPLoss(activation="sigmoid")(logits, label_patch)
    loss_whole = MIPLoss(activation="sigmoid")(logits, label_patch, target_mip=whole_mip)
    p = torch.sigmoid(torch.tensor(-5.0)).item()
    assert loss_whole.item() == pytest.approx(focal_tversky_by_hand(p, 1 - p, 3 * p), rel=1e-5)
    assert loss_whole > loss_patch
    with pytest.raises(ValueError, match="target_mip"):
        MIPLoss(activation="sigmoid")(logits, label_patch, target_mip=torch.zeros(1, 1, 3, 2))


def test_mip_gradient_reaches_only_the_maxima():
    logits = torch.randn(1, 1, 3, 3, 4, requires_grad=True)
    label = torch.zeros(1, 1, 3, 3, 4)
    label[0, 0, 1, 1, 2] = 1
    MIPLoss(activation="sigmoid")(logits, label).backward()
    nonzero = (logits.grad != 0).sum().item()
    assert nonzero == 9  # one voxel per (h, w) ray: the argmax along z


def test_ftl_mip_combines_with_spockmip_weights():
    torch.manual_seed(1)
    logits = torch.randn(1, 1, 4, 4, 4)
    label = (torch.rand(1, 1, 4, 4, 4) > 0.6).float()
    combined = FocalTverskyMIPLoss(activation="sigmoid")(logits, label)
    ftl = FocalTverskyLoss(activation="sigmoid", to_onehot_y=False)(logits, label)
    mip = MIPLoss(activation="sigmoid")(logits, label)
    assert combined.item() == pytest.approx(0.7 * ftl.item() + 0.3 * mip.item(), rel=1e-6)


def test_mip_rejects_bad_arguments():
    with pytest.raises(ValueError, match="axis"):
        MIPLoss(axis="t")
    with pytest.raises(ValueError, match=r"\(B, C, H, W, D\)"):
        MIPLoss()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4))


# ------------------------------------------------------------------------------ deep supervision
def test_nnunet_deep_supervision_weights():
    assert nnunet_deep_supervision_weights(5) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0])
    assert nnunet_deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert nnunet_deep_supervision_weights(1) == [1.0]


def test_deep_supervision_weights_levels_and_downsamples_the_target_nearest():
    torch.manual_seed(0)
    label = torch.randint(0, 3, (2, 1, 8, 8, 8)).float()
    full, half, quarter = torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 2, 2, 2)
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    output = NetworkOutput(logits=full, deep_supervision=[half, quarter])
    loss = DeepSupervisionLoss(dice_ce)(output, label)
    # by hand: nearest-exact picks the voxel at 2i + 1 (half) / 4i + 2 (quarter); weights 2/3, 1/3, 0
    expected = 2 / 3 * dice_ce(full, label) + 1 / 3 * dice_ce(half, label[..., 1::2, 1::2, 1::2])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    half_only = DeepSupervisionLoss(dice_ce, weights=[0.0, 1.0, 0.0])(output, label)
    assert half_only.item() == pytest.approx(dice_ce(half, label[..., 1::2, 1::2, 1::2]).item(), rel=1e-5)


def test_deep_supervision_on_a_network_trains_every_used_head():
    net = create_network(
        "unet", spatial_dims=3, in_channels=1, out_channels=3, filters=(4, 8, 16, 16), deep_supervision=2
    )
    loss = build_loss("dice_ce", net, (16, 16, 16))
    assert isinstance(loss, DeepSupervisionLoss)
    output = net(torch.randn(2, 1, 16, 16, 16), features=True)
    loss(output, torch.randint(0, 3, (2, 1, 16, 16, 16))).backward()
    heads = net.net.deep_supervision_heads
    assert heads[0].conv.conv.weight.grad.abs().sum() > 0  # 1/2 resolution head, weight 1/3
    assert heads[1].conv.conv.weight.grad.abs().sum() == 0  # lowest level masked, as nnU-Net


# ------------------------------------------------------------------------------ DSD
def test_kl_distillation_by_hand():
    teacher = torch.tensor([0.0, 0.0]).reshape(1, 2, 1, 1, 1)
    student = torch.tensor([math.log(3.0), 0.0]).reshape(1, 2, 1, 1, 1)
    # p_t = (1/2, 1/2), p_s = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    assert kl_distillation(teacher, student, 1.0).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # temperature divides the logits
    assert kl_distillation(3 * teacher, 3 * student, 3.0).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # averaged over voxels and batch: a second voxel with equal distributions halves it
    t2 = torch.zeros(1, 2, 2, 1, 1)
    s2 = torch.cat([student, teacher], dim=2)
    assert kl_distillation(t2, s2, 1.0).item() == pytest.approx(0.25 * math.log(4 / 3), rel=1e-6)


def test_side_head_deconv_upsamples_by_shared_transposed_convolutions():
    head = SideHead(3, in_channels=8, num_classes=3, scale=(4, 4, 2))
    assert head.steps == ["2x2x2", "2x2x1"]
    assert head(torch.randn(1, 8, 2, 3, 4), (8, 12, 8)).shape == (1, 3, 8, 12, 8)
    shared = SideHead(3, 8, 3, scale=(4, 4, 4))
    assert shared.steps == ["2x2x2", "2x2x2"] and len(shared.up) == 1  # one module, applied twice
    identity = SideHead(3, 8, 3, scale=(1, 1, 1))
    assert identity.steps == ["1x1x1"]
    assert identity.up["1x1x1"].kernel_size == (1, 1, 1)
    linear = SideHead(3, 8, 3, scale=(3, 3, 3), mode="trilinear")
    assert linear(torch.randn(1, 8, 2, 2, 2), (6, 6, 6)).shape == (1, 3, 6, 6, 6)
    with pytest.raises(ConfigError, match="power-of-two"):
        SideHead(3, 8, 3, scale=(3, 3, 3))


def tiny_unet():
    return create_network(
        "unet", spatial_dims=3, in_channels=1, out_channels=3, filters=(4, 8, 16, 16), deep_supervision=1
    )


def test_dsd_loss_is_deep_supervision_plus_t2_weighted_kl():
    torch.manual_seed(0)
    net = tiny_unet()
    dsd = build_loss("dice_ce", net, (16, 16, 16), dsd={})
    assert isinstance(dsd, DualSelfDistillationLoss)
    assert len(dsd.decoder_heads) == 3 and len(dsd.encoder_heads) == 4
    x, y = torch.randn(2, 1, 16, 16, 16), torch.randint(0, 3, (2, 1, 16, 16, 16))
    output = net(x, features=True)
    decoder, encoder = dsd.side_logits(output, (16, 16, 16))
    assert all(d.shape == (2, 3, 16, 16, 16) for d in decoder + encoder)
    seg = DiceCELoss(to_onehot_y=True, softmax=True)

    def kl(t, s, temp=3.0):  # independent reference: PyTorch's KLDivLoss, pixel-wise
        return F.kl_div(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1), reduction="none").sum(1).mean()

    expected = seg(output.logits, y) + sum(seg(d, y) for d in decoder)
    expected = expected + 9.0 * (
        sum(kl(decoder[-1], d) for d in decoder[:-1]) + sum(kl(encoder[-1], e) for e in encoder[:-1])
    )
    assert dsd(output, y).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("detach", [False, True])
def test_dsd_teacher_gradient_is_switchable(detach):
    torch.manual_seed(0)
    net = tiny_unet()
    dsd = DualSelfDistillationLoss(net, DiceCELoss(to_onehot_y=True, softmax=True), (16, 16, 16), detach_teacher=detach)
    output = net(torch.randn(1, 1, 16, 16, 16), features=True)
    decoder, encoder = dsd.side_logits(output, (16, 16, 16))
    dsd.distillation(decoder, encoder).backward()
    teacher_grad = dsd.encoder_heads[-1].out.conv.conv.weight.grad  # bottleneck head: only a teacher in KL
    student_grad = dsd.encoder_heads[0].out.conv.conv.weight.grad
    assert student_grad.abs().sum() > 0
    assert (teacher_grad is None or teacher_grad.abs().sum() == 0) == detach


def test_dsd_side_heads_are_trained_with_the_network():
    torch.manual_seed(0)
    net = tiny_unet()
    dsd = build_loss("dice_ce", net, (16, 16, 16), dsd={"upsample": "trilinear"})
    params = list(net.parameters()) + list(dsd.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    before = [p.detach().clone() for p in dsd.parameters()]
    dsd(net(torch.randn(2, 1, 16, 16, 16), features=True), torch.randint(0, 3, (2, 1, 16, 16, 16))).backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, dsd.parameters()))


@pytest.mark.parametrize("name", ["stunet", "swin_unetr"])
def test_dsd_attaches_to_other_registered_networks(name):
    torch.manual_seed(0)
    reference = network_entry(name).references["tiny"]  # swin_unetr's is 2D: DSD handles 2D too
    net = create_network(name, **reference)
    patch = tuple(max(2 * d, 32) for d in net.input_divisor)  # the registry's test-size convention
    dsd = build_loss("dice_ce", net, patch, dsd={})
    output = net(torch.randn(1, 1, *patch), features=True)
    loss = dsd(output, torch.randint(0, 3, (1, 1, *patch)))
    loss.backward()
    assert torch.isfinite(loss)
    assert len(dsd.decoder_heads) == len(output.decoder) and len(dsd.encoder_heads) == len(output.encoder)
    assert all(p.grad is not None for p in dsd.parameters())


def test_segmentation_loss_names_and_errors():
    assert isinstance(segmentation_loss("focal_tversky", 3), FocalTverskyLoss)
    assert isinstance(segmentation_loss("mip", 1), MIPLoss)
    with pytest.raises(ConfigError, match="unknown loss"):
        segmentation_loss("hausdorff", 3)
    with pytest.raises(ConfigError, match="loss.kwargs"):
        segmentation_loss("dice_ce", 3, no_such_option=1)
