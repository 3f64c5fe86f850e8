"""Other implementations' weights imported into this project's model.

`huggingface.py` maps HuggingFace's Perceiver IO classifiers (config and
weights) onto the model's options and parameters; `importer.py` reads a
checkpoint and writes a workdir the tools and `init_from` use
(`main.py --mode=import`). Like the tools, it sits on top of `model` and
`training`.
"""
