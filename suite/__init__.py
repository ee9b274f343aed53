"""suite: parameter-efficient adaptation of pretrained backbones, on PyTorch Lightning."""

__version__ = "0.1.0"
