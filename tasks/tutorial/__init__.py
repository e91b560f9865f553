"""The TensorFlow tutorial's own model and data: the only MNIST-specific code of ckptflow."""
