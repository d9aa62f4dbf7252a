"""numpy heads trained on frozen backbone features. No torch.

* :mod:`.classification`: the classification head (linear, mlp, prototype), saved without
  pickles, with its fused graph; :mod:`.training` trains it (L2 search, temperature) with the
  optimisers of :mod:`.optimizers`;
* :mod:`.exemplars`: the replay memory for on-device updates;
* :mod:`.patch`: one-class patch heads for defect detection (patchcore, padim), with their ONNX
  scoring graph in :mod:`.patch_graph`;
* :mod:`.oneclass`: image-level one-class heads on pooled features (knn, gaussian) for the wrong
  part; :mod:`.defect`: the detector that scores a patch head and an image head together;
  :mod:`.heldout`: held-out scores of good items (a group, e.g. a frame's tiles, left out together)
  that the one-class heads' thresholds and scaling come from.

Every head has ``save(path)``, ``load(path)`` and ``graph(opset, ir_version)``. What differs between
head kinds lives in one class per kind, registered in :mod:`.registry` (the code above asks it
instead of comparing kind names); the built-in kinds are :mod:`.kinds`, registered here on import.
"""

from . import kinds  # noqa: F401  (the built-in head kinds register themselves on import)
