"""reglab.performance: the `performance` node's switches, `auto` = on for a GPU trainer, off for a CPU one; bad values
name their key; apply() changes a conv net's memory layout (GPU trainers only) and the matmul precision, and keeps
freed memory for reuse."""

from __future__ import annotations

import pytest
import torch

from conftest import compose
from reglab import performance
from reglab.errors import ConfigError
from reglab.models import MLP, ResNet18


def test_auto_is_on_for_a_gpu_trainer_and_off_for_a_cpu_one():
    defaults = compose([]).performance
    glibc = performance.glibc() is not None
    assert performance.settings(defaults, on_gpu=True) == {"channels_last": True, "compile": False,
                                                          "float32_matmul_precision": "high", "malloc_cache": glibc}
    assert performance.settings(defaults, on_gpu=False) == {"channels_last": False, "compile": False,
                                                           "float32_matmul_precision": "highest", "malloc_cache": glibc}
    assert performance.on_gpu(compose(["trainer=gpu"]).trainer) and not performance.on_gpu(compose([]).trainer)
    chosen = {"channels_last": False, "float32_matmul_precision": "medium", "compile": True, "malloc_cache": False}
    assert performance.settings(chosen, on_gpu=True) == chosen  # an explicit value wins over auto


@pytest.mark.parametrize("node, match", [
    ({"channels_lst": True}, r"^performance\.channels_lst is not one of channels_last, compile"),
    ({"float32_matmul_precision": "fast"}, r"^performance\.float32_matmul_precision='fast' is not one of"),
    ({"channels_last": "yes"}, r"^performance\.channels_last='yes' is not auto, true or false"),
    ({"malloc_cache": "on"}, r"^performance\.malloc_cache='on' is not auto, true or false"),
])
def test_a_bad_value_names_its_key(node, match):
    with pytest.raises(ConfigError, match=match):
        performance.settings(node, on_gpu=False)


def test_apply_changes_a_conv_nets_layout_and_the_matmul_precision():
    before = torch.get_float32_matmul_precision()
    try:
        resnet, mlp = ResNet18((3, 8, 8), 10, width=2), MLP((3, 8, 8), 10, width=4)
        with pytest.raises(ConfigError, match=r"^performance\.channels_last=true is for GPU trainers"):
            performance.apply({"channels_last": True}, {"accelerator": "cpu"}, resnet)  # see apply()
        performance.apply({"channels_last": True, "float32_matmul_precision": "medium"}, {"accelerator": "gpu"},
                          resnet)  # apply() moves no tensor: the layout changes on this machine's CPU
        assert resnet.stem.weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.get_float32_matmul_precision() == "medium"
        weights = [p.clone() for p in mlp.parameters()]
        assert performance.apply({"channels_last": True}, {"accelerator": "cpu"}, mlp) is mlp  # no conv: as it was
        assert all(torch.equal(a, b) for a, b in zip(weights, mlp.parameters()))
        performance.apply(None, {"accelerator": "cpu"}, resnet)  # defaults on a CPU: highest
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)


# Twenty test passes of a population (5 members of width 256, batches of 1,000: 5 MB activations), counting the page
# faults: by default glibc often maps such blocks afresh and returns them on free, so every pass faults on its pages
# again (50-100 thousand faults, 2-core AMD EPYC VM; ~49 thousand on an Intel VM, where the same process sometimes
# took 7.5 thousand: glibc's adaptive mmap threshold and heap trimming depend on the heap's layout); with
# performance's defaults (malloc_cache: auto) the passes reuse the heap (0-7.5 thousand). Asserted against the pages
# a pass touches when nothing is reused, not against the default's varying count. In a fresh process, so that the
# setting reaches no other test.
FRESH_PAGES = 20 * 2 * (5 * 1000 * 256 * 4) // 4096  # 20 passes x 2 hidden activations of 5 MB: 50,000 pages
FAULTS = """
import resource, torch
from reglab import performance
from reglab.models import MLP
from reglab.population import fuse
torch.set_num_threads(1)
# glibc's default thresholds, fixed (setting them turns off the adaptive mmap threshold, whose reuse depends on the
# heap's layout): without keep_freed_memory every pass then faults in fresh pages, so the assertion can fail.
libc = performance.glibc()
assert libc.mallopt(performance.M_MMAP_THRESHOLD, 128 << 10) and libc.mallopt(performance.M_TRIM_THRESHOLD, 128 << 10)
performance.apply(None, {"accelerator": "cpu"}, torch.nn.Identity())  # the defaults, as every run applies them
net = fuse([MLP((40,), 10, 256, 2) for _ in range(5)]).eval()
x = torch.randn(1000, 40)
with torch.no_grad():
    net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        net(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(performance.glibc() is None, reason="glibc's malloc only")
def test_keep_freed_memory_spares_the_page_faults_of_large_activations():
    import subprocess
    import sys

    faults = int(subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True).stdout)
    assert faults * 4 < FRESH_PAGES, faults
