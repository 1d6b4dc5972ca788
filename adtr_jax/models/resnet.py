"""ResNet / Wide-ResNet backbones (placeholder until implemented)."""
ARCHS: dict = {}
FORMATS = ('torchvision', 'timm')
