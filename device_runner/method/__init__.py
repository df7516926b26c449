"""The rules of SpFDE that both sides run, defined once (torch-free, numpy only).

The host trainer (``spfde_edge``, PyTorch) and the device runner (numpy + ONNX Runtime)
import these same functions, so the two sides cannot drift apart:

* :mod:`.schedule`: when things happen: Δτ boundaries, the prune-and-grow fraction, each
  block's cosine learning rate, and the mapping of a device run onto the host's plan;
* :mod:`.dst`: which weights prune-and-grow removes and adds (static, set, rigl, mest);
* :mod:`.sgd`: the SGD step with momentum and weight decay.

The circular data sieve (``device_runner.sieve``) is shared the same way.
"""
