"""A 20-line custom CNN for spfde-edge: ``--model docs/examples/tiny_cnn.py:tiny_cnn``."""
from torch import nn


def conv_bn_relu(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def tiny_cnn(num_classes=10):
    """Each child of the Sequential is one freezing block; the last one is the head."""
    return nn.Sequential(
        conv_bn_relu(3, 16),                                # stem (kept dense)
        nn.Sequential(conv_bn_relu(16, 32, 2), conv_bn_relu(32, 32)),
        nn.Sequential(conv_bn_relu(32, 64, 2), conv_bn_relu(64, 64)),
        nn.Sequential(conv_bn_relu(64, 128, 2), conv_bn_relu(128, 128)),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes)),
    )
