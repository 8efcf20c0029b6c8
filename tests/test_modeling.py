import pytest
import torch

from conftest import active_mim, tiny_config
from convnextv2_hf import ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling, ConvNextV2Model
from convnextv2_hf.masking import patchify, upsample_mask
from convnextv2_hf.modeling_convnextv2 import ConvNextV2GRN
from convnextv2_hf.sparse_ops import sparse_grn


def test_grn_matches_hand_computed_case():
    grn = ConvNextV2GRN(2)
    with torch.no_grad():
        grn.weight.copy_(torch.tensor([0.5, 2.0]).view(1, 1, 1, 2))
        grn.bias.copy_(torch.tensor([0.1, -0.1]).view(1, 1, 1, 2))
    # one sample, 1x2 spatial, 2 channels: channel 0 = (3, 4) -> norm 5; channel 1 = (0, 1) -> norm 1
    x = torch.tensor([[[[3.0, 0.0], [4.0, 1.0]]]])
    mean_norm = 3.0
    n0, n1 = 5.0 / (mean_norm + 1e-6), 1.0 / (mean_norm + 1e-6)
    expected = torch.tensor(
        [[[[0.5 * 3 * n0 + 0.1 + 3, 2.0 * 0 * n1 - 0.1 + 0], [0.5 * 4 * n0 + 0.1 + 4, 2.0 * 1 * n1 - 0.1 + 1]]]]
    )
    torch.testing.assert_close(grn(x), expected)


def test_sparse_grn_scopes():
    grn = ConvNextV2GRN(3)
    with torch.no_grad():
        grn.weight.fill_(1.0)
    x = torch.randn(2, 4, 4, 3)
    torch.testing.assert_close(sparse_grn(grn, x, "sample"), grn(x))
    batch_norm = torch.linalg.vector_norm(x, dim=(0, 1, 2))
    relative = batch_norm / (batch_norm.mean() + 1e-6)
    torch.testing.assert_close(sparse_grn(grn, x, "batch"), x * relative + x)


def make_mim(**kwargs):
    return active_mim(**kwargs).eval()


@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_masked_pixels_do_not_reach_visible_cells_or_loss(scope):
    model = make_mim(sparse_grn_scope=scope)
    images = torch.randn(2, 3, 48, 32)
    mask = torch.zeros(2, 3, 2, dtype=torch.bool)
    mask[0, 0, 1] = mask[0, 2, 0] = mask[1, 1, :] = True
    full = upsample_mask(mask, (48, 32)).expand(-1, 3, -1, -1)
    changed = torch.where(full, torch.randn_like(images) * 10, images)
    a = model(images, bool_masked_pos=mask, output_hidden_states=True)
    b = model(changed, bool_masked_pos=mask, output_hidden_states=True)
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(ha, hb)
    torch.testing.assert_close(a.logits, b.logits)
    # the predictions are untouched; the loss moves only because the masked cells' targets changed
    per_cell = ((a.logits - patchify(changed, 16)) ** 2).mean(-1)
    torch.testing.assert_close(b.loss, per_cell[mask.flatten(1)].mean())
    last = a.hidden_states[-1]
    assert (last * mask[:, None]).abs().sum() == 0  # zeros at masked cells


def test_loss_counts_masked_cells_only():
    model = make_mim()
    images = torch.randn(2, 3, 32, 32)
    mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    out = model(images, bool_masked_pos=mask)
    per_cell = ((out.logits - patchify(images, 16)) ** 2).mean(-1)
    torch.testing.assert_close(out.loss, per_cell[mask].mean())

    # wreck the predictions at visible cells only: the loss must not move
    visible = (~mask).view(2, 1, 2, 2)
    hook = model.decoder.pred.register_forward_hook(lambda m, i, o: o + 100.0 * visible)
    try:
        wrecked = model(images, bool_masked_pos=mask)
    finally:
        hook.remove()
    assert not torch.allclose(wrecked.logits, out.logits)
    torch.testing.assert_close(wrecked.loss, out.loss)


def test_sparse_encoder_differs_from_dense_backbone_but_not_when_nothing_is_masked():
    model = make_mim()
    images = torch.randn(1, 3, 32, 32)
    from convnextv2_hf.sparse_backends import get_sparse_backend

    backend = get_sparse_backend("dense")
    no_mask = torch.zeros(1, 2, 2, dtype=torch.bool)
    sparse_out, _ = backend.encode(model.convnextv2, images, no_mask, grn_scope="sample")
    dense_out = model.convnextv2(images).last_hidden_state
    torch.testing.assert_close(sparse_out, dense_out)


def test_mask_drawn_reproducibly_and_outputs_shapes():
    model = make_mim(mask_ratio=0.5)
    images = torch.randn(3, 3, 32, 64)
    a = model(images, generator=torch.Generator().manual_seed(0))
    b = model(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.loss, b.loss)
    assert a.mask.shape == (3, 8) and a.mask.dtype == torch.float32 and ((1 - a.mask).sum(1) == 4).all()
    assert a.logits.shape == (3, 8, 16 * 16 * 3)
    assert a.reconstruction.shape == images.shape
    noise = torch.randn(3, 8)
    c = model(images, noise=noise)
    assert torch.equal(c.mask.bool(), noise.argsort(1).argsort(1) >= 4)


def test_norm_pix_loss_and_tuple_output():
    model = make_mim(norm_pix_loss=True)
    images = torch.randn(2, 3, 32, 32)
    mask = torch.tensor([[True, False, True, False]] * 2)
    loss, logits, reconstruction, flat_mask = model(images, bool_masked_pos=mask, return_dict=False)
    assert loss.ndim == 0 and torch.equal(flat_mask, mask.float())  # float mask, as transformers' ViTMAE


def test_backward_reaches_encoder_and_decoder():
    model = make_mim().train()
    out = model(torch.randn(2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert model.convnextv2.embeddings.patch_embeddings.weight.grad.abs().sum() > 0
    assert model.decoder.mask_token.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pixel_values=torch.randn(1, 1, 32, 32)), "channels"),
        (dict(pixel_values=torch.randn(1, 3, 40, 32)), "multiples of the mask cell"),
        (dict(pixel_values=torch.randn(3, 32, 32)), "shape"),
        (dict(pixel_values=torch.randn(1, 3, 32, 32), bool_masked_pos=torch.zeros(1, 5, dtype=torch.bool)), "shape"),
        (dict(pixel_values=torch.randn(1, 3, 32, 32), bool_masked_pos=torch.zeros(1, 4)), "bool"),
        (dict(pixel_values=torch.randn(1, 3, 32, 32), bool_masked_pos=torch.full((1, 4), 2)), "0"),
        (dict(pixel_values=torch.randn(1, 3, 32, 32), bool_masked_pos=torch.ones(1, 4, dtype=torch.bool)), "visible"),
        (dict(pixel_values=torch.randn(1, 3, 32, 32), bool_masked_pos=torch.zeros(1, 4, dtype=torch.bool)), "hides no cell"),
        (dict(pixel_values=torch.randn(1, 3, 16, 16)), "visible"),
    ],
)
def test_bad_inputs_raise_clear_value_errors(kwargs, message):
    model = make_mim()
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


def test_classifier_rejects_wrong_channel_count_and_handles_any_size():
    model = ConvNextV2ForImageClassification(tiny_config()).eval()
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 4, 32, 32))
    assert model(torch.randn(2, 3, 37, 50)).logits.shape == (2, 3)
    out = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 2]), output_hidden_states=True)
    assert out.loss.ndim == 0 and len(out.hidden_states) == 5


def test_base_model_pooling_is_optional():
    config = tiny_config()
    assert ConvNextV2Model(config, add_pooling_layer=False).layernorm is None
    out = ConvNextV2Model(config)(torch.randn(1, 3, 32, 32))
    assert out.pooler_output.shape == (1, 32)


def test_use_grn_switch():
    model = ConvNextV2ForImageClassification(tiny_config(use_grn=False))
    assert not any("grn" in name for name, _ in model.named_parameters())
    mim = ConvNextV2ForMaskedImageModeling(tiny_config(use_grn=False))
    assert torch.isfinite(mim(torch.randn(1, 3, 32, 32)).loss)


# --------------------------------------------------------------------------------------------- transformers conventions
# (also checked by transformers' own common tests in test_transformers_common.py; these run without the download)


@pytest.mark.parametrize("backend", ["dense", "gather"])
@pytest.mark.parametrize("strategy", ["fcmae", "mixmae"])
def test_hidden_states_lie_on_the_path_to_the_loss(backend, strategy):
    model = make_mim(sparse_backend=backend, mask_strategy=strategy, sparse_grn_scope="sample")
    mask = torch.tensor([[True, False, False, True], [False, True, True, False]])
    out = model(torch.randn(2, 3, 32, 32), bool_masked_pos=mask, output_hidden_states=True)
    for state in out.hidden_states:
        state.retain_grad()
    out.loss.backward()
    assert all(state.grad is not None and state.grad.abs().sum() > 0 for state in out.hidden_states)
    assert len(out.hidden_states[0]) == (4 if strategy == "mixmae" else 2)


def test_mask_is_float_and_tuple_and_dict_outputs_agree():
    model = make_mim()
    images, mask = torch.randn(2, 3, 32, 32), torch.tensor([[True, False, False, True], [False, True, True, False]])
    as_dict = model(images, bool_masked_pos=mask, output_hidden_states=True)
    as_tuple = model(images, bool_masked_pos=mask, output_hidden_states=True, return_dict=False)
    assert as_dict.mask.dtype == torch.float32 and torch.equal(as_dict.mask, mask.float())
    for a, b in zip(as_dict.to_tuple(), as_tuple):
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert (x - y).abs().max() == 0  # subtraction works: no bool tensors among the outputs


@pytest.mark.parametrize("backend", ["dense", "gather"])
def test_fcmae_exports_with_static_and_dynamic_batch(backend):
    model = make_mim(sparse_backend=backend, sparse_grn_scope="sample")
    images = torch.randn(3, 3, 32, 48)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1, 0]], dtype=torch.bool)
    batch = torch.export.Dim("batch", min=2, max=64)
    with torch.no_grad():
        static = torch.export.export(model, (), {"pixel_values": images, "bool_masked_pos": mask}, strict=False)
        dynamic = torch.export.export(model, (), {"pixel_values": images, "bool_masked_pos": mask}, strict=False,
                                      dynamic_shapes={"pixel_values": {0: batch}, "bool_masked_pos": {0: batch}})
        expected = model(images, bool_masked_pos=mask)
        torch.testing.assert_close(static.module()(pixel_values=images, bool_masked_pos=mask).loss, expected.loss)
        two = model(images[:2], bool_masked_pos=mask[:2])
        got = dynamic.module()(pixel_values=images[:2], bool_masked_pos=mask[:2])
        torch.testing.assert_close(got.loss, two.loss)
        torch.testing.assert_close(got.reconstruction, two.reconstruction)
    with pytest.raises(ValueError, match="visible"):  # the same checks as before, in eager mode
        model(images, bool_masked_pos=torch.ones_like(mask))


@pytest.mark.parametrize("model_class", [ConvNextV2Model, ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling])
def test_output_hidden_states_selects_indices(model_class):
    model = (make_mim() if model_class is ConvNextV2ForMaskedImageModeling else model_class(tiny_config())).eval()
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32)}
    if model_class is ConvNextV2ForMaskedImageModeling:
        inputs["bool_masked_pos"] = torch.tensor([[True, False, False, True], [False, True, True, False]])
    everything = model(**inputs, output_hidden_states=True).hidden_states
    selected = model(**inputs, output_hidden_states=[0, 2, -1]).hidden_states
    assert len(selected) == len(everything) == 5
    for i, (a, b) in enumerate(zip(everything, selected)):
        if i in (0, 2, 4):
            torch.testing.assert_close(a, b)
        else:
            assert b is None
    assert model(**inputs, output_hidden_states=False).hidden_states is None


def test_unknown_keyword_is_named_with_a_suggestion():
    with pytest.raises(TypeError, match="unexpected keyword argument 'bool_masked_positions'; did you mean 'bool_masked_pos'"):
        make_mim()(torch.randn(1, 3, 32, 32), bool_masked_positions=None)
    with pytest.raises(TypeError, match="'lables'; did you mean 'labels'"):
        ConvNextV2ForImageClassification(tiny_config())(torch.randn(1, 3, 32, 32), lables=torch.tensor([0]))


def test_input_embedding_is_the_stem_convolution():
    """What transformers' input-gradient hook (adapters on a frozen stem) and Accelerate's FSDP2 (its own shard
    unit) take as the input embedding."""
    from convnextv2_hf import ConvNextV2Backbone

    config = tiny_config(out_features=["stage4"])
    for model_class in (ConvNextV2Model, ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling,
                        ConvNextV2Backbone):
        stem = model_class(config).get_input_embeddings()
        assert isinstance(stem, torch.nn.Conv2d)
        assert stem.weight.shape == (config.hidden_sizes[0], 3, config.patch_size, config.patch_size)
    model = ConvNextV2ForImageClassification(config)
    model.convnextv2.embeddings.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    model.train()(torch.randn(1, 3, 32, 32)).logits.sum().backward()
    assert model.convnextv2.encoder.stages[0].layers[0].pwconv1.weight.grad is not None
