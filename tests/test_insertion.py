"""The insertion mechanism on torch-only stand-ins for a ResNet and an HRNet.

The stand-ins copy only what the mechanism relies on: a ResNet's ``res_layers``, an
HRNet's ``layer1``/``stage{2,3,4}`` with ``branches``, blocks with ``conv1``/``conv2``
(BasicBlock) or ``conv1``/``conv2``/``conv3`` (Bottleneck), ``with_cp``. The real mmseg
and mmpose backbones are tested in ``tests/test_seg`` and ``tests/test_pose``.
"""
import copy
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint as cp
from torch import nn

from mmpsa.insertion import PSA_KEYS, init_psa, insert_psa, psa_modules, residual_stages
from mmpsa.layers import PolarizedSelfAttention

REPO = Path(__file__).resolve().parents[1]


class Basic(nn.Module):
    """BasicBlock stand-in: conv1 (3x3, changes width) + bn + relu, conv2, residual."""

    def __init__(self, c: int, mid: int, with_cp: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, mid, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.with_cp = with_cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:

        def inner(x):
            out = self.relu(self.bn1(self.conv1(x)))
            return self.bn2(self.conv2(out)) + x

        if self.with_cp and x.requires_grad:
            return self.relu(cp.checkpoint(inner, x, use_reentrant=True))
        return self.relu(inner(x))


class Bottle(nn.Module):
    """Bottleneck stand-in: 1x1 conv1, 3x3 conv2, 1x1 conv3, residual."""

    def __init__(self, c: int, mid: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, mid, 1, bias=False)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv1(x))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.conv3(out) + x)


class ToyResNet(nn.Module):
    """A stem conv, ``layer1`` (2 Bottlenecks, mid 8), ``layer2`` (1 Basic, mid 12)."""

    def __init__(self, with_cp: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.res_layers = ['layer1', 'layer2']
        self.layer1 = nn.Sequential(Bottle(16, 8), Bottle(16, 8))
        self.layer2 = nn.Sequential(Basic(16, 12, with_cp=with_cp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(self.conv1(x)))


class HRModuleLike(nn.Module):

    def __init__(self, widths) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(Basic(w, w)) for w in widths)
        self.fuse_layers = nn.ModuleList([nn.Conv2d(widths[0], widths[0], 1)])

    def forward(self, xs):
        ys = [branch(x) for branch, x in zip(self.branches, xs)]
        return [self.fuse_layers[0](ys[0])] + ys[1:]


class ToyHRNet(nn.Module):
    """Root ``conv1``/``conv2`` (must stay untouched), ``layer1``, ``stage2..4``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.layer1 = nn.Sequential(Bottle(8, 4))
        self.stage2 = nn.Sequential(HRModuleLike([8, 8]))
        self.stage3 = nn.Sequential(HRModuleLike([8, 8]), HRModuleLike([8, 8]))
        self.stage4 = nn.Sequential(HRModuleLike([8, 8, 8]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.conv2(self.conv1(x)))
        for stage in (self.stage2, self.stage3, self.stage4):
            xs = [x] * len(stage[0].branches)
            x = stage(xs)[0]
        return x


def _hooked(conv: nn.Module) -> bool:
    return len(conv._forward_pre_hooks) > 0


def test_insertion_imports_neither_mmseg_nor_mmpose():
    # With both libraries made unimportable (find_spec says None), mmpsa and the
    # insertion still import and work.
    code = ('import sys\n'
            'for name in ("mmseg", "mmpose", "mmdet"): sys.modules[name] = None\n'
            'import torch, mmpsa.insertion as ins\n'
            'assert not [m for m in sys.modules if m.startswith(("mmseg.", "mmpose."))]\n'
            'print(len(ins.PSA_KEYS))\n')
    out = subprocess.run([sys.executable, '-c', code],
                         cwd=REPO,
                         capture_output=True,
                         text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(len(PSA_KEYS))


def test_resnet_placement_names_and_channels():
    net = ToyResNet()
    names = insert_psa(net, dict(mode='sequential', variant='official'))
    assert names == ['layer1.0.psa', 'layer1.1.psa', 'layer2.0.psa']
    for block in (*net.layer1, *net.layer2):
        nxt = block.conv3 if hasattr(block, 'conv3') else block.conv2
        assert isinstance(block.psa, PolarizedSelfAttention)
        assert block.psa.in_channels == nxt.in_channels  # 8 (Bottle), 12 (Basic)
        assert (block.psa.mode, block.psa.variant, block.psa.fused) == ('sequential', 'official',
                                                                        True)
        assert _hooked(nxt) and not _hooked(block.conv1)
    assert not _hooked(net.layer1[0].conv2)  # a Bottleneck's PSA feeds conv3 only
    assert not _hooked(net.conv1) and not hasattr(net, 'psa')
    assert 'layer1.0.psa.conv_v_right.weight' in net.state_dict()


def test_psa_feeds_the_next_conv():
    net = ToyResNet().eval()
    insert_psa(net, dict(fused=False))
    block = net.layer2[0]
    seen = {}
    block.psa.register_forward_hook(
        lambda m, a, out: seen.update(psa_in=a[0].clone(), psa_out=out.clone()))
    block.conv2.register_forward_hook(lambda m, a, out: seen.update(conv_in=a[0].clone()))
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        block(x)
        first = block.relu(block.bn1(block.conv1(x)))
    torch.testing.assert_close(seen['psa_in'], first, rtol=0, atol=0)
    torch.testing.assert_close(seen['conv_in'], seen['psa_out'], rtol=0, atol=0)
    assert not torch.equal(seen['psa_out'], first)


def test_hrnet_walks_stage_branches_only():
    net = ToyHRNet()
    stages = residual_stages(net)
    assert [len(s) for s in stages] == [1, 2, 4, 3]
    names = insert_psa(net, dict())
    assert len(names) == 10
    assert 'layer1.0.psa' in names and 'stage2.0.branches.0.0.psa' in names
    assert 'stage4.0.branches.2.0.psa' in names
    assert not _hooked(net.conv1) and not _hooked(net.conv2)
    assert not any(_hooked(m) for m in net.stage2[0].fuse_layers.modules())
    assert net(torch.randn(1, 3, 8, 8)).shape == (1, 8, 8, 8)


def test_stages_select():
    net = ToyHRNet()
    names = insert_psa(net, dict(stages=(False, True, True, True)))
    assert len(names) == 9 and not hasattr(net.layer1[0], 'psa')
    net = ToyResNet()
    assert insert_psa(net, dict(stages=[False, True])) == ['layer2.0.psa']


@pytest.mark.parametrize('psa, match', [
    (dict(kind='paper'), r"ToyResNet: unknown psa key 'kind' \(allowed: .*, stages\)"),
    (dict(stages=(True, )), r'one bool per stage \(2\), got \(True,\)'),
    (dict(stages=(True, True, True)), r'psa.stages must hold one bool per stage \(2\)'),
    (dict(stages=(1, 0)), 'psa.stages entries must be bool, got 1'),
    (dict(stages='TT'), "psa.stages must be a tuple of 2 bools, got 'TT'"),
    (dict(stages=(False, False)), 'psa.stages selects no stage'),
    (dict(mode='serial'), "mode must be one of .*got 'serial'"),
    (dict(variant='released'), "variant must be one of .*got 'released'"),
    ('parallel', "ToyResNet: psa must be a dict or None, got 'parallel'"),
])
def test_bad_config(psa, match):
    net = ToyResNet()
    with pytest.raises(ValueError, match=match):
        insert_psa(net, psa)


def test_no_residual_stages_or_blocks():
    with pytest.raises(ValueError, match='Conv2d has no residual stages'):
        insert_psa(nn.Conv2d(3, 3, 1), dict())
    plain = nn.Module()
    plain.res_layers = ['layer1']
    plain.layer1 = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
    with pytest.raises(ValueError, match='has no residual blocks'):
        insert_psa(plain, dict())


def test_insert_twice_raises():
    net = ToyResNet()
    insert_psa(net, dict())
    with pytest.raises(ValueError, match='already has a `psa`'):
        insert_psa(net, dict())


def test_deepcopy_and_pickle_follow_the_copy():
    torch.manual_seed(0)
    net = ToyResNet().eval()
    insert_psa(net, dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
        twin = copy.deepcopy(net)
        torch.testing.assert_close(twin(x), ref, rtol=0, atol=0)
        twin.layer2[0].psa.sp_wv.weight.mul_(3.0)
        changed = twin(x)
        torch.testing.assert_close(net(x), ref, rtol=0, atol=0)  # the original is intact
        assert not torch.allclose(changed, ref)
        restored = pickle.loads(pickle.dumps(twin))
        torch.testing.assert_close(restored(x), changed, rtol=0, atol=0)


def test_with_cp_gives_psa_gradients():
    torch.manual_seed(0)
    grads = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        net = ToyResNet(with_cp=with_cp)
        insert_psa(net, dict())
        net(torch.randn(2, 3, 8, 8)).square().mean().backward()
        grads.append([p.grad for p in net.layer2[0].psa.parameters()])
    assert all(g is not None for g in grads[1])
    assert sum(g.abs().sum() for g in grads[1]) > 0
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain)


def test_jit_trace_records_the_psa():
    torch.manual_seed(0)
    stock = ToyResNet().eval()
    net = copy.deepcopy(stock)
    insert_psa(net, dict())
    with torch.no_grad(), torch.jit.optimized_execution(False):
        traced = torch.jit.trace(net, torch.randn(1, 3, 8, 8), check_trace=False)
        x = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(traced(x), net(x))
        assert not torch.allclose(traced(x), stock(x))


def test_init_psa_is_seeded_and_leaves_rng_alone():
    net = ToyHRNet()
    insert_psa(net, dict())
    twin = copy.deepcopy(net)
    for m in psa_modules(twin):
        m.ch_wv.weight.data.zero_()
    state = torch.get_rng_state()
    init_psa(net, seed=7)
    init_psa(twin, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(psa_modules(net), psa_modules(twin)):
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)
    assert psa_modules(twin)[0].ch_wv.weight.abs().sum() > 0


def test_odd_width_names_the_stage_and_num_channels():
    net = ToyHRNet()
    net.stage3 = nn.Sequential(HRModuleLike([9, 8]))
    with pytest.raises(
            ValueError,
            match=r'ToyHRNet: a residual block of stage 3 has 9 channels.*'
            r'positive even int, got 9'):
        insert_psa(copy.deepcopy(net), dict())
    net.extra = dict(stage3=dict(num_channels=[9, 8]))
    with pytest.raises(
            ValueError,
            match=r'extra\.stage3\.num_channels=\(9, 8\) gives a residual '
            r'block 9 channels.*leave stage 3 out with psa.stages'):
        insert_psa(net, dict())
