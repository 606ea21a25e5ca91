"""The hierarchical multi-scale OCR segmentor and head (mmpsa/seg/mscale_ocr.py): the
combination against a restatement of the released formula, the head against mmseg's OCRHead,
single scale against the stock cascade, the two-scale loss, the load check, and a tiny-data
train + test run through mmseg's Runner."""
import copy

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config, ConfigDict
from mmengine.hooks import Hook
from mmengine.runner import Runner, load_checkpoint
from mmengine.structures import PixelData
from mmseg.models.decode_heads import OCRHead
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

from mmpsa.apis.runner import test as run_test_tool
from mmpsa.seg.mscale_ocr import (CheckpointMismatchError, MscaleOCRHead, check_scales,
                                  hierarchical_combine)

BN = dict(type='BN', requires_grad=True)
LEVELS = [8, 16, 32, 64]  # the tiny HRNet's branch widths (configs/mmseg/tiny/)
TINY_HR = 'configs/mmseg/tiny/psa-p_fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128.py'


def _heads(num_classes=19):
    head = dict(
        in_channels=LEVELS,
        in_index=(0, 1, 2, 3),
        input_transform='resize_concat',
        num_classes=num_classes,
        norm_cfg=BN,
        align_corners=False,
        dropout_ratio=-1)
    return [
        dict(
            type='FCNHead',
            channels=sum(LEVELS),
            kernel_size=1,
            num_convs=1,
            concat_input=False,
            loss_decode=dict(type='CrossEntropyLoss', loss_weight=0.4),
            **head),
        dict(
            type='MscaleOCRHead',
            channels=32,
            ocr_channels=16,
            attn_channels=16,
            loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0),
            **head),
    ]


def _mscale(model_cfg: dict, **changes) -> dict:
    """The tiny PSA HRNet of ``model_cfg`` as a multi-scale OCR segmentor."""
    model_cfg = copy.deepcopy(model_cfg)
    model_cfg.update(
        type='MscaleCascadeEncoderDecoder',
        num_stages=2,
        decode_head=_heads(),
        test_cfg=dict(mode='whole', scales=[0.5, 1.0, 2.0]))
    model_cfg.update(changes)
    return model_cfg


@pytest.fixture(scope='module')
def tiny_model_cfg(request) -> dict:
    repo = request.config.rootpath
    return Config.fromfile(str(repo / TINY_HR)).model.to_dict()


def _build(cfg: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = MODELS.build(copy.deepcopy(cfg))
    _randomize_bn(model, seed)
    return model.eval()


def _randomize_bn(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affine parameters (fresh ones are the identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(1 + 0.2 * torch.randn(n, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(n, generator=g))


def _up(x, size):
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


# ---- the combination formula


def test_hierarchical_combine_matches_the_released_formula():
    """Scales 0.5/1/2 given in any order: p = a1*p1 + (1-a1)*down(p2), then
    p = up(a05*p05) + (1-up(a05))*p (the released nscale_forward), at the 1.0 size."""
    g = torch.Generator().manual_seed(0)
    sizes = {0.5: (6, 10), 1.0: (12, 20), 2.0: (24, 40)}
    logits = {s: torch.randn(2, 3, *hw, generator=g) for s, hw in sizes.items()}
    attn = {s: torch.rand(2, 1, *hw, generator=g) for s, hw in sizes.items()}
    expected = attn[1.0] * logits[1.0] + (1 - attn[1.0]) * _up(logits[2.0], sizes[1.0])
    expected = (
        _up(attn[0.5] * logits[0.5], sizes[1.0]) + (1 - _up(attn[0.5], sizes[1.0])) * expected)
    outputs = [(s, logits[s], attn[s]) for s in (1.0, 0.5, 2.0)]
    combined = hierarchical_combine(outputs)
    assert combined.shape == (2, 3, 12, 20)
    torch.testing.assert_close(combined, expected, rtol=0, atol=1e-6)
    # the highest scale's attention is never used
    outputs[2] = (2.0, logits[2.0], torch.zeros_like(attn[2.0]))
    torch.testing.assert_close(hierarchical_combine(outputs), expected, rtol=0, atol=1e-6)


def test_hierarchical_combine_on_constant_maps():
    """Constant maps stay constant under bilinear resizing: worked by hand,
    p = 0.5*0.5 + (1-0.5) * (0.25*1 + 0.75*2) = 1.125."""

    def const(value, hw, channels=1):
        return torch.full((1, channels, *hw), value)

    outputs = [(2.0, const(2.0, (8, 8), 2), const(0.9, (8, 8))),
               (1.0, const(1.0, (4, 4), 2), const(0.25, (4, 4))),
               (0.5, const(0.5, (2, 2), 2), const(0.5, (2, 2)))]
    torch.testing.assert_close(hierarchical_combine(outputs), const(1.125, (4, 4), 2))
    # single scale: the logits themselves; ``size`` resizes the result
    only = const(3.0, (4, 4), 2)
    assert hierarchical_combine([(1.0, only, const(0.1, (4, 4)))]) is only
    assert hierarchical_combine([(1.0, only, only[:, :1])], size=(8, 8)).shape == (1, 2, 8, 8)


@pytest.mark.parametrize('scales', [[0.5, 2.0], [], [1.0, 1.0], [0, 1.0], (True, 1.0), '1.0'])
def test_scales_must_be_distinct_positive_and_contain_one(scales):
    with pytest.raises(ValueError, match=r'test_cfg\.scales'):
        check_scales(scales, 'test_cfg.scales')


@pytest.mark.parametrize('change, field', [
    (dict(test_cfg=dict(mode='whole', scales=[0.5, 2.0])), r'test_cfg\.scales'),
    (dict(test_cfg=dict(mode='sliding', scales=[1.0])), r'test_cfg\.mode'),
    (dict(train_cfg=dict(scales=[0.5])), r'train_cfg\.scales'),
    (dict(train_cfg=dict(scale_loss_weight=-1)), r'train_cfg\.scale_loss_weight'),
    (dict(train_cfg=dict(lo_scale=0.5)), r"train_cfg keys \['lo_scale'\]"),
    (dict(num_stages=3), 'num_stages'),
    (dict(auxiliary_head=dict(type='FCNHead')), 'auxiliary_head'),
])
def test_bad_segmentor_settings_name_the_field(tiny_model_cfg, change, field):
    with pytest.raises(ValueError, match=field):
        MODELS.build(_mscale(tiny_model_cfg, **change))


def test_the_last_head_must_give_an_attention(tiny_model_cfg):
    cfg = _mscale(tiny_model_cfg)
    cfg['decode_head'][1]['type'] = 'OCRHead'
    del cfg['decode_head'][1]['attn_channels']
    with pytest.raises(ValueError, match=r'decode_head\[1\] must give a scale attention'):
        MODELS.build(cfg)


# ---- the head


def test_head_is_the_stock_ocr_head_plus_scale_attn():
    kwargs = _heads(num_classes=5)[1]
    kwargs.pop('type')
    head = MscaleOCRHead(**kwargs).eval()
    stock = OCRHead(**{k: v for k, v in kwargs.items() if k != 'attn_channels'}).eval()
    own = head.state_dict()
    assert set(own) - set(stock.state_dict()) == {k for k in own if k.startswith('scale_attn.')}
    stock.load_state_dict({k: v for k, v in own.items() if not k.startswith('scale_attn.')})
    # the released make_attn_head: 3x3 (32 -> 16) + BN + ReLU, 3x3 + BN + ReLU, 1x1 -> 1, sigmoid
    convs = [m for m in head.scale_attn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias)
            for c in convs] == [(32, 16, (3, 3), None), (16, 16, (3, 3), None),
                                (16, 1, (1, 1), None)]
    assert isinstance(head.scale_attn[-1], torch.nn.Sigmoid)

    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, c, 16 // 2**i, 32 // 2**i, generator=g) for i, c in enumerate(LEVELS)]
    prev = torch.randn(2, 5, 16, 32, generator=g)
    with torch.no_grad():
        cls, attn = head.forward_with_attn(feats, prev)
        torch.testing.assert_close(head(feats, prev), stock(feats, prev), rtol=0, atol=0)
    torch.testing.assert_close(cls, stock(feats, prev), rtol=0, atol=0)
    assert attn.shape == (2, 1, 16, 32) and 0 <= attn.min() and attn.max() <= 1


def test_head_attn_channels_are_checked():
    with pytest.raises(ValueError, match='attn_channels'):
        MscaleOCRHead(
            attn_channels=0,
            **{
                k: v
                for k, v in _heads()[1].items() if k not in ('type', 'attn_channels')
            })


# ---- the segmentor


def test_single_scale_is_the_stock_cascade_ocrnet(tiny_model_cfg):
    """test_cfg.scales=[1.0]: the stock CascadeEncoderDecoder + OCRHead with the same
    weights (scale_attn unused), through mmseg's inference API."""
    model = _build(_mscale(tiny_model_cfg, test_cfg=dict(mode='whole', scales=[1.0])))
    stock_cfg = _mscale(
        tiny_model_cfg, type='CascadeEncoderDecoder', test_cfg=ConfigDict(mode='whole'))
    stock_cfg['decode_head'][1] = {
        k: v
        for k, v in stock_cfg['decode_head'][1].items() if k != 'attn_channels'
    }
    stock_cfg['decode_head'][1]['type'] = 'OCRHead'
    stock = MODELS.build(stock_cfg).eval()
    stock.load_state_dict({k: v for k, v in model.state_dict().items() if 'scale_attn' not in k})
    x = torch.randn(2, 3, 64, 128, generator=torch.Generator().manual_seed(1))
    metas = [dict(ori_shape=(64, 128), img_shape=(64, 128), pad_shape=(64, 128))] * 2
    with torch.no_grad():
        torch.testing.assert_close(
            model.inference(x, metas), stock.inference(x, metas), rtol=0, atol=0)


def test_scale_outputs_are_the_network_on_the_resized_input(tiny_model_cfg):
    """Each scale: input resized as the released ResizeX (floor(H*s), bilinear), aux, class
    logits and attention upsampled to that size; inference joins them as the formula says."""
    model = _build(_mscale(tiny_model_cfg))
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        outs = {s: model.scale_outputs(x, s) for s in (0.5, 1.0, 2.0)}
        for s, hw in ((0.5, (32, 48)), (1.0, (64, 96)), (2.0, (128, 192))):
            xs = x if s == 1.0 else F.interpolate(x, size=hw, mode='bilinear', align_corners=False)
            feats = model.backbone(xs)
            aux = model.decode_head[0](feats)
            cls, attn = model.decode_head[1].forward_with_attn(feats, aux)
            for key, value in (('aux', aux), ('cls', cls), ('attn', attn)):
                assert outs[s][key].shape[2:] == hw
                torch.testing.assert_close(outs[s][key], _up(value, hw), rtol=0, atol=1e-6)
        expected = outs[1.0]['attn'] * outs[1.0]['cls'] + (1 - outs[1.0]['attn']) * _up(
            outs[2.0]['cls'], (64, 96))
        expected = (
            _up(outs[0.5]['attn'] * outs[0.5]['cls'],
                (64, 96)) + (1 - _up(outs[0.5]['attn'], (64, 96))) * expected)
        torch.testing.assert_close(
            model.inference(x, [dict(ori_shape=(64, 96))]), expected, rtol=0, atol=1e-5)
        assert model.scale_outputs(x, 0.5, with_aux=False).keys() == {'cls', 'attn'}


def test_slide_mode_runs_the_multiscale_inference_per_window(tiny_model_cfg):
    whole = _build(_mscale(tiny_model_cfg))
    slide = _build(
        _mscale(
            tiny_model_cfg,
            test_cfg=dict(
                mode='slide', crop_size=(64, 64), stride=(64, 64), scales=[0.5, 1.0, 2.0])))
    x = torch.randn(1, 3, 64, 128, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = slide.inference(x, [dict(ori_shape=(64, 128), img_shape=(64, 128))])
        left = whole.inference(x[..., :64], [dict(ori_shape=(64, 64))])
        right = whole.inference(x[..., 64:], [dict(ori_shape=(64, 64))])
    torch.testing.assert_close(out, torch.cat([left, right], dim=3), rtol=0, atol=1e-6)


def _samples(labels: torch.Tensor):
    samples = []
    for label in labels:
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=label[None])
        sample.set_metainfo(dict(img_shape=tuple(label.shape), pad_shape=tuple(label.shape)))
        samples.append(sample)
    return samples


def test_two_scale_loss_is_on_the_joint_predictions(tiny_model_cfg):
    """The released two_scale_forward: cross-entropy of the 0.5/1.0 joint class logits (1.0)
    and of the aux logits joined with the same attention (0.4), plus, with a per-scale weight,
    that weight times each scale's own class-logit loss; scale_attn is trained."""
    model = _build(_mscale(tiny_model_cfg, train_cfg=dict(scale_loss_weight=0.05)))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 64, 128, generator=g)
    labels = torch.randint(0, 19, (2, 64, 128), generator=g)
    losses = model.loss(x, _samples(labels))
    assert {k
            for k in losses if 'loss' in k
            } == {'decode_0.loss_ce', 'decode_1.loss_ce', 'scale_0.5x.loss_ce', 'scale_1x.loss_ce'}
    with torch.no_grad():
        lo, hi = model.scale_outputs(x, 0.5), model.scale_outputs(x, 1.0)
        up_attn = _up(lo['attn'], (64, 128))
        joint = {
            k: _up(lo['attn'] * lo[k], (64, 128)) + (1 - up_attn) * hi[k]
            for k in ('cls', 'aux')
        }
        expected = {
            'decode_1.loss_ce': F.cross_entropy(joint['cls'], labels),
            'decode_0.loss_ce': 0.4 * F.cross_entropy(joint['aux'], labels),
            'scale_0.5x.loss_ce': 0.05 * F.cross_entropy(_up(lo['cls'], (64, 128)), labels),
            'scale_1x.loss_ce': 0.05 * F.cross_entropy(hi['cls'], labels),
        }
    for key, value in expected.items():
        torch.testing.assert_close(losses[key], value, rtol=1e-5, atol=1e-6)
    sum(v for k, v in losses.items() if 'loss' in k).backward()
    grad = model.decode_head[1].scale_attn[0].conv.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_strict_load_names_the_keys(tiny_model_cfg):
    """strict_load=True: a state dict that does not fit fails, naming the keys and the PSA
    variants, also through mmengine's non-strict loading (what the Runner uses)."""
    model = MODELS.build(_mscale(tiny_model_cfg, strict_load=True))
    other = _mscale(tiny_model_cfg)
    other['backbone']['psa'] = dict(other['backbone']['psa'], mode='sequential')
    state = MODELS.build(other).state_dict()
    with pytest.raises(CheckpointMismatchError) as err:
        model.load_state_dict(state, strict=False)
    text = str(err.value)
    assert 'its PSA blocks are psa_s, this config builds psa_p' in text
    assert 'missing keys: backbone.stage2.0.branches.0.0.psa.conv_up.weight' in text
    assert 'unexpected keys: backbone.stage2.0.branches.0.0.psa.conv_up.0.weight' in text

    fitting = model.state_dict()
    model.load_state_dict(fitting)  # a fitting one loads
    fitting['decode_head.1.conv_seg.weight'] = torch.zeros(3, 32, 1, 1)
    with pytest.raises(
            CheckpointMismatchError,
            match=r'shape mismatches: decode_head\.1\.'
            r'conv_seg\.weight: \(3, 32, 1, 1\) in the checkpoint, \(19, 32, 1, 1\)'):
        model.load_state_dict(fitting, strict=False)
    # without strict_load, mmengine's loading stays non-strict
    MODELS.build(_mscale(tiny_model_cfg)).load_state_dict(state, strict=False)


def test_strict_load_through_mmengine_load_checkpoint(tiny_model_cfg, tmp_path):
    model = MODELS.build(_mscale(tiny_model_cfg, strict_load=True))
    state = {k: v for k, v in model.state_dict().items() if 'scale_attn' not in k}
    torch.save(dict(state_dict=state), tmp_path / 'ckpt.pth')
    with pytest.raises(CheckpointMismatchError, match='missing keys: decode_head.1.scale_attn'):
        load_checkpoint(model, str(tmp_path / 'ckpt.pth'), map_location='cpu')


# ---- through mmseg's Runner on the tiny data


class _Record(Hook):
    """The total loss of every training iteration, and the validation metrics."""

    def __init__(self) -> None:
        self.losses, self.val_metrics = [], None

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.losses.append(float(outputs['loss']))

    def after_val_epoch(self, runner, metrics=None) -> None:
        self.val_metrics = dict(metrics or {})


@pytest.fixture(scope='module')
def trained(tiny_data_root, make_tiny_cfg, tmp_path_factory, request):
    """The tiny multi-scale model trained 8 iterations (two-scale, per-scale weight 0.05) and
    validated (3 scales) by mmseg's Runner: (cfg, work_dir, record)."""
    work_dir = tmp_path_factory.mktemp('mscale_work')
    cfg = make_tiny_cfg(request.config.rootpath / TINY_HR, tiny_data_root, work_dir, 8)
    cfg.model = _mscale(
        cfg.model.to_dict(), train_cfg=dict(scales=[0.5, 1.0], scale_loss_weight=0.05))
    runner = Runner.from_cfg(copy.deepcopy(cfg))
    record = _Record()
    runner.register_hook(record, priority='LOWEST')
    runner.train()
    return cfg, work_dir, record


def test_runner_trains_validates_and_tests_the_model(trained, tmp_path):
    cfg, work_dir, record = trained
    assert len(record.losses) == 8 and torch.isfinite(torch.tensor(record.losses)).all()
    assert (work_dir / 'iter_8.pth').is_file()
    # tools/test.py's path: a new Runner, the saved checkpoint, the same 3-scale evaluation
    metrics = run_test_tool(cfg, str(work_dir / 'iter_8.pth'), work_dir=str(tmp_path))
    assert metrics['mIoU'] == pytest.approx(record.val_metrics['mIoU'], abs=1e-6)


def test_mmseg_apis_use_the_multiscale_inference(trained, tiny_data_root):
    from mmseg.apis import inference_model, init_model

    cfg, work_dir, _ = trained
    model = init_model(cfg, str(work_dir / 'iter_8.pth'), device='cpu')
    img = sorted((tiny_data_root / 'leftImg8bit' / 'val').rglob('*_leftImg8bit.png'))[0]
    scales = list(model.test_cfg['scales'])
    assert len(scales) == 3
    result = inference_model(model, str(img))
    assert result.seg_logits.data.shape[0] == 19
    assert tuple(result.pred_sem_seg.data.shape[1:]) == (128, 256)  # the frame's size
    # the logits are the multi-scale combination: scale 1.0 alone gives others, and the
    # configured scales again give the same
    model.test_cfg['scales'] = [1.0]
    single = inference_model(model, str(img)).seg_logits.data
    model.test_cfg['scales'] = scales
    again = inference_model(model, str(img)).seg_logits.data
    torch.testing.assert_close(again, result.seg_logits.data)
    assert (single - result.seg_logits.data).abs().max() > 1e-3 * single.abs().max()
