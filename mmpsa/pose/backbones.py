"""PSA backbones for MMPose: mmpose's ResNet and HRNet with a PSA per residual block.

Thin subclasses (`Polarized Self-Attention <https://arxiv.org/abs/2107.00782>`_): the
stock ``__init__`` with every stock argument, then :func:`mmpsa.insertion.insert_psa`;
the mechanism (hook, init order, frozen stages) is
:class:`~mmpsa.insertion.PSABackboneMixin`.
"""
from mmpose.models.backbones import HRNet, ResNet, ResNetV1d
from mmpose.registry import MODELS

from ..insertion import PSABackboneMixin


@MODELS.register_module()
class PSAResNet(PSABackboneMixin, ResNet):
    """mmpose's ResNet (SimpleBaseline) with a PSA after conv2+norm2+ReLU of every
    Bottleneck (after conv1+norm1+ReLU of a BasicBlock): keys ``layer1.0.psa.*``.

    Each ``psa`` is initialised after the backbone's ``init_cfg``; a ``psa`` in a stage
    covered by ``frozen_stages`` stays trainable.

    Args:
        psa (dict, optional): ``dict(mode='parallel' | 'sequential',
            variant='paper' | 'official', stages=None, fused=True)``; ``stages`` holds
            ``num_stages`` bools, default every stage. None (default): the stock ResNet,
            bit for bit.
        **kwargs: The arguments of :class:`mmpose.models.backbones.ResNet`.
    """


@MODELS.register_module()
class PSAResNetV1d(PSABackboneMixin, ResNetV1d):
    """mmpose's ResNetV1d (deep stem, average-pool downsampling) with a PSA in every
    residual block, as :class:`PSAResNet` (keys ``layer1.0.psa.*``; a ``psa`` in a
    frozen stage stays trainable).

    Args:
        psa (dict, optional): As for :class:`PSAResNet`; None: the stock ResNetV1d.
        **kwargs: The arguments of :class:`mmpose.models.backbones.ResNetV1d`.
    """


@MODELS.register_module()
class PSAHRNet(PSABackboneMixin, HRNet):
    """mmpose's HRNet with a PSA in every residual block: keys ``layer1.0.psa.*`` (stage 1,
    Bottlenecks) and ``stage2.0.branches.0.0.psa.*`` (stages 2-4, BasicBlocks).

    The paper's placement (every block) is ``psa=dict(mode='parallel')``; the released
    code's (PSA_s in the BasicBlocks only) is ``psa=dict(stages=(False, True, True, True),
    variant='official', mode='sequential')``. Each ``psa`` is initialised after the
    backbone's ``init_cfg`` (whose default, Normal(std=0.001) on every Conv2d, would
    otherwise overwrite the PSA convs); a ``psa`` in a stage covered by ``frozen_stages``
    stays trainable.

    Args:
        psa (dict, optional): ``dict(mode='parallel' | 'sequential',
            variant='paper' | 'official', stages=None, fused=True)``; ``stages`` holds
            4 bools (stage 1 is ``layer1``), default every stage. None (default): the
            stock HRNet, bit for bit.
        **kwargs: The arguments of :class:`mmpose.models.backbones.HRNet`.
    """
