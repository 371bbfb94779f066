import pytest
import torch
import torchvision

import stream_swav
from stream_swav.config import ModelConfig
from stream_swav.backbone_spec import SPEC_METADATA_KEY
from stream_swav.model import BackboneSpec, SwAVModel, build_backbone, load_backbone, recorded_spec

torch.set_num_threads(1)


def tiny_model(small_stem: bool = True, seed: int = 0) -> SwAVModel:
    torch.manual_seed(seed)
    return SwAVModel(ModelConfig(arch="resnet18", small_stem=small_stem, hidden_dim=32, output_dim=16,
                                 prototypes=10))


def crops(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 16, 16, generator=g), torch.randn(6, 3, 8, 8, generator=g)]


def test_build_backbone_feature_dims_and_stem():
    backbone, dim = build_backbone(BackboneSpec("resnet18"))
    assert dim == 512 and isinstance(backbone.fc, torch.nn.Identity)
    assert backbone.conv1.kernel_size == (7, 7) and backbone.conv1.stride == (2, 2)
    small, dim = build_backbone(BackboneSpec("resnet18", small_stem=True))
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and small.conv1.bias is None
    assert isinstance(small.maxpool, torch.nn.Identity)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    with pytest.raises(ValueError, match="unknown backbone"):
        BackboneSpec("vgg16")


def test_forward_shapes_unit_norm_and_prototypes():
    model = tiny_model()
    z, scores = model(crops())
    assert z.shape == (10, 16) and scores.shape == (10, 10)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(10))
    torch.testing.assert_close(scores, z @ model.prototypes.weight.T)
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(10))

    with torch.no_grad():
        model.prototypes.weight.mul_(3.0)
    model.normalize_prototypes()
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(10))


def test_under_bf16_autocast_the_scores_sinkhorn_reads_are_float32():
    """The backbone and projection run in bf16 under autocast; z and the prototype scores do not
    (exp(score / 0.05) in Sinkhorn would turn bf16's rounding into ~5% noise on the codes)."""
    model = tiny_model()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        projected = model.projection(model.backbone(crops()[0]))
        z, scores = model([crops()[0]])
    assert projected.dtype == torch.bfloat16
    assert z.dtype == scores.dtype == torch.float32
    torch.testing.assert_close(z, torch.nn.functional.normalize(projected.float(), dim=1))
    torch.testing.assert_close(scores, z @ model.prototypes.weight.T, rtol=1e-6, atol=1e-6)
    rounded = (z.bfloat16() @ model.prototypes.weight.T.bfloat16()).float()
    assert (rounded - scores).abs().max() > 1e-4  # what bf16 scores were off by


def test_forward_rejects_bad_crops():
    model = tiny_model()
    with pytest.raises(ValueError, match="at least one"):
        model([])
    with pytest.raises(ValueError, match=r"crops\[1\]"):
        model([torch.randn(2, 3, 8, 8), torch.randn(2, 1, 8, 8)])


def test_multi_resolution_forward_equals_separate_forwards_in_eval():
    model = tiny_model().eval()
    groups = crops()
    with torch.no_grad():
        z, scores = model(groups)
        separate = [model([g]) for g in groups]
    torch.testing.assert_close(z, torch.cat([s[0] for s in separate]))
    torch.testing.assert_close(scores, torch.cat([s[1] for s in separate]))


def test_projection_batchnorm_sees_all_crops_in_train_mode():
    # One head call over every crop: the BN batch statistics mix resolutions.
    model = tiny_model().train()
    groups = crops()
    with torch.no_grad():
        z_all, _ = model(groups)
        z_first, _ = model(groups[:1])
    assert not torch.allclose(z_all[:4], z_first, atol=1e-4)


def test_channels_last_input_matches_contiguous():
    model = tiny_model().eval().to(memory_format=torch.channels_last)
    groups = crops()
    with torch.no_grad():
        z, scores = model([g.contiguous(memory_format=torch.channels_last) for g in groups])
        z_ref, scores_ref = model(groups)
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scores, scores_ref, atol=1e-5, rtol=1e-4)


def test_gradients_reach_backbone_and_prototypes():
    model = tiny_model().train()
    _, scores = model(crops())
    scores.logsumexp(dim=1).mean().backward()
    for name in ("conv1.weight", "layer4.1.conv2.weight"):
        grad = model.backbone.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.prototypes.weight.grad.abs().sum() > 0
    assert model.projection[0].weight.grad.abs().sum() > 0


def test_backbone_state_dict_loads_into_torchvision_strict(tmp_path):
    model = tiny_model(small_stem=False)
    state = model.backbone_state_dict()
    # No classifier entries: forgetting to replace fc fails loudly instead of giving zero logits.
    assert not any(key.startswith("fc.") for key in state)
    torch.save(state, tmp_path / "backbone.pt")
    loaded = torch.load(tmp_path / "backbone.pt", weights_only=True)
    assert recorded_spec(loaded) == BackboneSpec("resnet18")
    with pytest.raises(RuntimeError, match="Missing key"):
        torchvision.models.resnet18().load_state_dict(loaded, strict=True)
    reference = torchvision.models.resnet18()
    reference.fc = torch.nn.Identity()
    reference.load_state_dict(loaded, strict=True)
    model.eval()
    reference.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reference(images), model.embed(images))
    # A copy, not a view of live parameters.
    with torch.no_grad():
        model.backbone.conv1.weight.add_(1.0)
    assert not torch.equal(state["conv1.weight"], model.backbone.conv1.weight)


def test_small_stem_backbone_loads_in_one_call_from_its_file(tmp_path):
    model = tiny_model(small_stem=True).eval()
    state = model.backbone_state_dict()
    with pytest.raises(RuntimeError):
        torchvision.models.resnet18().load_state_dict(state, strict=True)
    torch.save(state, tmp_path / "backbone.pt")
    backbone = stream_swav.load_backbone(tmp_path / "backbone.pt")
    assert not backbone.training and isinstance(backbone.fc, torch.nn.Identity)
    assert backbone.spec == BackboneSpec("resnet18", small_stem=True)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), model.embed(images))
        torch.testing.assert_close(load_backbone(state, BackboneSpec("resnet18", True))(images), model.embed(images))
    with pytest.raises(ValueError, match=r"does not match resnet18: it records resnet18 \(small stem\)"):
        load_backbone(state, BackboneSpec("resnet18"))
    incomplete = model.backbone_state_dict()
    del incomplete["layer1.0.conv1.weight"]
    with pytest.raises(ValueError, match="does not match"):
        load_backbone(incomplete)


def test_a_spec_forged_into_a_small_file_is_refused_without_building_the_network(tmp_path):
    """A 2 KB backbone.pt claiming a ResNet-50 at width 256 took 2.2 GB to build before a strict
    load found no weight matched; it is checked against a network without storage first."""
    model = tiny_model(small_stem=True).eval()
    state = model.backbone_state_dict()
    forged = type(state)({"conv1.weight": state["conv1.weight"]})
    forged._metadata = {**state._metadata, SPEC_METADATA_KEY: BackboneSpec("resnet50", width=256).to_record()}
    torch.save(forged, tmp_path / "forged.pt")
    # Refused by the check of keys against the storage-less network ("missing [...]"), not by a
    # strict load into a built one ("Error(s) in loading state_dict").
    with pytest.raises(ValueError, match=r"does not match resnet50 .*: missing \['bn1"):
        stream_swav.load_backbone(tmp_path / "forged.pt")


def test_backbone_files_of_the_old_format_load_with_their_spec():
    """Written before the spec was recorded: zero fc placeholders, the spec only in meta.json."""
    model = tiny_model(small_stem=True).eval()
    old = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    old.update({"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    assert recorded_spec(old) is None
    with pytest.raises(ValueError, match="record no backbone spec"):
        load_backbone(old)
    backbone = load_backbone(old, BackboneSpec("resnet18", small_stem=True))
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), model.embed(images))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_standard_trunk_has_torchvision_keys_and_shapes(arch):
    ours = build_backbone(BackboneSpec(arch))[0].state_dict()
    theirs = {k: v for k, v in getattr(torchvision.models, arch)().state_dict().items() if not k.startswith("fc.")}
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert BackboneSpec(arch).torchvision_constructor() == f"torchvision.models.{arch}()"


def test_narrow_resnet10_with_stride_two_stem():
    spec = BackboneSpec("resnet10", small_stem=True, stem_stride=2, width=8)
    backbone, dim = build_backbone(spec)
    assert dim == 64 and backbone.conv1.stride == (2, 2) and backbone.conv1.out_channels == 8
    assert [len(getattr(backbone, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert backbone(torch.randn(2, 3, 28, 28)).shape == (2, 64)
    assert spec.torchvision_constructor() is None
    assert spec.describe() == "resnet10 (width 8, small stem, stride 2)"
    state = SwAVModel(ModelConfig(arch="resnet10", small_stem=True, stem_stride=2, width=8, hidden_dim=32,
                                  output_dim=16, prototypes=10)).backbone_state_dict()
    assert recorded_spec(state) == spec
    assert load_backbone(state).feature_dim == 64
    with pytest.raises(ValueError, match="does not match resnet10"):
        load_backbone({k: v for k, v in state.items()}, BackboneSpec("resnet10", small_stem=True, width=16))


def test_feature_grid_flattens_the_last_stage_pooled_to_a_grid():
    spec = BackboneSpec("resnet10", small_stem=True, stem_stride=2, width=8, feature_grid=2)
    backbone, dim = build_backbone(spec)
    assert dim == 4 * 64 and spec.describe() == "resnet10 (width 8, small stem, stride 2, 2x2 feature grid)"
    images = torch.randn(3, 3, 28, 28)
    # The same weights pooled globally give the mean of the grid cells, channel by channel.
    pooled, _ = build_backbone(BackboneSpec("resnet10", small_stem=True, stem_stride=2, width=8))
    pooled.load_state_dict(backbone.state_dict())
    backbone.eval(), pooled.eval()
    with torch.no_grad():
        grid = backbone(images)
        torch.testing.assert_close(grid.view(3, 64, 4).mean(dim=2), pooled(images))
    assert spec.torchvision_constructor() is None  # torchvision's ResNet pools globally
    # A checkpoint's backbone file records the grid, so it loads back computing the same features.
    state = SwAVModel(ModelConfig(arch="resnet10", small_stem=True, stem_stride=2, width=8, feature_grid=2,
                                  hidden_dim=32, output_dim=16, prototypes=10)).backbone_state_dict()
    assert recorded_spec(state) == spec and load_backbone(state).feature_dim == 256
    with pytest.raises(ValueError, match="feature_grid"):
        BackboneSpec("resnet10", feature_grid=0)
    with pytest.raises(ValueError, match="feature_grid"):
        BackboneSpec("vit_s_16", feature_grid=2)


def test_backbone_spec_refuses_bad_values_and_reads_old_records():
    with pytest.raises(ValueError, match="stem_stride"):
        BackboneSpec("resnet18", small_stem=False, stem_stride=2)
    with pytest.raises(ValueError, match="stem_stride"):
        BackboneSpec("resnet18", small_stem=True, stem_stride=4)
    with pytest.raises(ValueError, match="width"):
        BackboneSpec("resnet18", width=-1)
    assert BackboneSpec("resnet18", width=0) == BackboneSpec("resnet18", width=64)  # 0: the architecture's own
    # Records written before stem_stride and width existed mean torchvision's trunk.
    assert BackboneSpec.from_record({"arch": "resnet50", "small_stem": False}) == BackboneSpec("resnet50")
    spec = BackboneSpec("resnet10", True, 2, 16)
    assert BackboneSpec.from_record(spec.to_record()) == spec
    with pytest.raises(ValueError, match="small_stem"):
        BackboneSpec.from_record({"arch": "resnet18"})
