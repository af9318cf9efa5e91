"""Models: normalized backbones, the dual-head ResNet18, readouts, checkpoint loaders."""
