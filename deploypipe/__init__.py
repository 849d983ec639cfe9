"""deploypipe: take a trained PyTorch model and make it ship — smaller, faster, certified, tracked."""

__version__ = "0.1.0"
