"""Other implementations' weights imported into this project's model.

`huggingface.py` maps HuggingFace's Perceiver IO classifiers (config and
weights) onto the model's options and parameters; `pystate.py` reads
DeepMind's haiku checkpoints of the same classifiers without running their
code and `haiku.py` names their weights as HuggingFace does;
`importer.py` reads a checkpoint of either kind and writes a workdir the
tools and `init_from` use (`main.py --mode=import`). Like the tools,
`importer.py` sits on top of `model` and `training`; the other modules are
pure numpy.
"""
