"""numpy heads trained on frozen backbone features: classification (:mod:`.classification`), the
replay memory for on-device updates (:mod:`.exemplars`), and one-class patch heads for defect
detection (:mod:`.patch`, with their ONNX scoring graph in :mod:`.patch_graph`). No torch."""
