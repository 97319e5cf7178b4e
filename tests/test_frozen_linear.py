"""oneDNN products for frozen linear layers (tune_lfm/frozen_linear.py): F.linear's outputs and input gradients,
weights read afresh in each block, and layers left as they were."""

import torch

from tune_lfm.frozen_linear import (FrozenLinearProduct, linears_on_onednn, onednn_products_work,
                                    weight_product, weight_t_product)


def test_products_and_input_gradients_equal_plain_linear():
    onednn_products_work.cache_clear()
    with torch.no_grad():  # as when a measurement is the first to ask
        assert onednn_products_work()  # PyTorch's CPU build has oneDNN
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 80), torch.randn(96)
    for x in (torch.randn(2, 37, 80), torch.randn(80, 37).t()):  # batched, and a non-contiguous input
        x.requires_grad_(True)
        upstream = torch.randn(*x.shape[:-1], 96)
        y = FrozenLinearProduct.apply(x, weight.to_mkldnn(), weight.t().contiguous().to_mkldnn(), bias)
        (grad,) = torch.autograd.grad(y, x, upstream)
        reference = torch.nn.functional.linear(x, weight, bias)
        (reference_grad,) = torch.autograd.grad(reference, x, upstream)
        torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-4)


def test_only_frozen_layers_move_and_a_changed_weight_is_read_in_the_next_block():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48, bias=False), torch.nn.Linear(48, 16))
    model[0].weight.requires_grad_(False)  # a frozen base layer; the second one trains
    x = torch.randn(5, 32)
    with linears_on_onednn(model) as on_onednn:
        assert on_onednn and "forward" in vars(model[0]) and "forward" not in vars(model[1])
        torch.testing.assert_close(weight_product(x, model[0].weight), x @ model[0].weight.t(), rtol=1e-5, atol=1e-5)
        upstream = torch.randn(5, 48)
        torch.testing.assert_close(weight_t_product(upstream, model[0].weight), upstream @ model[0].weight, rtol=1e-5,
                                   atol=1e-5)
        with linears_on_onednn(model) as nested:  # an inner block reuses the outer one's copies
            assert nested and "forward" in vars(model[0])
        assert "forward" in vars(model[0])
    assert "forward" not in vars(model[0])
    with linears_on_onednn(model, frozen_only=False):  # a block that changes no weight takes the trainable layer too
        assert "forward" in vars(model[0]) and "forward" in vars(model[1])
    with torch.no_grad():
        model[0].weight.mul_(-2.0)  # e.g. an adapter merged into the base weights between two blocks
    with linears_on_onednn(model):
        torch.testing.assert_close(model(x), torch.nn.functional.linear(x @ model[0].weight.t(), model[1].weight,
                                                                        model[1].bias), rtol=1e-5, atol=1e-5)


def test_no_frozen_fp32_layer_means_nothing_changes():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8).to(torch.bfloat16))
    model.requires_grad_(False)
    with linears_on_onednn(model) as on_onednn:
        assert not on_onednn and "forward" not in vars(model[0])
