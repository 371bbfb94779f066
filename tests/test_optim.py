from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from stream_swav.config import config_from_dict
from stream_swav.optim import LARS, WeightAverage, build_optimizer, learning_rate, learning_rate_for, param_groups


def norm(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


def test_lars_matches_hand_computation_over_two_steps():
    lr, momentum, weight_decay, trust = 0.5, 0.9, 0.01, 0.02
    w0 = [1.0, 2.0, 3.0, -1.0]
    b0 = [0.5, -0.5]
    weight = nn.Parameter(torch.tensor(w0, dtype=torch.float64).view(2, 2))
    bias = nn.Parameter(torch.tensor(b0, dtype=torch.float64))
    optimizer = LARS([{"params": [weight], "weight_decay": weight_decay},
                      {"params": [bias], "weight_decay": 0.0, "lars_exclude": True}],
                     lr=lr, momentum=momentum, trust_coefficient=trust)
    grads_w = ([0.3, -0.1, 0.2, 0.4], [-0.2, 0.5, 0.1, 0.0])
    grads_b = ([1.0, -2.0], [0.5, 0.5])

    w, b = list(w0), list(b0)
    buf_w, buf_b = [0.0] * 4, [0.0] * 2
    ratios = []
    for g_w, g_b in zip(grads_w, grads_b):
        weight.grad = torch.tensor(g_w, dtype=torch.float64).view(2, 2)
        bias.grad = torch.tensor(g_b, dtype=torch.float64)
        optimizer.step()

        ratio = trust * norm(w) / (norm(g_w) + weight_decay * norm(w))
        ratios.append(ratio)
        update = [(g + weight_decay * x) * ratio for g, x in zip(g_w, w)]
        buf_w = [momentum * m + u for m, u in zip(buf_w, update)]
        w = [x - lr * m for x, m in zip(w, buf_w)]
        # Excluded: plain momentum SGD, no decay, no trust ratio.
        buf_b = [momentum * m + g for m, g in zip(buf_b, g_b)]
        b = [x - lr * m for x, m in zip(b, buf_b)]

        assert weight.detach().flatten().tolist() == pytest.approx(w, rel=1e-12)
        assert bias.detach().tolist() == pytest.approx(b, rel=1e-12)
    # The ratios are far from 1, so a missing or misplaced trust ratio would fail above.
    assert all(r < 0.5 for r in ratios)


def test_lars_uses_unit_ratio_for_zero_weights_and_skips_params_without_grad():
    fresh = nn.Parameter(torch.zeros(3, 2))
    untouched = nn.Parameter(torch.ones(2, 2))
    optimizer = LARS([fresh, untouched], lr=0.1, momentum=0.0, weight_decay=0.5, trust_coefficient=0.001)
    fresh.grad = torch.full((3, 2), 2.0)
    optimizer.step()
    torch.testing.assert_close(fresh.detach(), torch.full((3, 2), -0.2))
    torch.testing.assert_close(untouched.detach(), torch.ones(2, 2))
    assert untouched not in optimizer.state


def test_lars_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    copy = nn.Linear(4, 3)
    copy.load_state_dict(model.state_dict())
    first = LARS(param_groups(model, 1e-4), lr=0.3, trust_coefficient=0.01)
    x = torch.randn(8, 4)
    model(x).square().sum().backward()
    first.step()
    copy.load_state_dict(model.state_dict())
    second = LARS(param_groups(copy, 1e-4), lr=0.3, trust_coefficient=0.01)
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    saved.seek(0)
    second.load_state_dict(torch.load(saved, weights_only=True))
    for net, optimizer in ((model, first), (copy, second)):
        optimizer.zero_grad()
        net(x).square().sum().backward()
        optimizer.step()
    for a, b in zip(model.parameters(), copy.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_param_groups_exclude_biases_and_norm_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2),
                          nn.Linear(2, 5, bias=False))
    groups = param_groups(model, weight_decay=1e-6)
    adapted, excluded = groups
    assert {id(p) for p in adapted["params"]} == {id(model[0].weight), id(model[3].weight), id(model[4].weight)}
    assert {id(p) for p in excluded["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                                                   id(model[3].bias)}
    assert adapted["weight_decay"] == 1e-6 and not adapted["lars_exclude"]
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"]


def test_build_optimizer_follows_config():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    lars = build_optimizer(model, config_from_dict({"optim": {"optimizer": "lars", "trust_coefficient": 0.01}}))
    assert isinstance(lars, LARS)
    assert [g["lars_exclude"] for g in lars.param_groups] == [False, True]
    assert lars.param_groups[0]["trust_coefficient"] == 0.01
    sgd = build_optimizer(model, config_from_dict({"optim": {"optimizer": "sgd", "momentum": 0.8}}))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.8 and sgd.param_groups[1]["weight_decay"] == 0.0


def test_warmup_is_linear_then_constant():
    kwargs = dict(peak_lr=2.0, final_lr=0.01, warmup_images=1000, schedule="warmup-constant", cosine_images=5000)
    assert learning_rate(0, **kwargs) == 0.0
    assert learning_rate(250, **kwargs) == pytest.approx(0.5)
    assert learning_rate(500, **kwargs) == pytest.approx(1.0)
    assert learning_rate(1000, **kwargs) == 2.0
    assert learning_rate(10**12, **kwargs) == 2.0
    assert learning_rate(0, **{**kwargs, "warmup_images": 0}) == 2.0


def test_cosine_decays_to_final_lr_and_stays():
    kwargs = dict(peak_lr=2.0, final_lr=0.01, warmup_images=1000, schedule="warmup-cosine", cosine_images=5000)
    assert learning_rate(500, **kwargs) == pytest.approx(1.0)
    assert learning_rate(1000, **kwargs) == pytest.approx(2.0)
    assert learning_rate(3000, **kwargs) == pytest.approx((2.0 + 0.01) / 2)
    values = [learning_rate(n, **kwargs) for n in range(1000, 5001, 250)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert learning_rate(5000, **kwargs) == pytest.approx(0.01)
    assert learning_rate(9000, **kwargs) == pytest.approx(0.01)


def test_configured_schedule_scales_with_global_batch():
    cfg = config_from_dict({"optim": {"base_lr": 0.6, "final_lr": 0.0006, "warmup_images": 0},
                            "train": {"batch_size": 128, "learners": 4}})
    assert learning_rate_for(cfg, 10) == pytest.approx(0.6 * 512 / 256)


def test_weight_average_follows_the_live_weights_with_a_warmed_up_momentum():
    live = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    average = WeightAverage(live, momentum=0.5)
    start = live[0].weight.detach().clone()
    assert not any(p.requires_grad for p in average.module.parameters())
    with torch.no_grad():
        live[0].weight.add_(1.0)
    live.train()(torch.randn(4, 2))  # moves the BatchNorm statistics and its integer batch counter
    average.update()
    # First update: momentum min(0.5, 2/11) = 2/11, so the average moves 9/11 of the way.
    torch.testing.assert_close(average.module[0].weight, start + 9 / 11)
    torch.testing.assert_close(average.module[1].running_mean, live[1].running_mean * 9 / 11)
    assert average.module[1].num_batches_tracked.item() == 1
    for _ in range(20):
        average.update()
    # Later the configured momentum holds: the gap to the live weights halves per update.
    torch.testing.assert_close(average.module[0].weight, live[0].weight, atol=1e-5, rtol=0)


def test_weight_average_state_round_trips_and_refuses_another_model():
    live = nn.Linear(3, 2)
    average = WeightAverage(live, momentum=0.9)
    with torch.no_grad():
        live.weight.mul_(2)
    average.update()
    state = average.state_dict()
    saved = io.BytesIO()
    torch.save(state, saved)
    saved.seek(0)
    other = WeightAverage(nn.Linear(3, 2), momentum=0.9)
    other.load_state_dict(torch.load(saved, weights_only=True))
    assert other.updates == 1
    torch.testing.assert_close(other.module.weight, average.module.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not match"):
        WeightAverage(nn.Linear(4, 2), momentum=0.9).load_state_dict(state)
    with pytest.raises(ValueError, match="updates"):
        other.load_state_dict({"module": state["module"]})
    restarted = WeightAverage(live, momentum=0.9)
    restarted.load_state_dict(state)
    restarted.restart()  # back to the live weights
    assert restarted.updates == 0
    torch.testing.assert_close(restarted.module.weight, live.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="momentum"):
        WeightAverage(live, momentum=1.0)
