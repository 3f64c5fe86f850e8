"""The data: tfds splits served as uint8 batches whose order is a pure
function of (seed, epoch, step), and the augmentation that runs on the
device inside the jitted step (normalise, resize, flip, zoom, RandAugment,
MixUp/CutMix).

Data imports nothing from `model`, `training` or `tools`; only the host
pipeline (`input_pipeline.py`) imports tensorflow and tfds.
"""
