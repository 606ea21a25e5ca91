"""Deployment of mmpsa (and stock mmseg/mmpose) models: ONNX export checked against
onnxruntime (:mod:`mmpsa.deploy.onnx`), the export-time rewrites of stock code
(:mod:`mmpsa.deploy.rewriters`), and torch.compile / TorchScript parity
(:mod:`mmpsa.deploy.compile`). Needs the ``deploy`` extra for ONNX."""
