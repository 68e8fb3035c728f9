"""reglab.performance: the `performance` node's switches, `auto` = on for a GPU trainer, off for a CPU one; bad values
name their key; apply() changes a conv net's memory layout and the matmul precision, and nothing else."""

from __future__ import annotations

import pytest
import torch

from conftest import compose
from reglab import performance
from reglab.errors import ConfigError
from reglab.models import MLP, ResNet18


def test_auto_is_on_for_a_gpu_trainer_and_off_for_a_cpu_one():
    defaults = compose([]).performance
    assert performance.settings(defaults, on_gpu=True) == {"channels_last": True, "compile": False,
                                                          "float32_matmul_precision": "high"}
    assert performance.settings(defaults, on_gpu=False) == {"channels_last": False, "compile": False,
                                                           "float32_matmul_precision": "highest"}
    assert performance.on_gpu(compose(["trainer=gpu"]).trainer) and not performance.on_gpu(compose([]).trainer)
    chosen = {"channels_last": False, "float32_matmul_precision": "medium", "compile": True}
    assert performance.settings(chosen, on_gpu=True) == chosen  # an explicit value wins over auto


@pytest.mark.parametrize("node, match", [
    ({"channels_lst": True}, r"^performance\.channels_lst is not one of channels_last, compile"),
    ({"float32_matmul_precision": "fast"}, r"^performance\.float32_matmul_precision='fast' is not one of"),
    ({"channels_last": "yes"}, r"^performance\.channels_last='yes' is not auto, true or false"),
])
def test_a_bad_value_names_its_key(node, match):
    with pytest.raises(ConfigError, match=match):
        performance.settings(node, on_gpu=False)


def test_apply_changes_a_conv_nets_layout_and_the_matmul_precision():
    before = torch.get_float32_matmul_precision()
    try:
        resnet, mlp = ResNet18((3, 8, 8), 10, width=2), MLP((3, 8, 8), 10, width=4)
        performance.apply({"channels_last": True, "float32_matmul_precision": "medium"}, {"accelerator": "cpu"},
                          resnet)
        assert resnet.stem.weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.get_float32_matmul_precision() == "medium"
        weights = [p.clone() for p in mlp.parameters()]
        assert performance.apply({"channels_last": True}, {"accelerator": "cpu"}, mlp) is mlp  # no conv: as it was
        assert all(torch.equal(a, b) for a, b in zip(weights, mlp.parameters()))
        performance.apply(None, {"accelerator": "cpu"}, resnet)  # defaults on a CPU: highest
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)
