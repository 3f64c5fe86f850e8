"""The Perceiver: a latent array that cross-attends to the input and refines
itself with a latent Transformer, in Flax linen (`perceiver.create_model`).

Here live the encoders and position features, the attention primitives (with
the folded form and the hand-written softmax core), the blocks and which
iterations share them, the decoders, dropout and the kernel choices
(`compute.py`). The model imports nothing from `data`, `training` or
`tools`, and no tensorflow.
"""
