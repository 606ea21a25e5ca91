"""PSAHeatmapHead: mmpose's top-down heatmap head with a Polarized Self-Attention.

`Polarized Self-Attention <https://arxiv.org/abs/2107.00782>`_ on the deconvolved (and
optionally convolved) features, right before the final 1x1 conv that predicts the
heatmaps. With ``psa=None`` the head is mmpose's ``HeatmapHead``: same modules, same
state_dict keys, same outputs.
"""
from typing import Optional, Sequence, Tuple, Union

from mmpose.models.heads import HeatmapHead
from mmpose.registry import MODELS
from mmpose.utils.typing import ConfigType, OptConfigType
from torch import Tensor

from ..layers import PolarizedSelfAttention, check_psa_cfg

OptIntSeq = Optional[Sequence[int]]


@MODELS.register_module()
class PSAHeatmapHead(HeatmapHead):
    """``HeatmapHead`` (SimpleBaseline / HRNet top-down) with a PSA before the final layer.

    The block (child ``psa``) sees the output of the deconv layers and the optional conv
    layers -- ``conv_out_channels[-1]``, else ``deconv_out_channels[-1]``, else
    ``in_channels`` channels -- and is initialised after the head's own ``init_cfg``
    (whose Normal(std=0.001) on every Conv2d would otherwise overwrite the block's convs).

    Args:
        in_channels (int | Sequence[int]): Channels of the input feature map.
        out_channels (int): Number of heatmaps (keypoints).
        deconv_out_channels (Sequence[int], optional): Output channels of each deconv
            layer. Defaults to ``(256, 256, 256)``.
        deconv_kernel_sizes (Sequence[int], optional): Kernel size of each deconv layer.
            Defaults to ``(4, 4, 4)``.
        conv_out_channels (Sequence[int], optional): Output channels of each
            intermediate conv layer. Defaults to None.
        conv_kernel_sizes (Sequence[int], optional): Kernel size of each intermediate
            conv layer. Defaults to None.
        final_layer (dict): Arguments of the final conv. Defaults to
            ``dict(kernel_size=1)``.
        loss (dict): Keypoint loss config. Defaults to ``KeypointMSELoss``.
        decoder (dict, optional): Codec config used to decode the heatmaps.
        psa (dict, optional): ``dict(mode='parallel' | 'sequential',
            variant='paper' | 'official', fused=True)``. None (default): the stock head.
        init_cfg (dict, optional): Initialisation config; None gives the stock default.
    """

    def __init__(self,
                 in_channels: Union[int, Sequence[int]],
                 out_channels: int,
                 deconv_out_channels: OptIntSeq = (256, 256, 256),
                 deconv_kernel_sizes: OptIntSeq = (4, 4, 4),
                 conv_out_channels: OptIntSeq = None,
                 conv_kernel_sizes: OptIntSeq = None,
                 final_layer: dict = dict(kernel_size=1),
                 loss: ConfigType = dict(type='KeypointMSELoss', use_target_weight=True),
                 decoder: OptConfigType = None,
                 psa: Optional[dict] = None,
                 init_cfg: OptConfigType = None) -> None:
        if psa is not None:
            psa = check_psa_cfg(psa, 'PSAHeatmapHead')
            if conv_out_channels:
                channels = conv_out_channels[-1]
            elif deconv_out_channels:
                channels = deconv_out_channels[-1]
            else:
                channels = in_channels
            if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
                raise ValueError('PSAHeatmapHead: the PSA needs one positive int channel count '
                                 '(in_channels when there are no deconv/conv layers), got '
                                 f'in_channels={in_channels!r}')
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            deconv_out_channels=deconv_out_channels,
            deconv_kernel_sizes=deconv_kernel_sizes,
            conv_out_channels=conv_out_channels,
            conv_kernel_sizes=conv_kernel_sizes,
            final_layer=final_layer,
            loss=loss,
            decoder=decoder,
            init_cfg=init_cfg)
        # Built after the stock layers, so the stock parts draw the same random numbers.
        self.psa = None if psa is None else PolarizedSelfAttention(channels, **psa)

    def init_weights(self) -> None:
        """The stock initialisation, then the block's own."""
        super().init_weights()
        if self.psa is not None:
            self.psa.init_weights()

    def check_inputs(self, channels: int, source: str) -> None:
        """Raise ValueError naming ``in_channels`` unless it equals ``channels``.

        Args:
            channels: Channels of the feature map the head receives (the last level).
            source: Who produces it, for the message.
        """
        if isinstance(self.in_channels, int) and channels != self.in_channels:
            raise ValueError(f'PSAHeatmapHead: in_channels={self.in_channels} does not '
                             f'match {source}, got {channels} channels')

    def check_feature_channels(self, channels: Sequence[int], source: str) -> None:
        """The check :func:`mmpsa.necks.check_feature_channels` runs: the last map's."""
        self.check_inputs(channels[-1], source)

    def forward(self, feats: Tuple[Tensor]) -> Tensor:
        """Heatmaps from the last feature map: deconvs, convs, PSA, final conv.

        Args:
            feats (Tuple[Tensor]): Multi-scale feature maps; the last one is used.

        Returns:
            Tensor: Heatmaps (B, K, H, W).
        """
        x = feats[-1]
        self.check_inputs(x.shape[1], 'the input feature map')
        x = self.deconv_layers(x)
        x = self.conv_layers(x)
        if self.psa is not None:
            x = self.psa(x)
        return self.final_layer(x)
